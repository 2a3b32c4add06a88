"""The gateway.v1.Explainer gRPC service: thin glue from a request to :func:`explain`.

Serves ``gateway.v1.Explainer/Explain`` under its own policy action ``explain`` (a caller
allowed ``infer`` is not thereby allowed to explain: explanations reveal more of a model
than predictions), charges each caller's :class:`~gateway.explain.ExplainBudgets` in model
evaluations (RESOURCE_EXHAUSTED past it) and records the cost in the call's audit fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from gateway._proto.gateway.v1 import explain_pb2, explain_pb2_grpc
from gateway.errors import InvalidRequest
from gateway.explain import (
    ExplainBudgets,
    ExplainSettings,
    explain,
    planned_evaluations,
    profile_baseline,
)
from gateway.models import NUMPY_DTYPES, LoadedModel
from gateway.monitor import InputProfile, verified_profile
from gateway.server._guard import Call, Guard, monitor_key

Baselines = Callable[[LoadedModel], "np.ndarray | None"]


class ExplainServicer(explain_pb2_grpc.ExplainerServicer):
    """Explain RPCs: policy action ``explain``, a budget of model evaluations per caller."""

    def __init__(self, guard: Guard, budgets: ExplainBudgets | None = None,
                 settings: ExplainSettings | None = None, *,
                 baselines: Baselines = profile_baseline) -> None:
        self._guard = guard
        self._settings = settings or ExplainSettings()
        self._budgets = budgets or ExplainBudgets(self._settings.budget_evaluations,
                                                  self._settings.budget_window_seconds)
        self._baselines = baselines
        # Default baselines and anomaly profiles by model digest: parsed once per verified
        # model.
        self._baseline_cache: dict[str, np.ndarray | None] = {}
        self._profiles: dict[str, InputProfile | None] = {}

    def add_to_server(self, server: grpc.Server) -> None:
        explain_pb2_grpc.add_ExplainerServicer_to_server(self, server)

    def Explain(self, request: explain_pb2.ExplainRequest,
                context: grpc.ServicerContext) -> explain_pb2.ExplainResponse:
        # The same request attributes ModelInfer gives policy, so a rule on them holds for
        # explain too (an absent attribute makes a deny rule's condition false).
        size = len(request.input.raw) + len(request.baseline.raw)
        with self._guard.call(context, rpc="Explain", action="explain",
                              model=request.model_name, version=request.model_version,
                              request_attributes={"request.batch_size": 1,
                                                  "request.input_bytes": size},
                              strings=(("method", request.method),
                                       ("output name", request.output_name))) as call:
            call.fields["cost"] = {"evaluations": 0}
            return self._explain(request, call)

    def _explain(self, request: explain_pb2.ExplainRequest,
                 call: Call) -> explain_pb2.ExplainResponse:
        model = call.model()  # the model the policy decided on, or FAILED_PRECONDITION
        method = request.method or "kernel_shap"
        if len(model.inputs) != 1:
            raise InvalidRequest(f"explain needs a model with one input; "
                                 f"{request.model_name} has {len(model.inputs)}")
        spec = model.inputs[0]
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if dtype is None:
            raise InvalidRequest(f"explain does not support input datatype {spec.datatype}")
        row_shape = self._row_shape(spec, request.input)
        x = _decode(request.input, dtype, row_shape, "input")
        source = "request"
        if request.HasField("baseline"):
            baseline = _decode(request.baseline, dtype, row_shape, "baseline")
        else:
            if model.digest not in self._baseline_cache:
                self._baseline_cache[model.digest] = self._baselines(model)
            found = self._baseline_cache[model.digest]
            if found is not None and found.size == x.size:
                baseline, source = found.astype(dtype), "profile"
            else:
                baseline, source = np.zeros_like(x), "zeros"
        output_name, index = self._output(model, request)
        m = x.size
        if m > self._settings.max_features:
            raise InvalidRequest(f"the input has {m} features; explain allows at most "
                                 f"{self._settings.max_features}")
        if request.samples > self._settings.max_samples:
            raise InvalidRequest(f"samples {request.samples} is over the limit of "
                                 f"{self._settings.max_samples}")
        # The caller chose both the input and the baseline (every evaluation lies between
        # them): an anomaly.* rule decides on both, as it does on ModelInfer's batch.
        rows = np.stack([x.reshape(-1), baseline.reshape(-1)])
        profile = self._profile(model)
        if not call.authorize_on_scores(model, profile, rows):
            self._guard.monitor.score_later(monitor_key(model), profile, caller_of(call), rows)
        planned = planned_evaluations(method, m, request.samples)
        call.fields["explain"] = {"method": method, "features": m, "baseline": source,
                                  "output": output_name, "index": index}
        caller = caller_of(call)
        self._budgets.reserve(caller, planned)

        def run(rows: np.ndarray) -> np.ndarray:
            feeds = {spec.name: rows.reshape(len(rows), *row_shape).astype(dtype, copy=False)}
            out = np.asarray(model.run(feeds, [output_name])[output_name])
            return out.reshape(len(rows), -1)[:, index]

        batch = 1 if spec.shape and spec.shape[0] == 1 else self._settings.batch_size
        result = explain(run, x, baseline, method=method, samples=request.samples,
                         seed=request.seed, budget=planned, batch_size=batch)
        self._budgets.refund(caller, planned - result.evaluations)
        call.fields["cost"] = {"evaluations": result.evaluations}
        return explain_pb2.ExplainResponse(
            model_name=model.name, model_version=str(model.version), method=method,
            attributions=result.attributions.tolist(), prediction=result.prediction,
            baseline_prediction=result.baseline_prediction, evaluations=result.evaluations)

    def _profile(self, model: LoadedModel) -> InputProfile | None:
        if model.digest not in self._profiles:
            self._profiles[model.digest] = verified_profile(model.extras)
        return self._profiles[model.digest]

    @staticmethod
    def _row_shape(spec: Any, tensor: explain_pb2.Tensor) -> tuple[int, ...]:
        """The shape of one row: the model's input shape without its batch dimension."""
        dims = list(spec.shape)[1:]
        given = list(tensor.shape)
        if given and given[0] == 1 and len(given) == len(dims) + 1:
            given = given[1:]
        if len(given) != len(dims) or any(d not in (-1, g) for d, g in zip(dims, given,
                                                                          strict=True)):
            raise InvalidRequest(f"input shape {list(tensor.shape)} does not match the model's "
                                 f"{list(spec.shape)} (one row, batch 1)")
        return tuple(given)

    @staticmethod
    def _output(model: LoadedModel, request: explain_pb2.ExplainRequest) -> tuple[str, int]:
        names = [o.name for o in model.outputs]
        name = request.output_name or names[0]
        if name not in names:
            raise InvalidRequest(f"model has no output {name!r}; outputs: {', '.join(names)}")
        spec = model.outputs[names.index(name)]
        per_row = 1
        for d in list(spec.shape)[1:]:
            per_row *= d if d > 0 else 1
        known = all(d > 0 for d in list(spec.shape)[1:])
        if known and request.output_index >= per_row:
            raise InvalidRequest(f"output_index {request.output_index} is out of range for "
                                 f"output {name!r} with {per_row} values per row")
        return name, int(request.output_index)


def caller_of(call: Call) -> str:
    """The admitted caller's id (the guard authenticated it before the handler ran)."""
    assert call.identity is not None
    return call.identity.id


def _decode(tensor: explain_pb2.Tensor, dtype: np.dtype, row_shape: tuple[int, ...],
            what: str) -> np.ndarray:
    count = int(np.prod(row_shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(tensor.raw) != expected:
        raise InvalidRequest(f"{what}: {len(tensor.raw)} bytes of raw data, expected {expected} "
                             f"({count} x {dtype.name})")
    x = np.frombuffer(tensor.raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise InvalidRequest(f"{what}: contains NaN or infinity")
    return x
