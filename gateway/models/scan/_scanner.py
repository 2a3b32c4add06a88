"""The admission scan of one model version directory, check by check."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto, helper

from gateway.models import _files, _tensors
from gateway.models.scan import _analysis, _graph
from gateway.models.scan._report import ScanReport
from gateway.models.scan._settings import ScanSettings

# Tensors at most this big are filled into the model handed to the checker and shape
# inference (shape constants live here); bigger main-graph initializers become graph
# inputs of the same type and shape, so the child gets a small model.
_FILL_LIMIT = 1 << 20
MODEL_FILE = "model.onnx"
# Operators whose output shape comes from the *values* of an input.
_DATA_SHAPED = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample",
                          "Pad", "OneHot", "Col2Im", "CenterCropPad"})


def scan(version_dir: Path, settings: ScanSettings,
         files: Mapping[str, bytes] | None) -> ScanReport:
    report = ScanReport(path=str(version_dir))
    if files is None:
        # The one reader: what the CLI scans is what the gateway would read.
        try:
            files = _files.read_model_dir(version_dir).files
        except _files.ModelFilesError as err:
            report.add("high", err.code, str(err))
            return report
    for rel, data in files.items():
        if len(data) > settings.max_file_bytes:
            report.add("high", "file-too-large", f"{rel} is {len(data)} bytes, over the limit "
                       f"of {settings.max_file_bytes}", rel)
    data = files.get(MODEL_FILE)
    if data is None:
        report.add("high", "model-missing", f"no {MODEL_FILE} among the model's files")
        return report
    if len(data) > settings.max_file_bytes:
        return report
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as err:
        report.add("high", "parse-error", f"not a valid ONNX model file: {err}")
        return report
    if not model.HasField("graph"):
        report.add("high", "parse-error", "the file has no graph: not an ONNX model")
        return report
    _check_opsets(model, settings, report)
    _check_operators(model, settings, report)
    prepared = _check_tensors(model, files, settings, report)
    if prepared is not None:
        _analyse(prepared, settings, report)
    return report


def _check_opsets(model: ModelProto, settings: ScanSettings, report: ScanReport) -> None:
    local = {fn.domain for fn in model.functions}
    allowed = set(settings.allowed_domains)
    opsets = {}
    for op in model.opset_import:
        domain = "" if op.domain == "ai.onnx" else op.domain
        opsets[domain or "ai.onnx"] = op.version
        if domain == "":
            if not settings.min_opset <= op.version <= settings.max_opset:
                report.add("high", "opset-out-of-range",
                           f"ai.onnx opset {op.version} is outside the supported range "
                           f"{settings.min_opset}..{settings.max_opset}")
        elif domain == "ai.onnx.ml":
            if not 1 <= op.version <= settings.max_ml_opset:
                report.add("high", "opset-out-of-range",
                           f"ai.onnx.ml opset {op.version} is outside the supported range "
                           f"1..{settings.max_ml_opset}")
        elif domain not in allowed and domain not in local:
            report.add("high", "custom-op-domain",
                       f"the model imports custom-op domain {op.domain!r} (version {op.version}); "
                       f"allowed domains: standard ones"
                       + (f" and {', '.join(sorted(allowed))}" if allowed else " only"))
    report.figures["opsets"] = opsets


def _check_operators(model: ModelProto, settings: ScanSettings, report: ScanReport) -> None:
    local = {(fn.domain, fn.name) for fn in model.functions}
    allowed_domains = _graph.STANDARD_DOMAINS | set(settings.allowed_domains)
    allow_ops = set(settings.allowed_operators)
    seen: set[tuple[str, str]] = set()
    count = 0
    for where, node in _graph.nodes(model):
        count += 1
        key = (node.domain, node.op_type)
        if key in seen:
            continue
        seen.add(key)
        name = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        if key in local:
            continue  # a model-local function: its body is walked as nodes too
        if node.domain not in allowed_domains:
            report.add("high", "custom-op-domain",
                       f"operator {name} ({where}) is in custom-op domain {node.domain!r}, which "
                       "needs an operator library the gateway does not load")
            continue
        if allow_ops and node.op_type not in allow_ops and name not in allow_ops:
            report.add("high", "operator-not-allowed",
                       f"operator {name} ({where}) is not in the configured operator allow-list")
    report.figures["nodes"] = count


def _check_tensors(model: ModelProto, files: Mapping[str, bytes], settings: ScanSettings,
                   report: ScanReport) -> ModelProto | None:
    """Check declared sizes and external data; return the model prepared for analysis.

    None: a tensor's data is unusable and too big to stand in for (the model is refused
    already, so the checker and shape inference are skipped).
    """
    prepared = ModelProto()
    prepared.CopyFrom(model)
    initializer_bytes = 0
    largest = ("", 0)
    complete = True
    sizes = {name: len(data) for name, data in files.items()}
    for site in _tensors.tensors(prepared):
        t, where, main = site.tensor, site.where, site.main_initializer
        size = _tensors.declared_bytes(t)
        initializer_bytes += size
        if size > largest[1]:
            largest = (t.name, size)
        if any(d < 0 for d in t.dims):
            report.add("high", "initializer-size", f"tensor {t.name!r} ({where}) declares a "
                       f"negative dimension {list(t.dims)}")
            continue
        if size > settings.memory_limit_bytes:
            report.add("high", "huge-allocation",
                       f"tensor {t.name!r} ({where}) declares {list(t.dims)} "
                       f"{_dtype_name(t.data_type)} = {size} bytes, over the "
                       f"memory limit of {settings.memory_limit_bytes}")
        if _tensors.is_external(t) or len(t.external_data):
            data = None
            try:
                ref = _tensors.resolve_external(site, sizes)
            except _tensors.ExternalDataError as err:
                report.add("high", err.code, err.reason)
            else:
                data = files[ref.location][ref.offset:ref.offset + ref.length]
            # Main-graph tensors above the fill limit become graph inputs (no data needed);
            # the others are filled in with their bytes for the checker and shape inference.
            if size <= _FILL_LIMIT or not main:
                if data is None and size > _FILL_LIMIT:
                    complete = False  # already refused; do not invent gigabytes of zeros
                else:
                    _tensors.inline(t, data if data is not None else b"\0" * size)
        else:
            inline = _graph.inline_bytes(t)
            if inline is not None and inline != size:
                report.add("high", "initializer-size",
                           f"tensor {t.name!r} ({where}) declares {size} bytes but holds "
                           f"{inline}")
    report.figures["declared_tensor_bytes"] = initializer_bytes
    report.figures["largest_declared_tensor"] = {"name": largest[0], "bytes": largest[1]}
    if initializer_bytes > settings.memory_limit_bytes:
        report.add("high", "huge-allocation",
                   f"initializers and constants declare {initializer_bytes} bytes together, over "
                   f"the memory limit of {settings.memory_limit_bytes}")
    _initializers_to_inputs(prepared)
    return prepared if complete else None


def _initializers_to_inputs(model: ModelProto) -> None:
    """Turn big main-graph initializers into typed graph inputs (shape kept, data dropped)."""
    graph = model.graph
    inputs = {vi.name for vi in graph.input}
    keep = []
    for t in graph.initializer:
        big = _tensors.is_external(t) or len(t.raw_data) > _FILL_LIMIT \
            or _tensors.declared_bytes(t) > _FILL_LIMIT
        if not big:
            keep.append(t)
            continue
        if t.name not in inputs:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if len(keep) != len(graph.initializer):
        kept = [TensorProto.FromString(t.SerializeToString()) for t in keep]
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _analyse(model: ModelProto, settings: ScanSettings, report: ScanReport) -> None:
    """Run the checker and shape inference (contained), then bound memory from the shapes."""
    data = model.SerializeToString()
    if settings.isolate:
        result = _run_isolated(data, settings, report)
        if result is None:
            return
    else:
        result = _analysis.analyse(data, settings.max_batch)
    if result["checker"]:
        report.add("high", "checker", f"onnx.checker (full check) rejects the model: "
                   f"{_first_line(result['checker'])}")
    if result["inference"]:
        report.add("medium", "shape-inference",
                   f"shape inference failed: {_first_line(result['inference'])}")
    _check_values(result["values"], settings, report)


def _run_isolated(data: bytes, settings: ScanSettings,
                  report: ScanReport) -> dict[str, Any] | None:
    script = Path(_analysis.__file__)
    try:
        proc = subprocess.run(
            [sys.executable, "-I", str(script), str(settings.max_batch),
             str(settings.analysis_memory_bytes)],
            input=data, capture_output=True, timeout=settings.analysis_timeout, check=False)
    except subprocess.TimeoutExpired:
        report.add("high", "analysis-failed",
                   f"the ONNX checker and shape inference did not finish within "
                   f"{settings.analysis_timeout} s")
        return None
    if proc.returncode != 0:
        tail = _first_line(proc.stderr.decode(errors="replace").strip().splitlines()[-1]
                           if proc.stderr.strip() else f"exit status {proc.returncode}")
        report.add("high", "analysis-failed",
                   f"the ONNX checker or shape inference crashed or ran out of its "
                   f"{settings.analysis_memory_bytes}-byte memory limit: {tail}")
        return None
    return json.loads(proc.stdout)


def _check_values(values: list[list[Any]], settings: ScanSettings, report: ScanReport) -> None:
    largest = ("", 0)
    total = 0
    unbounded: dict[str, list[str]] = {}
    for where, name, elem_type, dims, op in values:
        size, exact = _graph.values_bytes(elem_type, dims)
        total += size
        if size > largest[1]:
            largest = (name, size)
        if size > settings.memory_limit_bytes:
            shown = ["?" if d is None else d for d in dims]
            report.add("high", "huge-allocation",
                       f"value {name!r} ({where}, made by {op or 'the graph'}) has inferred shape "
                       f"{shown} = {'at least ' if not exact else ''}{size} bytes at batch "
                       f"{settings.max_batch}, over the memory limit of "
                       f"{settings.memory_limit_bytes}")
        elif not exact and op in _DATA_SHAPED:
            unbounded.setdefault(op, []).append(name)
    for op, names in sorted(unbounded.items()):
        report.add("medium", "data-dependent-shape",
                   f"{op} output(s) {', '.join(map(repr, names[:5]))} take their shape from "
                   "input values, so their size cannot be bounded before running; the session "
                   "memory cap is the only limit")
    report.figures["largest_inferred_value"] = {"name": largest[0], "bytes": largest[1]}
    report.figures["inferred_value_bytes"] = total
    if total > settings.memory_limit_bytes and largest[1] <= settings.memory_limit_bytes:
        report.add("medium", "allocation-estimate",
                   f"all intermediate values together take {total} bytes at batch "
                   f"{settings.max_batch}, over the memory limit of {settings.memory_limit_bytes} "
                   "(ONNX Runtime reuses buffers, so the real peak is lower)")


def _first_line(text: str) -> str:
    """The message on one line (the checker spreads node dumps over several), capped."""
    line = " ".join(text.split())
    return line if len(line) <= 400 else line[:400] + "..."


def _dtype_name(elem_type: int) -> str:
    try:
        return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")
    except (KeyError, ValueError):
        return f"type {elem_type}"
