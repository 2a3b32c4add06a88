"""The gateway's own administration RPCs (``gateway.v1.ModelAdmin`` and ``PolicyAdmin``).

Each RPC is a governed action like inference: authorized by policy (``model.load``,
``model.unload``, ``policy.load``, ``policy.read``; server-level ones on the object
``@gateway``) and audited. Models can only be loaded
from the repository on disk, verified as at start-up; nothing is uploaded over the network.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.errors import ConfigError, InvalidRequest, ModelUnavailable
from gateway.models import REFUSED, ModelEntry
from gateway.policy import PolicyError
from gateway.server._guard import Guard


class AdminServicer(pb_grpc.ModelAdminServicer, pb_grpc.PolicyAdminServicer):
    """Model load/unload/list and policy reload/read, all through the guard."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_ModelAdminServicer_to_server(self, server)
        pb_grpc.add_PolicyAdminServicer_to_server(self, server)

    # -- models -----------------------------------------------------------------------------

    def LoadModel(self, request: pb.LoadModelRequest,
                  context: grpc.ServicerContext) -> pb.ModelStatus:
        with self._guard.call(context, rpc="LoadModel", action="model.load",
                              model=request.name, version=request.version, must_exist=False):
            entry = self._guard.models.load(request.name, _version(request.version))
            if entry.state == REFUSED:  # audited as model_refused, with the full detail
                raise ModelUnavailable(f"model '{entry.name}' version {entry.version} is "
                                       f"refused: {entry.reason}")
            return _status(entry)

    def UnloadModel(self, request: pb.UnloadModelRequest,
                    context: grpc.ServicerContext) -> pb.ModelStatus:
        with self._guard.call(context, rpc="UnloadModel", action="model.unload",
                              model=request.name, version=request.version):
            return _status(self._guard.models.unload(request.name, _version(request.version)))

    def ListModels(self, request: pb.ListModelsRequest,
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        # Listing reveals model names, so it needs metadata access to every model ("*").
        with self._guard.call(context, rpc="ListModels", action="metadata", model=""):
            return pb.ListModelsResponse(models=[_status(e) for e in
                                                 self._guard.models.entries()])

    # -- policy -----------------------------------------------------------------------------

    def ReloadPolicy(self, request: pb.ReloadPolicyRequest,
                     context: grpc.ServicerContext) -> pb.ReloadPolicyResponse:
        with self._guard.call(context, rpc="ReloadPolicy", action="policy.load") as call:
            result = self._guard.policy.reload("admin RPC")
            assert result is not None  # only a watcher's if_changed reload returns None
            call.fields["policy_reload"] = {"accepted": result.accepted,
                                            "new_digest": result.new_digest}
            return pb.ReloadPolicyResponse(accepted=result.accepted,
                                           old_digest=result.old_digest,
                                           new_digest=result.new_digest, error=result.error)

    def GetPolicy(self, request: pb.GetPolicyRequest,
                  context: grpc.ServicerContext) -> pb.GetPolicyResponse:
        with self._guard.call(context, rpc="GetPolicy", action="policy.read"):
            store = self._guard.policy
            files = store.files()
            return pb.GetPolicyResponse(digest=store.digest,
                                        model_conf=files.get("model.conf", ""),
                                        policy_csv=files.get("policy.csv", ""))


    # -- shadow mode ------------------------------------------------------------------------

    def SetShadowPolicy(self, request: pb.SetShadowPolicyRequest,
                        context: grpc.ServicerContext) -> pb.ShadowPolicyStatus:
        with self._guard.call(context, rpc="SetShadowPolicy", action="policy.load") as call:
            store = self._guard.policy
            if request.clear:
                final = store.clear_shadow()
                call.fields["policy_shadow"] = {"cleared": True}
                return pb.ShadowPolicyStatus(
                    active=False, live_digest=store.digest,
                    decisions=final["decisions"] if final else 0,
                    disagreements=final["disagreements"] if final else 0)
            directory = store.shadow_directory(request.directory) if request.directory \
                else store.configured_shadow
            if not directory:
                raise InvalidRequest("no shadow directory given and none configured "
                                     "([policy] shadow)")
            try:
                digest = store.load_shadow(Path(directory))
            except PolicyError as err:  # every problem, as a reload reports them
                raise ConfigError(f"shadow policy {directory} rejected:\n"
                                  f"{err.diagnostics()}") from None
            call.fields["policy_shadow"] = {"shadow_digest": digest, "directory": str(directory)}
            return pb.ShadowPolicyStatus(active=True, shadow_digest=digest,
                                         directory=str(directory), live_digest=store.digest)

    def GetShadowReport(self, request: pb.GetShadowReportRequest,
                        context: grpc.ServicerContext) -> pb.ShadowReport:
        with self._guard.call(context, rpc="GetShadowReport", action="policy.read"):
            report = self._guard.policy.shadow_report()
            if report is None:
                return pb.ShadowReport(active=False, live_digest=self._guard.policy.digest)
            return pb.ShadowReport(
                active=True, shadow_digest=report["shadow_digest"],
                live_digest=report["live_digest"], directory=report["directory"],
                decisions=report["decisions"], disagreements=report["disagreements"],
                since=report["since"], dropped_requests=report["dropped_requests"],
                by_rule=[pb.ShadowDisagreement(**row) for row in report["by_rule"]],
                by_request=[pb.ShadowDisagreement(**row) for row in report["by_request"]])


def _version(version: str) -> str:
    if not version:
        raise InvalidRequest("a model version is required for load and unload")
    return version


def _status(entry: ModelEntry) -> pb.ModelStatus:
    model = entry.model
    return pb.ModelStatus(name=entry.name, version=entry.version, state=entry.state,
                          reason=entry.reason, digest=model.digest if model else "")
