"""The gateway's own administration RPCs (``gateway.v1.ModelAdmin`` and ``PolicyAdmin``).

Each RPC is a governed action like inference: authorized by policy (``model.load``,
``model.unload``, ``policy.load``, ``policy.read``) and audited. Models can only be loaded
from the repository on disk, verified as at start-up; nothing is uploaded over the network.
"""

from __future__ import annotations

import grpc

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.errors import InvalidRequest, ModelUnavailable
from gateway.models import REFUSED
from gateway.server._guard import Guard


class AdminServicer(pb_grpc.ModelAdminServicer, pb_grpc.PolicyAdminServicer):
    """Model load/unload/list and policy reload/read, all through the guard."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_ModelAdminServicer_to_server(self, server)
        pb_grpc.add_PolicyAdminServicer_to_server(self, server)

    # -- models -----------------------------------------------------------------------------

    def LoadModel(self, request, context):
        with self._guard.call(context, rpc="LoadModel", action="model.load",
                              model=request.name, version=request.version, must_exist=False):
            entry = self._guard.models.load(request.name, _version(request.version))
            if entry.state == REFUSED:  # audited as model_refused, with the full detail
                raise ModelUnavailable(f"model '{entry.name}' version {entry.version} is "
                                       f"refused: {entry.reason}")
            return _status(entry)

    def UnloadModel(self, request, context):
        with self._guard.call(context, rpc="UnloadModel", action="model.unload",
                              model=request.name, version=request.version):
            return _status(self._guard.models.unload(request.name, _version(request.version)))

    def ListModels(self, request, context):
        # Listing reveals model names, so it needs metadata access to every model ("*").
        with self._guard.call(context, rpc="ListModels", action="metadata", model=""):
            return pb.ListModelsResponse(models=[_status(e) for e in
                                                 self._guard.models.entries()])

    # -- policy -----------------------------------------------------------------------------

    def ReloadPolicy(self, request, context):
        with self._guard.call(context, rpc="ReloadPolicy", action="policy.load") as call:
            result = self._guard.policy.reload("admin RPC")
            call.fields["policy_reload"] = {"accepted": result.accepted,
                                            "new_digest": result.new_digest}
            return pb.ReloadPolicyResponse(accepted=result.accepted,
                                           old_digest=result.old_digest,
                                           new_digest=result.new_digest, error=result.error)

    def GetPolicy(self, request, context):
        with self._guard.call(context, rpc="GetPolicy", action="policy.read"):
            store = self._guard.policy
            files = store.files()
            return pb.GetPolicyResponse(digest=store.digest,
                                        model_conf=files.get("model.conf", ""),
                                        policy_csv=files.get("policy.csv", ""))


def _version(version: str) -> str:
    if not version:
        raise InvalidRequest("a model version is required for load and unload")
    return version


def _status(entry) -> pb.ModelStatus:
    model = entry.model
    return pb.ModelStatus(name=entry.name, version=entry.version, state=entry.state,
                          reason=entry.reason, digest=model.digest if model else "")
