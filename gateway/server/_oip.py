"""The Open Inference Protocol servicer (``inference.GRPCInferenceService``).

Read one request top to bottom in :meth:`InferenceServicer.ModelInfer`: the guard
authenticates the caller and asks policy (before any tensor is decoded), then the model is
looked up, the inputs decoded and checked, the session run, the outputs encoded, and the
guard makes the audit record durable before the response leaves, returning its receipt
(index and leaf hash) in trailing metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import grpc
import numpy as np

from gateway import __version__
from gateway._proto.inference import grpc_service_pb2 as pb
from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.errors import InvalidRequest, ResponseTooLarge
from gateway.identity import Identity
from gateway.inference import (
    check_batch,
    decode_inputs,
    encode_outputs,
    request_size,
    requested_outputs,
)
from gateway.models import LoadedModel
from gateway.monitor import InputProfile, verified_profile
from gateway.server._guard import Call, Guard, monitor_key

#: The only platform the gateway serves.
PLATFORM = "onnxruntime_onnx"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 over verified ONNX Runtime sessions; Triton's extension RPCs are absent."""

    def __init__(self, guard: Guard, *, max_tensor_elements: int,
                 ready: Callable[[], bool] = lambda: True,
                 max_response_bytes: int = 0) -> None:
        self._guard = guard
        self._models = guard.models
        self._max_elements = max_tensor_elements
        self._max_response = max_response_bytes
        self._ready = ready
        #: Per model version (name, version, digest): what its calls read of it, made once.
        self._facts: dict[tuple[str, str, str], _Facts] = {}

    # -- server-level: a valid certificate is enough -------------------------------------

    def ServerLive(self, request: pb.ServerLiveRequest,
                   context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        with self._guard.call(context, rpc="ServerLive", action=None):
            return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest,
                    context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        with self._guard.call(context, rpc="ServerReady", action=None):
            return pb.ServerReadyResponse(ready=self._ready())

    def ServerMetadata(self, request: pb.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        with self._guard.call(context, rpc="ServerMetadata", action=None):
            # No Triton extensions are offered, so none are advertised.
            return pb.ServerMetadataResponse(name="gateway", version=__version__)

    # -- model-level: policy decides -----------------------------------------------------

    def ModelReady(self, request: pb.ModelReadyRequest,
                   context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        with self._guard.call(context, rpc="ModelReady", action="ready",
                              model=request.name, version=request.version) as call:
            entry = call.entry
            return pb.ModelReadyResponse(ready=entry is not None and entry.model is not None)

    def ModelMetadata(self, request: pb.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        with self._guard.call(context, rpc="ModelMetadata", action="metadata",
                              model=request.name, version=request.version) as call:
            model = call.model()
            response = pb.ModelMetadataResponse(
                name=model.name, versions=self._models.versions(model.name), platform=PLATFORM)
            for specs, target in ((model.inputs, response.inputs),
                                  (model.outputs, response.outputs)):
                for spec in specs:
                    target.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            return response

    def ModelInfer(self, request: pb.ModelInferRequest,
                   context: grpc.ServicerContext) -> pb.ModelInferResponse:
        batch, input_bytes, names = request_size(request)
        with self._guard.call(
            context, rpc="ModelInfer", action="infer",
            model=request.model_name, version=request.model_version, request_id=request.id,
            request_attributes={"request.batch_size": batch, "request.input_bytes": input_bytes},
            strings=names,
        ) as call:
            call.fields["payload"] = self._payload(request)
            model = call.model()
            feeds = decode_inputs(request, model, max_elements=self._max_elements)
            facts = self._facts_of(model)
            if facts.ties:
                check_batch(feeds, facts.ties)
            outputs = requested_outputs(request, model)
            rows, scored = self._score_now(call, model, facts, feeds)
            t0 = time.perf_counter_ns()
            results = _run(model, feeds, outputs)
            call.timings["inference"] = (time.perf_counter_ns() - t0) // 1000
            if rows is not None:
                self._monitor_later(call, model, facts.profile(), rows, scored,
                                    results.get(model.outputs[0].name))
            response = pb.ModelInferResponse(model_name=model.name, model_version=model.version,
                                             id=call.request_id)
            encode_outputs(response, results, outputs)
            return self._fits(response)

    def _fits(self, response: pb.ModelInferResponse) -> pb.ModelInferResponse:
        """Refuse, ourselves and audited as such, a response gRPC would refuse to send.

        Past the server's ``max_send_message_length`` the transport would fail the call with
        RESOURCE_EXHAUSTED after the guard had recorded OK; the record must say what the
        caller receives, so the size is checked here, before the guard writes it.
        """
        size = response.ByteSize()
        if self._max_response and size > self._max_response:
            raise ResponseTooLarge(f"the response ({size} bytes) exceeds the largest message "
                                   f"the server sends ({self._max_response} bytes); ask for "
                                   "fewer rows or outputs")
        return response

    def _score_now(self, call: Call, model: LoadedModel, facts: _Facts,
                   feeds: dict[str, np.ndarray]) -> tuple[np.ndarray | None, bool]:
        """Anomaly scores of the input, and policy again, when the policy decides on them.

        Returns the input rows to monitor (None when the input is not numeric) and whether
        they were scored already. A multi-input model is scored on one row per batch row:
        its inputs flattened and concatenated in the model's input order (its profile.json
        must be fitted on that layout), so ``anomaly.*`` rules apply to it too.
        """
        rows = _feature_rows([feeds[spec.name] for spec in model.inputs])
        if rows is None:
            return None, False
        return rows, call.authorize_on_scores(model, facts.profile(), rows)

    def _monitor_later(self, call: Call, model: LoadedModel, profile: InputProfile | None,
                       rows: np.ndarray, scored: bool, y: np.ndarray | None) -> None:
        """Monitoring that no decision waits for runs on the monitor's thread, batched."""
        monitor = self._guard.monitor
        if scored:
            if y is not None:
                monitor.observe_output(monitor_key(model), y, profile)
        else:
            monitor.score_later(monitor_key(model), profile, _caller(call).id, rows, y)

    def _facts_of(self, model: LoadedModel) -> _Facts:
        """The model version's batch ties and reference profile, worked out on its first call."""
        key = (model.name, model.version, model.digest)
        facts = self._facts.get(key)
        if facts is None:
            facts = self._facts[key] = _Facts(model)
        return facts

    def _payload(self, request: pb.ModelInferRequest) -> dict[str, object]:
        """Keyed digest and size of the input bytes as sent (never the tensors themselves)."""
        raw = request.raw_input_contents
        if raw:
            return {"hmac": self._guard.audit.payload_digest(*raw), "size": sum(map(len, raw))}
        chunks = [t.contents.SerializeToString(deterministic=True) for t in request.inputs]
        return {"hmac": self._guard.audit.payload_digest(*chunks),
                "size": sum(map(len, chunks))}


class _Facts:
    """What the calls of one model version read of it besides its session, worked out once."""

    __slots__ = ("_extras", "_parsed", "_profile", "ties")

    def __init__(self, model: LoadedModel) -> None:
        #: Input name -> the ONNX name of its first dimension, for inputs that share it.
        self.ties = _batch_ties(model)
        self._extras = model.extras
        self._parsed = False
        self._profile: InputProfile | None = None

    def profile(self) -> InputProfile | None:
        """The reference profile, parsed from the model's verified files on first use (a
        malformed one fails the calls that score, as it always has, and only those)."""
        if not self._parsed:
            self._profile = verified_profile(self._extras)
            self._parsed = True
        return self._profile


def _batch_ties(model: LoadedModel) -> dict[str, str]:
    """Input name -> the ONNX name of its first dimension, for inputs that name it alike."""
    named = {i.name: i.shape[0] for i in model.session.get_inputs()
             if i.shape and isinstance(i.shape[0], str) and i.shape[0]}
    symbols = list(named.values())  # only a name two inputs share ties anything
    return {n: d for n, d in named.items() if symbols.count(d) > 1}


def _feature_rows(arrays: list[np.ndarray]) -> np.ndarray | None:
    """One feature row per batch row over every input (None: not numeric, or no rows)."""
    if len(arrays) == 1:  # as it is: a single input's dtype is the profile's
        x = arrays[0]
        if x.dtype.kind not in "iuf" or x.ndim == 0:
            return None
        return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    if not arrays or any(a.dtype.kind not in "biuf" or a.ndim == 0 for a in arrays):
        return None
    batch = arrays[0].shape[0] if all(a.ndim > 1 for a in arrays) else None
    if batch is None or any(a.shape[0] != batch for a in arrays):  # no shared batch axis
        return np.concatenate([a.reshape(1, -1).astype(np.float64) for a in arrays], axis=1)
    return np.concatenate([a.reshape(batch, -1).astype(np.float64) for a in arrays], axis=1)


def _caller(call: Call) -> Identity:
    """The call's authenticated caller (the guard admitted it before the handler ran)."""
    assert call.identity is not None
    return call.identity




def _run(model: LoadedModel, feeds: Mapping[str, np.ndarray],
         outputs: list[str]) -> dict[str, np.ndarray]:
    try:
        return model.run(feeds, outputs)
    except Exception as err:  # ORT reports shape/type problems the codec could not foresee
        text = str(err).strip().splitlines()
        raise InvalidRequest(f"model {model.name} rejected the input: "
                             f"{text[0][:300] if text else type(err).__name__}") from err


def add_to_server(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register the OIP service on ``server``."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
