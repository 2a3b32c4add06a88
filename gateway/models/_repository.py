"""The model repository: ``<repository>/<name>/<version>/`` directories loaded into sessions.

Each version goes through the same pipeline, in this order, over bytes read once:
read (no symlinks) -> decrypt in memory -> verify signature -> admission scan ->
ONNX Runtime session. A version that fails any step is kept as REFUSED with the reason,
so ModelReady can say false and calls can say why, while other models keep serving.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.errors import GatewayError, InvalidRequest, ModelUnavailable
from gateway.models._datatypes import NUMPY_DTYPES, ORT_TO_OIP
from gateway.models._files import FileData
from gateway.models._messages import ort_message, redact
from gateway.models._metadata import METADATA_FILE, model_attributes, parse_metadata
from gateway.models._pipeline import OpenedVersion, Verify, open_version
from gateway.models._staging import Staging, open_staging, remove_stale
from gateway.models._tensors import RuntimeModel

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_VERSION = re.compile(r"[0-9]{1,9}\Z")

LOADED, UNLOADED, REFUSED = "LOADED", "UNLOADED", "REFUSED"

#: The desired state of models shared by every replica: its topic, and what a change does.
MODELS_TOPIC = "models"
LOAD, UNLOAD = "load", "unload"


def check_name(name: str, version: str) -> None:
    """ModelUnavailable unless ``name`` and ``version`` are a valid repository path."""
    if not (_NAME.match(name) and _VERSION.match(version)):
        raise ModelUnavailable(f"invalid model name or version: {name!r} {version!r}")


def model_key(name: str, version: str) -> str:
    """The key of a version in the ``models`` desired state."""
    return f"{name}/{version}"


def model_change(op: str, name: str, version: str, *, by: str = "") -> dict[str, object]:
    """The payload of a load or unload, checked before it is shared with every replica
    (``by``: who asked, kept with the desired state)."""
    if op not in (LOAD, UNLOAD):
        raise ValueError(f"unknown model change {op!r}")
    check_name(name, version)
    return {"op": op, "name": name, "version": version, "by": by}


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
    #: The verified bytes the session's initializers live in (ONNX Runtime uses them in place).
    runtime: RuntimeModel | None = field(default=None, repr=False)

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def run(self, feeds: Mapping[str, np.ndarray],
            output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the session; returns the named outputs (all outputs when the list is empty)."""
        names = output_names or [spec.name for spec in self.outputs]
        try:
            results = self.session.run(names, dict(feeds))
        except Exception as err:  # ORT's own types; its text may hold source locations
            log.warning("model %s/%s: ONNX Runtime run failed: %s", self.name, self.version, err)
            raise InvalidRequest(ort_message(err)) from err
        return dict(zip(names, results, strict=True))


@dataclass(frozen=True)
class ModelEntry:
    """What the repository knows of one version: its state, and why if it is refused."""

    name: str
    version: str
    state: str
    #: Why it is refused or unloaded, as a caller may read it (no server paths).
    reason: str = ""
    model: LoadedModel | None = None
    #: The full reason (paths, library messages) for the log and the audit record.
    detail: str = ""


#: Called with (event kind, fields) for every load, refusal and unload: the server audits them.
EventSink = Callable[[str, dict], None]


class ModelRepository:
    """All versions under the repository directory; lookups are lock-free snapshot reads."""

    def __init__(
        self,
        root: Path,
        *,
        session_options: Callable[[], ort.SessionOptions],
        verify: Verify | None,
        scan: Callable[[Path, dict[str, FileData]], None] | None = None,
        decrypt: Callable[[FileData], bytes] | None = None,
        on_event: EventSink | None = None,
        max_model_bytes: int = 2 * 1024**3,
        staging_root: Path | None = None,
    ) -> None:
        """``staging_root``: where large files are staged for ONNX Runtime to map
        (:mod:`gateway.models._staging`; None: every file is loaded from memory). Staging
        directories of dead processes there are removed now."""
        self._root = root
        self._session_options = session_options
        self._verify = verify
        self._scan = scan
        self._decrypt = decrypt
        self._on_event = on_event or (lambda kind, fields: None)
        self._max_bytes = max_model_bytes
        self._staging_root = staging_root
        remove_stale(self._staging_root)
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._latest: dict[str, ModelEntry] = {}
        self._write_lock = threading.Lock()

    # -- discovery and loading -------------------------------------------------------------

    def discover(self) -> list[tuple[str, str]]:
        """Every ``(name, version)`` directory present in the repository, sorted."""
        found: list[tuple[str, str]] = []
        if not self._root.is_dir():
            return found
        for model_dir in sorted(self._root.iterdir()):
            if not (model_dir.is_dir() and _NAME.match(model_dir.name)):
                continue
            versions = [v.name for v in model_dir.iterdir()
                        if v.is_dir() and _VERSION.match(v.name)]
            # Ascending by number: rollback protection admits versions in this order.
            found.extend((model_dir.name, v) for v in sorted(versions, key=int))
        return found

    def load_all(self, *, skip_known: bool = False) -> list[ModelEntry]:
        """Load every version found; refusals are recorded, not raised. ``skip_known``: only
        versions without an entry yet (those the desired state has not already decided)."""
        return [self.load(name, version) for name, version in self.discover()
                if not (skip_known and (name, version) in self._entries)]

    def apply_change(self, key: str, payload: Mapping[str, object]) -> str | None:
        """The handler of the ``models`` desired state (:mod:`gateway.models._desired`):
        load (verify-then-load, as :meth:`load`) or unload one version; None when done,
        else why not (a refusal's caller-safe reason)."""
        op, name, version = payload.get("op"), payload.get("name"), payload.get("version")
        if not isinstance(name, str) or not isinstance(version, str) \
                or key != model_key(name, version):
            return f"malformed model change for {key!r}; not applied"
        try:
            if op == LOAD:
                entry = self.load(name, version)
                return None if entry.state == LOADED else f"refused: {entry.reason}"
            if op == UNLOAD:
                self.unload(name, version)
                return None
        except GatewayError as err:
            return str(err)
        return f"unknown model change {op!r} for {key!r}; not applied"

    def load(self, name: str, version: str) -> ModelEntry:
        """(Re)load one version through the whole pipeline; returns its new entry."""
        check_name(name, version)
        directory = self._root / name / version
        try:
            model = self._build(name, version, directory)
        except GatewayError as err:
            return self._refuse(name, version, str(err), getattr(err, "detail", ""))
        entry = ModelEntry(name, version, LOADED, model=model)
        self._install(entry)
        self._on_event("model_load", {"model": {"name": name, "version": version,
                                                "digest": model.digest},
                                      "signer": model.signer, "trust_rule": model.trust_rule})
        return entry

    def _refuse(self, name: str, version: str, reason: str, detail: str = "") -> ModelEntry:
        detail = detail or reason
        reason = redact(reason)  # the net under caller-safe messages: no server path leaves
        entry = ModelEntry(name, version, REFUSED, reason=reason, detail=detail)
        self._install(entry)
        self._on_event("model_refused", {"model": {"name": name, "version": version},
                                         "reason": reason, "detail": detail})
        log.warning("model %s/%s refused: %s", name, version, detail)
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
                # Every check of a load, the bytes not kept (nothing is built from them).
                opened = self._open(entry.name, entry.version, directory, load=False)
            except GatewayError as err:
                changed.append(self._refuse(entry.name, entry.version,
                                            f"re-verification failed: {err}",
                                            getattr(err, "detail", "")))
                continue
            if entry.model is not None and opened.digest != entry.model.digest:
                changed.append(self.load(entry.name, entry.version))
        return changed

    def _open(self, name: str, version: str, directory: Path, *, load: bool = True,
              stage: Staging | None = None) -> OpenedVersion:
        if (self._root / name).is_symlink():
            # The reader refuses links inside the version directory; the model directory
            # above it must not lead out of the repository either.
            raise ModelUnavailable(f"the directory of model {name!r} is a symbolic link; "
                                   "refused", detail=f"{self._root / name} is a symbolic link")
        return open_version(directory, name, version, verify=self._verify,
                            decrypt=self._decrypt, max_bytes=self._max_bytes, load=load,
                            stage=stage)

    def _build(self, name: str, version: str, directory: Path) -> LoadedModel:
        # The staged copies live until the session exists, on every path out of here.
        with open_staging(self._staging_root) as stage:
            opened = self._open(name, version, directory, stage=stage)
            files = opened.files
            try:
                if self._scan is not None:
                    self._scan(directory, files)
                metadata = files.get(METADATA_FILE)
                owner, labels = parse_metadata(None if metadata is None else bytes(metadata))
                # _open loads (open_version's load=True), so the runtime model is there.
                assert opened.runtime is not None
                session = self._session(name, version, opened.runtime)
            except GatewayError:
                # Staged files may still be being hashed: a digest mismatch is the reason
                # (as it is when every digest is checked first), else this error.
                opened.complete()
                raise
        # Every digest verified (the staged files' too) before the session is served; on a
        # mismatch this raises, and the session built meanwhile is dropped unused.
        opened = opened.complete()
        inputs = _specs(session.get_inputs(), "input")
        outputs = _specs(session.get_outputs(), "output")
        extras = {k: bytes(v) for k, v in files.items() if k == PROFILE_FILE}
        attributes = model_attributes(name, version, owner, labels)
        return LoadedModel(name=name, version=version, digest=opened.digest,
                           signer=opened.signer, trust_rule=opened.rule, owner=owner,
                           labels=labels, inputs=inputs, outputs=outputs,
                           extras=extras, session=session, attributes=attributes,
                           runtime=opened.runtime)

    def _session(self, name: str, version: str, runtime: RuntimeModel) -> ort.InferenceSession:
        """The session, from memory only: ``runtime`` has no reference ONNX Runtime could
        resolve on disk (see :func:`gateway.models._tensors.runtime_model`)."""
        try:
            # Arrays used in place by ONNX Runtime: LoadedModel keeps `runtime` alive.
            return runtime.session(self._session_options())
        except Exception as err:  # ORT raises its own exception types for bad graphs
            raise ModelUnavailable(f"ONNX Runtime cannot load the model: {ort_message(err)}",
                                   detail=f"{name}/{version}: ONNX Runtime cannot load the "
                                   f"model: {err}") from err

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



def _specs(args: list, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = ORT_TO_OIP.get(arg.type)
        if datatype is None:
            raise ModelUnavailable(f"{kind} '{arg.name}' has type {arg.type}, which the "
                                   "gateway does not serve")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        specs.append(TensorSpec(arg.name, datatype, shape))
    return tuple(specs)
