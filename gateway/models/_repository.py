"""The model repository: ``<repository>/<name>/<version>/`` directories loaded into sessions.

Each version goes through the same pipeline, in this order, over bytes read once:
read (no symlinks) -> decrypt in memory -> verify signature -> admission scan ->
ONNX Runtime session. A version that fails any step is kept as REFUSED with the reason,
so ModelReady can say false and calls can say why, while other models keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from gateway.errors import GatewayError, ModelUnavailable
from gateway.models._datatypes import NUMPY_DTYPES, ORT_TO_OIP
from gateway.models._files import ENCRYPTED_SUFFIX, read_version_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.toml"
PROFILE_FILE = "profile.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^[0-9]{1,9}$")

LOADED, UNLOADED, REFUSED = "LOADED", "UNLOADED", "REFUSED"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output as OIP describes it (dynamic dims are -1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]


@dataclass(frozen=True)
class LoadedModel:
    """A verified model version with its ONNX Runtime session, ready to run."""

    name: str
    version: str
    digest: str
    #: Who signed it (key hint or certificate identity) and the trust rule that admitted it.
    signer: str
    trust_rule: str
    owner: str
    labels: Mapping[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: Raw bytes of auxiliary verified files (e.g. ``profile.json``), by relative name.
    extras: Mapping[str, bytes]
    session: ort.InferenceSession = field(repr=False)
    #: ABAC attributes of this model, computed once.
    attributes: Mapping[str, object] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def run(self, feeds: Mapping[str, np.ndarray],
            output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the session; returns the named outputs (all outputs when the list is empty)."""
        names = output_names or [spec.name for spec in self.outputs]
        results = self.session.run(names, dict(feeds))
        return dict(zip(names, results, strict=True))


@dataclass(frozen=True)
class ModelEntry:
    """What the repository knows of one version: its state, and why if it is refused."""

    name: str
    version: str
    state: str
    reason: str = ""
    model: LoadedModel | None = None


#: Called with (event kind, fields) for every load, refusal and unload: the server audits them.
EventSink = Callable[[str, dict], None]


class ModelRepository:
    """All versions under the repository directory; lookups are lock-free snapshot reads."""

    def __init__(
        self,
        root: Path,
        *,
        session_options: Callable[[], ort.SessionOptions],
        verify: Callable[[str, dict[str, bytes], bytes | None],
                         tuple[str, str, str] | None] | None,
        scan: Callable[[Path, dict[str, bytes]], None] | None = None,
        decrypt: Callable[[bytes], bytes] | None = None,
        on_event: EventSink | None = None,
        max_model_bytes: int = 2 * 1024**3,
    ) -> None:
        self._root = root
        self._session_options = session_options
        self._verify = verify
        self._scan = scan
        self._decrypt = decrypt
        self._on_event = on_event or (lambda kind, fields: None)
        self._max_bytes = max_model_bytes
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._latest: dict[str, ModelEntry] = {}
        self._write_lock = threading.Lock()

    # -- discovery and loading -------------------------------------------------------------

    def discover(self) -> list[tuple[str, str]]:
        """Every ``(name, version)`` directory present in the repository, sorted."""
        found = []
        if not self._root.is_dir():
            return found
        for model_dir in sorted(self._root.iterdir()):
            if not (model_dir.is_dir() and _NAME.match(model_dir.name)):
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if version_dir.is_dir() and _VERSION.match(version_dir.name):
                    found.append((model_dir.name, version_dir.name))
        return found

    def load_all(self) -> list[ModelEntry]:
        """Load every version found; refusals are recorded, not raised."""
        return [self.load(name, version) for name, version in self.discover()]

    def load(self, name: str, version: str) -> ModelEntry:
        """(Re)load one version through the whole pipeline; returns its new entry."""
        if not (_NAME.match(name) and _VERSION.match(version)):
            raise ModelUnavailable(f"invalid model name or version: {name!r} {version!r}")
        directory = self._root / name / version
        try:
            model = self._build(name, version, directory)
        except GatewayError as err:
            return self._refuse(name, version, str(err))
        entry = ModelEntry(name, version, LOADED, model=model)
        self._install(entry)
        self._on_event("model_load", {"model": {"name": name, "version": version,
                                                "digest": model.digest},
                                      "signer": model.signer, "trust_rule": model.trust_rule})
        return entry

    def _refuse(self, name: str, version: str, reason: str) -> ModelEntry:
        entry = ModelEntry(name, version, REFUSED, reason=reason)
        self._install(entry)
        self._on_event("model_refused", {"model": {"name": name, "version": version},
                                         "reason": reason})
        log.warning("model %s/%s refused: %s", name, version, reason)
        return entry

    def unload(self, name: str, version: str, reason: str = "unloaded by request") -> ModelEntry:
        """Stop serving one version (its session is released when the last call ends)."""
        entry = ModelEntry(name, version, UNLOADED, reason=reason)
        self._install(entry)
        self._on_event("model_unload", {"model": {"name": name, "version": version},
                                        "reason": reason})
        return entry

    def _install(self, entry: ModelEntry) -> None:
        # Copy-on-write: readers keep using the dict they fetched; one assignment publishes.
        with self._write_lock:
            entries = dict(self._entries)
            entries[(entry.name, entry.version)] = entry
            latest: dict[str, ModelEntry] = {}
            for (name, _version), e in sorted(entries.items(),
                                              key=lambda kv: (kv[0][0], int(kv[0][1]))):
                if e.state == LOADED or name not in latest or latest[name].state != LOADED:
                    latest[name] = e
            self._entries, self._latest = entries, latest

    def reverify(self) -> list[ModelEntry]:
        """Re-read and re-verify every loaded version; returns the entries that changed.

        A version whose files no longer verify is taken out of service (REFUSED, audited);
        one that verifies with a new digest (re-signed new content) is reloaded. Other
        models keep serving throughout: each version is swapped in or out on its own.
        """
        changed = []
        for entry in [e for e in self._entries.values() if e.state == LOADED]:
            directory = self._root / entry.name / entry.version
            try:
                _, digest, _, _ = self._verified_files(entry.name, entry.version, directory)
            except GatewayError as err:
                changed.append(self._refuse(entry.name, entry.version,
                                            f"re-verification failed: {err}"))
                continue
            if entry.model is not None and digest != entry.model.digest:
                changed.append(self.load(entry.name, entry.version))
        return changed

    def _verified_files(self, name: str, version: str,
                        directory: Path) -> tuple[dict[str, bytes], str, str, str]:
        if (self._root / name).is_symlink():
            # The reader refuses links inside the version directory; the model directory
            # above it must not lead out of the repository either.
            raise ModelUnavailable(f"{self._root / name} is a symbolic link; refused")
        files, signature = read_version_dir(directory, max_bytes=self._max_bytes)
        files = self._decrypted(files)
        if MODEL_FILE not in files:
            raise ModelUnavailable(f"{name}/{version}: no {MODEL_FILE} in {directory}")
        verified = self._verify(name, files, signature) if self._verify is not None else None
        if verified is None:
            return files, _files_digest(files), "unverified", ""
        return files, *verified

    def _build(self, name: str, version: str, directory: Path) -> LoadedModel:
        files, digest, signer, rule = self._verified_files(name, version, directory)
        if self._scan is not None:
            self._scan(directory, files)
        owner, labels = _parse_metadata(name, version, files.get(METADATA_FILE))
        session = self._session(name, version, files)
        inputs = _specs(name, version, session.get_inputs(), "input")
        outputs = _specs(name, version, session.get_outputs(), "output")
        extras = {k: v for k, v in files.items() if k == PROFILE_FILE}
        attributes = {"model.name": name, "model.version": version, "model.owner": owner,
                      **{f"model.labels.{k}": v for k, v in labels.items()}}
        return LoadedModel(name=name, version=version, digest=digest, signer=signer,
                           trust_rule=rule, owner=owner, labels=labels, inputs=inputs,
                           outputs=outputs,
                           extras=extras, session=session, attributes=attributes)

    def _decrypted(self, files: dict[str, bytes]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for rel, data in files.items():
            if rel.endswith(ENCRYPTED_SUFFIX):
                if self._decrypt is None:
                    raise ModelUnavailable(f"{rel} is encrypted and no key-encryption key "
                                           "is configured ([signing] kek_file or kek_env)")
                plain_name = rel[: -len(ENCRYPTED_SUFFIX)]
                if plain_name in files:
                    raise ModelUnavailable(f"both {rel} and {plain_name} are present")
                out[plain_name] = self._decrypt(data)
            else:
                out[rel] = data
        return out

    def _session(self, name: str, version: str, files: dict[str, bytes]) -> ort.InferenceSession:
        options = self._session_options()
        externals = _external_data_names(files[MODEL_FILE])
        missing = [loc for loc in externals if loc not in files]
        if missing:
            raise ModelUnavailable(f"{name}/{version}: external data {', '.join(missing)} is not "
                                   "a file of the model directory")
        if externals:
            # Served from the verified in-memory bytes, never resolved against a path.
            buffers = [files[loc] for loc in externals]
            options.add_external_initializers_from_files_in_memory(
                externals, buffers, [len(b) for b in buffers])
        try:
            return ort.InferenceSession(files[MODEL_FILE], sess_options=options,
                                        providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for bad graphs
            raise ModelUnavailable(f"{name}/{version}: ONNX Runtime cannot load the model: "
                                   f"{_first_line(err)}") from err

    # -- lookups (request path) ------------------------------------------------------------

    def entry(self, name: str, version: str = "") -> ModelEntry | None:
        """The entry for ``name`` at ``version`` ("" means the newest loaded version)."""
        if version:
            return self._entries.get((name, version))
        return self._latest.get(name)

    def get(self, name: str, version: str = "") -> LoadedModel | None:
        """The loaded model, or None when it is unknown, refused or unloaded."""
        entry = self.entry(name, version)
        return entry.model if entry is not None else None

    def versions(self, name: str) -> list[str]:
        return sorted((v for (n, v) in self._entries if n == name), key=int)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[k] for k in sorted(self._entries)]



def _files_digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()


def _parse_metadata(name: str, version: str, data: bytes | None) -> tuple[str, dict[str, str]]:
    if data is None:
        return "", {}
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ModelUnavailable(f"{name}/{version}: {METADATA_FILE} is not valid TOML: {err}") \
            from err
    owner = table.get("owner", "")
    labels = table.get("labels", {})
    if not isinstance(owner, str) or not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ModelUnavailable(f"{name}/{version}: {METADATA_FILE}: owner must be a string and "
                               "[labels] a table of strings")
    return owner, dict(sorted(labels.items()))


def _specs(name: str, version: str, args: list, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = ORT_TO_OIP.get(arg.type)
        if datatype is None:
            raise ModelUnavailable(f"{name}/{version}: {kind} '{arg.name}' has type {arg.type}, "
                                   "which the gateway does not serve")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        specs.append(TensorSpec(arg.name, datatype, shape))
    return tuple(specs)


def _external_data_names(model_bytes: bytes) -> list[str]:
    """Locations of external-data tensors, each checked to be a plain relative file name."""
    try:
        proto = onnx.ModelProto.FromString(model_bytes)
    except DecodeError as err:
        raise ModelUnavailable(f"model.onnx is not a valid ONNX protobuf: {_first_line(err)}") \
            from err
    names: list[str] = []
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        parts = location.replace("\\", "/").split("/")
        if location.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ModelUnavailable(f"external data location {location!r} leaves the model "
                                   "directory; refused")
        if location not in names:
            names.append(location)
    return names


def _all_tensors(graph) -> Iterable:
    """Initializers and constant tensors of a graph and of every subgraph in it."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__

