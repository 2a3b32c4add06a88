"""OIP tensor codec: request tensors to numpy arrays and back, validating everything.

Works on the protobuf messages by attribute only (no import of the generated code), so it
can be exercised with any wire-compatible message class. Every error is an
:class:`~gateway.errors.InvalidRequest` that names the tensor and what is wrong.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gateway.errors import InvalidRequest
from gateway.models import NUMPY_DTYPES, LoadedModel

if TYPE_CHECKING:  # the OIP messages load with the servicer, not with this module
    from gateway._proto.inference.grpc_service_pb2 import (
        InferParameter,
        ModelInferRequest,
        ModelInferResponse,
    )

#: OIP datatype -> the InferTensorContents field that carries it when sent typed.
#: FP16 has no typed field in the protocol: it travels only as raw bytes.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}
_ALL_CONTENTS_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values()) | {"bytes_contents"}))

#: Parameters of Triton's shared-memory extension, which the gateway does not offer.
_SHARED_MEMORY_PARAMS = ("shared_memory_region", "shared_memory_byte_size",
                         "shared_memory_offset")

_OIP_BY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
#: Native byte order is little-endian (OIP's): native dtypes are looked up as they are.
_LITTLE = sys.byteorder == "little"


#: The typed contents fields that hold numbers (bytes_contents holds byte strings).
_TYPED_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values())))


def request_size(request: ModelInferRequest) -> tuple[int, int, tuple[tuple[str, str], ...]]:
    """``(batch size, input bytes, longest names)`` over the whole request, without decoding.

    The first two are request attributes policy decides on before any tensor is decoded, so
    they must not be steerable: the batch size is the largest first dimension of any input
    (inputs that disagree where the model ties them are refused later, see
    :func:`check_batch`), and the bytes are those of every input, raw or typed (typed
    contents count as their values times the datatype's size, what they decode to). The
    last is the longest caller-chosen name of each kind (input and output names, datatypes,
    parameter keys) as ``(what, value)``, for the guard's length limit. One pass over the
    request's envelope.
    """
    batch = 0
    size = sum(map(len, request.raw_input_contents))
    name = datatype = key = ""
    for tensor in request.inputs:  # each field read once: every read costs a wrapper
        shape, tname, tdatatype = tensor.shape, tensor.name, tensor.datatype
        if shape:
            first = shape[0]
            if first > batch:
                batch = first
        if len(tname) > len(name):
            name = tname
        if len(tdatatype) > len(datatype):
            datatype = tdatatype
        if tensor.parameters:
            key = max(key, *tensor.parameters, key=len)
        if tensor.HasField("contents"):
            contents = tensor.contents
            dtype = NUMPY_DTYPES.get(tdatatype)
            itemsize = dtype.itemsize if dtype is not None else 8
            size += itemsize * sum(len(getattr(contents, f)) for f in _TYPED_FIELDS)
            size += sum(map(len, contents.bytes_contents))
    output = ""
    if request.outputs:
        for out in request.outputs:
            if len(out.name) > len(output):
                output = out.name
            if out.parameters:
                key = max(key, *out.parameters, key=len)
    if request.parameters:
        key = max(key, *request.parameters, key=len)
    return int(batch), size, (("input name", name), ("input datatype", datatype),
                              ("output name", output), ("parameter", key))


def check_batch(feeds: dict[str, np.ndarray], ties: dict[str, str]) -> None:
    """INVALID_ARGUMENT unless inputs whose first dimension the model names alike (ONNX
    ``dim_param``, e.g. ``batch``) agree on it; ``ties`` maps input name to that name."""
    seen: dict[str, tuple[str, int]] = {}
    for name, symbol in ties.items():
        array = feeds.get(name)
        if array is None or array.ndim == 0:
            continue
        first = seen.setdefault(symbol, (name, array.shape[0]))
        if first[1] != array.shape[0]:
            raise InvalidRequest(f"inputs '{first[0]}' and '{name}' disagree on dimension "
                                 f"'{symbol}' ({first[1]} and {array.shape[0]}); the model "
                                 f"requires them to be equal")


def decode_inputs(request: ModelInferRequest, model: LoadedModel, *,
                  max_elements: int) -> dict[str, np.ndarray]:
    """Validate the request's inputs against ``model`` and return them as numpy arrays."""
    raw = request.raw_input_contents
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if raw and typed:
        raise InvalidRequest("request mixes raw_input_contents with typed contents "
                             f"(input '{typed[0]}'); use one encoding for all inputs")
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"request has {len(request.inputs)} inputs but "
                             f"{len(raw)} raw_input_contents entries")
    feeds: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = model.input(name)
        if spec is None:
            raise InvalidRequest(f"input '{name}': model {model.name} has no such input; "
                                 f"inputs are {', '.join(s.name for s in model.inputs)}")
        if name in feeds:
            raise InvalidRequest(f"input '{name}' appears more than once")
        _reject_shared_memory(tensor.parameters, f"input '{name}'")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(f"input '{name}': datatype {tensor.datatype or '(empty)'} does "
                                 f"not match the model's {spec.datatype}")
        shape = _check_shape(name, tuple(tensor.shape), spec.shape, max_elements)
        count = math.prod(shape)
        if raw:
            feeds[name] = _from_raw(name, raw[index], spec.dtype, shape, count)
        else:
            feeds[name] = _from_contents(name, tensor, spec.datatype, shape, count)
    missing = [s.name for s in model.inputs if s.name not in feeds]
    if missing:
        raise InvalidRequest(f"missing input(s): {', '.join(missing)}")
    return feeds


def requested_outputs(request: ModelInferRequest, model: LoadedModel) -> list[str]:
    """Names of the outputs to compute, in the order requested (all, when none are named)."""
    names: list[str] = []
    known = {spec.name for spec in model.outputs}
    for out in request.outputs:
        if out.name not in known:
            raise InvalidRequest(f"requested output '{out.name}': model {model.name} has no such "
                                 f"output; outputs are {', '.join(sorted(known))}")
        if out.name in names:
            raise InvalidRequest(f"output '{out.name}' is requested more than once")
        _reject_shared_memory(out.parameters, f"output '{out.name}'")
        names.append(out.name)
    return names or [spec.name for spec in model.outputs]


def encode_outputs(response: ModelInferResponse, results: dict[str, np.ndarray],
                   order: Sequence[str]) -> None:
    """Append the outputs to ``response``, always as ``raw_output_contents`` (what tritonclient
    decodes), little-endian and row-major."""
    for name in order:
        array = np.ascontiguousarray(results[name])
        dtype = array.dtype
        datatype = _OIP_BY_DTYPE.get(dtype) if dtype.byteorder in "=<|" and _LITTLE \
            else _OIP_BY_DTYPE.get(dtype.newbyteorder("<"))
        if datatype is None:
            raise InvalidRequest(f"output '{name}' has dtype {array.dtype}, which OIP cannot carry")
        out = response.outputs.add()
        out.name = name
        out.datatype = datatype
        out.shape.extend(array.shape)
        response.raw_output_contents.append(array.astype(NUMPY_DTYPES[datatype], copy=False)
                                            .tobytes())


def _reject_shared_memory(parameters: Mapping[str, InferParameter], what: str) -> None:
    for key in _SHARED_MEMORY_PARAMS:
        if key in parameters:
            raise InvalidRequest(f"{what}: shared-memory parameter '{key}' is not supported; "
                                 "send tensors in the request")


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...],
                 max_elements: int) -> tuple[int, ...]:
    if len(shape) != len(expected):
        raise InvalidRequest(f"input '{name}': shape {list(shape)} has rank {len(shape)}, "
                             f"the model expects rank {len(expected)} {list(expected)}")
    for got, want in zip(shape, expected, strict=True):
        if got < 0:
            raise InvalidRequest(f"input '{name}': shape {list(shape)} has a negative dimension")
        if want >= 0 and got != want:
            raise InvalidRequest(f"input '{name}': shape {list(shape)} does not match the "
                                 f"model's {list(expected)} (-1 is any size)")
    if shape and shape[0] == 0 and expected[0] < 0:
        raise InvalidRequest(f"input '{name}': batch size 0; a request carries at least one "
                             f"row")
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidRequest(f"input '{name}': {count} elements exceed the limit of "
                             f"{max_elements}")
    return shape


def _from_raw(name: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...],
              count: int) -> np.ndarray:
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(f"input '{name}': {len(data)} bytes of raw contents, but shape "
                             f"{list(shape)} of {_OIP_BY_DTYPE[dtype]} needs {expected}")
    if dtype == np.bool_:
        as_bytes = np.frombuffer(data, dtype=np.uint8)
        if count and int(as_bytes.max()) > 1:
            raise InvalidRequest(f"input '{name}': BOOL bytes must be 0 or 1")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_contents(name: str, tensor: ModelInferRequest.InferInputTensor, datatype: str,
                   shape: tuple[int, ...], count: int) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"input '{name}': {datatype} has no typed contents field; "
                             "send it in raw_input_contents")
    contents = tensor.contents
    for other in _ALL_CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidRequest(f"input '{name}': {datatype} goes in contents.{field}, "
                                 f"but contents.{other} is set")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(f"input '{name}': {len(values)} values in contents.{field}, but "
                             f"shape {list(shape)} needs {count}")
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 4:
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidRequest(f"input '{name}': a value is outside the range of {datatype} "
                                 f"[{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)
