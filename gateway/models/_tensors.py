"""The one walker over every tensor an ONNX model can carry, and its external data.

A tensor's bytes may live outside ``model.onnx`` (onnx/docs/ExternalData.md): the tensor
names a ``location`` and ONNX Runtime opens that path itself, relative to the model file or,
for a model given as bytes, to the process's working directory. Tensors hide in many places
(onnx/onnx.proto): graph initializers and sparse initializers (values and indices), node
attributes of tensor, sparse-tensor, graph and list kinds (``Constant`` ``value`` and
``sparse_value``, ``If``/``Loop``/``Scan`` bodies), model-local functions (their nodes and
their attribute defaults) and training info. A check that misses one of them lets ONNX
Runtime read any file the gateway can read and serve it as the model's output, so this module
is the only place that enumerates them; the admission scanner and the loader both use it.

:func:`runtime_model` is what makes ONNX Runtime never open a path of the model: every
external tensor must name a file of the verified set, tensors other than main-graph
initializers get their bytes inlined from that set, and main-graph initializers are either
handed to ONNX Runtime from memory as arrays over those bytes (``add_external_initializers``,
replaced by name before anything is read) or, when their file was staged by the reader,
pointed at the staged copy: a name of ours (``f0``) in the private staging directory, which
ONNX Runtime is told to read external data from (``FOLDER_KEY``) and maps itself. Nothing is
left for ONNX Runtime to resolve anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, helper

from gateway.errors import ModelUnavailable
from gateway.models._files import FileData

if TYPE_CHECKING:
    import onnxruntime as ort

_DRIVE = re.compile(r"^[A-Za-z]:")
#: The keys ONNX defines for external data; anything else is refused rather than guessed at.
_KEYS = frozenset({"location", "offset", "length", "checksum"})


class ExternalDataError(ModelUnavailable):
    """A tensor's external data is outside the verified files, malformed or out of range.

    ``code`` is the admission scanner's finding code: ``external-data-outside``,
    ``external-data-missing``, ``external-data-range`` or ``external-data-malformed``.
    """

    def __init__(self, code: str, message: str, *, detail: str = "") -> None:
        super().__init__(f"{code}: {message}", detail=f"{code}: {detail or message}")
        self.code = code
        self.reason = message


@dataclass(frozen=True)
class TensorSite:
    """One tensor of the model and where it sits (``where`` is for people, ``kind`` too)."""

    where: str
    kind: str
    tensor: TensorProto
    #: A main-graph initializer: the only kind ONNX Runtime takes from memory by location.
    main_initializer: bool = False


@dataclass(frozen=True)
class ExternalRef:
    """A tensor whose bytes are ``files[location][offset:offset + length]``."""

    site: TensorSite
    location: str
    offset: int
    length: int


def parse_model(model_bytes: FileData) -> ModelProto:
    """Parse ``model.onnx`` bytes; a file that is not an ONNX model is a refusal, not a crash."""
    model = ModelProto()
    try:
        # protobuf's stubs say bytes; ParseFromString takes any buffer (large files are
        # read-only memoryviews, parsed without a copy).
        model.ParseFromString(model_bytes)  # type: ignore[arg-type]
    except (DecodeError, RecursionError, ValueError) as err:
        raise ModelUnavailable(f"model.onnx is not a valid ONNX model: {err}") from err
    if not model.HasField("graph"):
        raise ModelUnavailable("model.onnx has no graph: not an ONNX model")
    return model


# -- walking --------------------------------------------------------------------------------


def graphs(model: ModelProto) -> Iterator[tuple[str, GraphProto]]:
    """Every graph: the main graph, node subgraphs (also inside functions), training info."""
    stack: list[tuple[str, GraphProto]] = [("graph", model.graph)]
    for i, info in enumerate(model.training_info):
        if info.HasField("initialization"):
            stack.append((f"training_info[{i}].initialization", info.initialization))
        if info.HasField("algorithm"):
            stack.append((f"training_info[{i}].algorithm", info.algorithm))
    for fn in model.functions:
        where = f"function {fn.domain}:{fn.name}"
        for node in fn.node:
            stack.extend(_subgraphs(node.attribute, _label(where, node)))
        stack.extend(_subgraphs(fn.attribute_proto, f"{where} attribute defaults"))
    while stack:
        where, graph = stack.pop(0)
        yield where, graph
        for node in graph.node:
            stack.extend(_subgraphs(node.attribute, _label(where, node)))


def _label(where: str, node: NodeProto) -> str:
    return f"{where}/{node.op_type}:{node.name or (node.output[0] if node.output else '')}"


def _subgraphs(attributes: Iterable[AttributeProto], label: str) -> list[tuple[str, GraphProto]]:
    found: list[tuple[str, GraphProto]] = []
    for attr in attributes:
        if attr.HasField("g"):
            found.append((f"{label}.{attr.name}", attr.g))
        found.extend((f"{label}.{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return found


def nodes(model: ModelProto) -> Iterator[tuple[str, NodeProto]]:
    """Every node of every graph and of every model-local function."""
    for where, graph in graphs(model):
        for node in graph.node:
            yield where, node
    for fn in model.functions:
        for node in fn.node:
            yield f"function {fn.domain}:{fn.name}", node


def tensors(model: ModelProto) -> Iterator[TensorSite]:
    """Every tensor the model carries, wherever it is (see the module docstring)."""
    for where, graph in graphs(model):
        main = graph is model.graph
        for t in graph.initializer:
            yield TensorSite(where, f"initializer {t.name!r}", t, main_initializer=main)
        for st in graph.sparse_initializer:
            yield TensorSite(where, f"sparse initializer {st.values.name!r} values", st.values)
            yield TensorSite(where, f"sparse initializer {st.values.name!r} indices",
                             st.indices)
    for where, node in nodes(model):
        yield from _attribute_tensors(node.attribute, _label(where, node))
    for fn in model.functions:
        yield from _attribute_tensors(fn.attribute_proto,
                                      f"function {fn.domain}:{fn.name} attribute defaults")


def _attribute_tensors(attributes: Iterable[AttributeProto], label: str) -> Iterator[TensorSite]:
    for attr in attributes:
        what = f"attribute {attr.name!r}"
        if attr.HasField("t"):
            yield TensorSite(label, what, attr.t)
        for i, t in enumerate(attr.tensors):
            yield TensorSite(label, f"{what}[{i}]", t)
        sparse = [(what, attr.sparse_tensor)] if attr.HasField("sparse_tensor") else []
        sparse += [(f"{what}[{i}]", st) for i, st in enumerate(attr.sparse_tensors)]
        for name, st in sparse:
            yield TensorSite(label, f"{name} values", st.values)
            yield TensorSite(label, f"{name} indices", st.indices)


# -- external data ---------------------------------------------------------------------------


def declared_bytes(t: TensorProto) -> int:
    """Bytes the tensor's dims and element type need (negative dims count as zero)."""
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    return n * itemsize(t.data_type)


def itemsize(elem_type: int) -> int:
    """Bytes per element of an ONNX element type (strings counted as a pointer)."""
    try:
        return max(1, np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


def location_problem(location: str) -> str:
    """Why ``location`` is not a plain relative POSIX file name ('' when it is one).

    The strictest rule anywhere: no empty name or component, no ``.``/``..``, no absolute
    path, drive letter, backslash or NUL.
    """
    why = ""
    if not location:
        why = "is empty"
    elif "\x00" in location or "\\" in location:
        why = "contains a NUL or a backslash"
    elif location.startswith("/") or _DRIVE.match(location):
        why = "is an absolute path"
    elif any(part in ("", ".", "..") for part in location.split("/")):
        why = "has an empty, '.' or '..' component"
    return why


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def resolve_external(site: TensorSite, sizes: Mapping[str, int]) -> ExternalRef:
    """Where ``site``'s external data lies among the verified files (``sizes``: name ->
    length), or ExternalDataError."""
    t = site.tensor
    what = f"{site.kind} ({site.where})"
    info: dict[str, str] = {}
    for entry in t.external_data:
        # Two "location" entries could be read differently by two parsers: refuse both.
        if entry.key in info or entry.key not in _KEYS:
            raise ExternalDataError("external-data-malformed",
                                    f"{what}: external-data key {entry.key!r} is duplicated "
                                    "or unknown")
        info[entry.key] = entry.value
    if not is_external(t):
        raise ExternalDataError("external-data-malformed",
                                f"{what}: external-data entries on a tensor not stored "
                                "externally")
    if t.HasField("raw_data") or t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise ExternalDataError("external-data-malformed",
                                f"{what}: stored externally but also inline, or of a type "
                                "that cannot be")
    if "location" not in info:
        raise ExternalDataError("external-data-outside",
                                f"{what}: stored externally but names no location")
    location = info["location"]
    why = location_problem(location)
    if why:
        # The location itself goes to the log only: it may spell out a server path.
        raise ExternalDataError("external-data-outside", f"{what}: its external-data location "
                                f"{why}", detail=f"{what}: external-data location "
                                f"{location!r} {why}")
    available = sizes.get(location)
    if available is None:
        raise ExternalDataError("external-data-missing",
                                f"{what}: external-data file {location!r} is not a verified "
                                "file of the model directory")
    size = declared_bytes(t)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else size
    except ValueError:
        raise ExternalDataError("external-data-range", f"{what}: external-data offset or "
                                "length is not an integer") from None
    if offset < 0 or length < 0 or offset + length > available:
        raise ExternalDataError("external-data-range",
                                f"{what}: bytes {offset}..{offset + length} are outside "
                                f"{location} ({available} bytes)")
    if length != size:
        raise ExternalDataError("external-data-range",
                                f"{what}: declares {size} bytes but its external data is "
                                f"{length} bytes")
    return ExternalRef(site, location, offset, length)


def external_data(model: ModelProto, sizes: Mapping[str, int]
                  ) -> tuple[list[ExternalRef], list[ExternalDataError]]:
    """Every tensor's external data checked against the verified files' ``sizes``:
    (good refs, problems)."""
    refs: list[ExternalRef] = []
    problems: list[ExternalDataError] = []
    for site in tensors(model):
        if not (is_external(site.tensor) or len(site.tensor.external_data)):
            continue
        try:
            refs.append(resolve_external(site, sizes))
        except ExternalDataError as err:
            problems.append(err)
    return refs, problems


def inline(t: TensorProto, data: FileData) -> None:
    """Make ``t`` an ordinary tensor holding ``data`` (no location left to resolve)."""
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.raw_data = bytes(data)


def checked_external_data(model: ModelProto, sizes: Mapping[str, int]) -> list[ExternalRef]:
    """:func:`external_data`, raising the first problem (the loader's and verify's check)."""
    refs, problems = external_data(model, sizes)
    if problems:
        raise problems[0]
    return refs


@dataclass(frozen=True)
class RuntimeModel:
    """What ONNX Runtime gets: model bytes, main-graph initializers as arrays, and the
    staging directory the other main-graph initializers name files of.

    Each array is a view of the verified in-memory bytes (no copy), handed over with
    ``SessionOptions.add_external_initializers``; keep this object alive as long as the
    session. ``folder`` exists only until the session is built (the reader's staging).
    """

    model: bytes
    initializers: tuple[tuple[str, np.ndarray], ...]
    folder: str | None = None

    def session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        """An ONNX Runtime session over these bytes (ORT's own exceptions propagate).

        The arrays are used in place: keep this object alive as long as the session.
        """
        import onnxruntime as ort

        from gateway.models._staging import FOLDER_KEY

        if self.folder is not None:
            options.add_session_config_entry(FOLDER_KEY, self.folder)
        if self.initializers:
            options.add_external_initializers(
                [name for name, _ in self.initializers],
                [ort.OrtValue.ortvalue_from_numpy(array) for _, array in self.initializers])
        return ort.InferenceSession(self.model, sess_options=options,
                                    providers=["CPUExecutionProvider"])


#: The location main-graph initializers are left with: ONNX Runtime replaces each of them by
#: name before reading anything, so this never names a file; it only has to be a location.
IN_MEMORY = "<verified bytes in memory>"
# Element types ONNX Runtime takes as numpy arrays; tensors of other types are inlined.
_NUMPY_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})


def runtime_model(model_bytes: FileData, files: Mapping[str, FileData], *,
                  staged: Mapping[str, str] | None = None,
                  folder: str | None = None) -> RuntimeModel:
    """The model as ONNX Runtime may load it: no external reference it could resolve on disk
    outside ``folder``.

    Every tensor's external data must be a valid slice of a file in ``files`` (the verified
    bytes), else the first :class:`ExternalDataError` is raised. Main-graph initializers in a
    file of ``staged`` (verified name -> name of its staged copy in ``folder``) name that
    copy; other main-graph initializers become arrays over the bytes; every other external
    tensor is inlined.
    """
    model = parse_model(model_bytes)
    refs = checked_external_data(model, {name: len(data) for name, data in files.items()})
    staged = staged if folder is not None and staged else {}
    arrays: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for ref in refs:
        t = ref.site.tensor
        data = memoryview(files[ref.location])[ref.offset:ref.offset + ref.length]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)) \
            if t.data_type in _NUMPY_TYPES else None
        if ref.site.main_initializer and dtype is not None:
            if t.name in seen:
                # ONNX Runtime replaces by name: a second one would be left to its location.
                raise ExternalDataError("external-data-malformed", f"{ref.site.kind} "
                                        f"({ref.site.where}): two initializers of that name")
            seen.add(t.name)
            if ref.location in staged:
                # ONNX Runtime reads these bytes of our staged copy, already hashed.
                del t.external_data[:]
                for key, value in (("location", staged[ref.location]),
                                   ("offset", str(ref.offset)), ("length", str(ref.length))):
                    t.external_data.add(key=key, value=value)
                continue
            array = np.frombuffer(data, dtype=dtype).reshape(list(t.dims))
            if ref.offset % dtype.alignment:
                array = array.copy()  # ONNX Runtime's kernels expect aligned data
            arrays.append((t.name, array))
            del t.external_data[:]
            t.external_data.add(key="location", value=IN_MEMORY)
        else:
            inline(t, data)
    # The guarantee, checked on what is handed over rather than assumed from the loop above.
    named = {name for name, _ in arrays}
    ours = set(staged.values())
    for site in tensors(model):
        t = site.tensor
        where = {e.key: e.value for e in t.external_data}.get("location")
        if (is_external(t) or len(t.external_data)) and not (site.main_initializer and (
                (t.name in named and where == IN_MEMORY) or where in ours)):
            raise ExternalDataError("external-data-outside",  # pragma: no cover - invariant
                                    f"{site.kind} ({site.where}) still refers to a file")
    serialized = model.SerializeToString() if refs else bytes(model_bytes)
    return RuntimeModel(serialized, tuple(arrays), folder if ours else None)
