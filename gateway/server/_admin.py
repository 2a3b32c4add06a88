"""The gateway's own administration RPCs (``gateway.v1.ModelAdmin`` and ``PolicyAdmin``).

Each RPC is a governed action like inference: authorized by policy (``model.load``,
``model.unload``, ``policy.load``, ``policy.read``; server-level ones on the object
``@gateway``) and audited. Models can only be loaded
from the repository on disk, verified as at start-up; nothing is uploaded over the network.

LoadModel and UnloadModel change the models' desired state through the coordinator
(:mod:`gateway.state`): every replica applies the change to its own repository (each verifies
its own copy of the files) before the reply leaves. The reply is OK only when every live
replica applied it; otherwise FAILED_PRECONDITION naming each replica that did not and why.
Either way the decision record lists every replica's answer (``replicas``) and so does the
trailing metadata, one ``gateway-replica: <member>: ok|<why not>`` entry per replica.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.errors import ConfigError, InvalidRequest, ModelUnavailable
from gateway.models import (
    LOAD,
    LOADED,
    MODELS_TOPIC,
    UNLOAD,
    UNLOADED,
    ModelEntry,
    model_change,
    model_key,
)
from gateway.policy import PolicyError, ReloadResult
from gateway.server._guard import Call, Guard
from gateway.state import Applied, Coordinator

#: Trailing metadata key of each replica's answer to a model load or unload.
REPLICA_KEY = "gateway-replica"
#: Longest a load or unload waits for the replicas' answers (less if the caller's deadline
#: is nearer): verifying a large model's files takes time.
APPLY_TIMEOUT = 120.0


class AdminServicer(pb_grpc.ModelAdminServicer, pb_grpc.PolicyAdminServicer):
    """Model load/unload/list and policy reload/read, all through the guard."""

    def __init__(self, guard: Guard, coordinator: Coordinator, *,
                 reload_policy: Callable[[str], ReloadResult] | None = None) -> None:
        """``reload_policy``: how ReloadPolicy reloads (a worker process: in every worker);
        default: this process's policy store."""
        self._guard = guard
        self._coordinator = coordinator
        self._reload_policy = reload_policy

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_ModelAdminServicer_to_server(self, server)
        pb_grpc.add_PolicyAdminServicer_to_server(self, server)

    # -- models -----------------------------------------------------------------------------

    def LoadModel(self, request: pb.LoadModelRequest,
                  context: grpc.ServicerContext) -> pb.ModelStatus:
        with self._guard.call(context, rpc="LoadModel", action="model.load",
                              model=request.name, version=request.version,
                              must_exist=False) as call:
            entry = self._everywhere(call, context, LOAD, request.name, request.version)
            if entry.state != LOADED:  # only if a later change overtook this one
                raise ModelUnavailable(f"model '{entry.name}' version {entry.version} is "
                                       f"{entry.state.lower()} after this load: a later "
                                       f"change overtook it ({entry.reason})")
            return _status(entry)

    def UnloadModel(self, request: pb.UnloadModelRequest,
                    context: grpc.ServicerContext) -> pb.ModelStatus:
        with self._guard.call(context, rpc="UnloadModel", action="model.unload",
                              model=request.name, version=request.version) as call:
            entry = self._everywhere(call, context, UNLOAD, request.name, request.version)
            if entry.state != UNLOADED:  # only if a later change overtook this one
                raise ModelUnavailable(f"model '{entry.name}' version {entry.version} is "
                                       f"{entry.state.lower()} after this unload: a later "
                                       "change overtook it")
            return _status(entry)

    def _everywhere(self, call: Call, context: grpc.ServicerContext, op: str, name: str,
                    version: str) -> ModelEntry:
        """Apply a load or unload on every replica; this replica's entry after it. Each
        refusal is also audited by the replica that refused (``model_refused``, full
        detail); the caller reads the caller-safe reason."""
        identity = call.identity.id if call.identity is not None else ""
        change = model_change(op, name, _version(version), by=identity)
        remaining = context.time_remaining()
        timeout = APPLY_TIMEOUT if remaining is None else \
            max(0.0, min(APPLY_TIMEOUT, remaining - 0.5))
        answers = self._coordinator.apply_everywhere(MODELS_TOPIC, model_key(name, version),
                                                     change, timeout)
        call.fields["replicas"] = [{"member": a.member, "ok": a.ok, "detail": a.detail}
                                   for a in answers]
        call.trailers.extend((REPLICA_KEY, _metadata(f"{a.member}: {a.detail or 'ok'}"))
                             for a in answers)
        failed = [a for a in answers if not a.ok]
        if failed:
            raise ModelUnavailable(_not_everywhere(op, name, version, failed, len(answers)))
        entry = self._guard.models.entry(name, version)
        if entry is None:  # this replica did not answer as a member (it always is one)
            raise ModelUnavailable(f"model '{name}' version {version}: this replica did not "
                                   f"apply the {op}")
        return entry

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
            if self._reload_policy is not None:
                result = self._reload_policy("admin RPC")
            else:
                reloaded = self._guard.policy.reload("admin RPC")
                assert reloaded is not None  # only a watcher's if_changed reload returns None
                result = reloaded
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


def _not_everywhere(op: str, name: str, version: str, failed: list[Applied],
                    replicas: int) -> str:
    done = "loaded" if op == LOAD else "unloaded"
    reasons = "; ".join(f"{a.member}: {a.detail}" for a in failed)
    return (f"model '{name}' version {version} not {done} by {len(failed)} of {replicas} "
            f"replica(s): {reasons}")


def _metadata(text: str) -> str:
    """``text`` as an ASCII metadata value (gRPC refuses others), clipped."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:1024]


def _status(entry: ModelEntry) -> pb.ModelStatus:
    model = entry.model
    return pb.ModelStatus(name=entry.name, version=entry.version, state=entry.state,
                          reason=entry.reason, digest=model.digest if model else "")
