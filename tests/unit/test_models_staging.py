"""Large weight files are staged: copied into a private directory, hashed there, mapped by
ONNX Runtime, and gone once the session exists (gateway/models/_staging.py)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from gateway.models import LOADED, REFUSED, ModelRepository, _files
from gateway.models import _staging as staging
from gateway.models.signing import SigningSettings, TrustRule, sign_model, verifier
from tests.support.signing import LARGE_MODEL_SHAPE, write_key, write_large_model

ROWS, COLS = LARGE_MODEL_SHAPE
assert ROWS * COLS * 4 > staging.STAGE_MIN_BYTES  # the weights are staged


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _signed(tmp_path: Path, scan=None) -> tuple[Path, np.ndarray, ModelRepository, list[str]]:
    version = tmp_path / "models" / "big" / "1"
    w = write_large_model(version)
    key, pub = write_key(tmp_path, "k")
    sign_model(version, key=key)
    (tmp_path / "stage").mkdir()
    events: list[str] = []
    repo = ModelRepository(
        tmp_path / "models", session_options=_options,
        verify=verifier(SigningSettings(trust=(TrustRule(name="t", pubkey=pub),))),
        staging_root=tmp_path / "stage", scan=scan,
        on_event=lambda kind, fields: events.append(kind))
    return version, w, repo, events


X = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)


def test_a_large_weight_file_is_staged_privately_served_as_plain_ort_and_then_removed(tmp_path):
    seen: list[tuple[str, int, list[tuple[str, int, bytes]]]] = []

    def look(directory: Path, files: dict[str, _files.FileData]) -> None:
        # The admission scan runs after the copy and before the session: what is staged now.
        (folder,) = (tmp_path / "stage").iterdir()
        seen.append((folder.name, stat.S_IMODE(folder.stat().st_mode),
                     [(f.name, stat.S_IMODE(f.stat().st_mode), f.read_bytes())
                      for f in folder.iterdir()]))
        assert files["weights.bin"] == (directory / "weights.bin").read_bytes()

    version, w, repo, _ = _signed(tmp_path, scan=look)
    entry = repo.load("big", "1")
    assert entry.state == LOADED, entry.detail
    ((name, mode, staged),) = seen
    assert name.startswith(f"gw-stage-{os.getpid()}-") and mode == 0o700
    assert staged == [("f0", 0o600, (version / "weights.bin").read_bytes())]
    assert list((tmp_path / "stage").iterdir()) == []  # nothing left once the session exists
    plain = ort.InferenceSession(str(version / "model.onnx"), _options(),
                                 providers=["CPUExecutionProvider"])
    expected = plain.run(None, {"x": X})[0]
    assert entry.model is not None
    got = entry.model.run({"x": X}, [])["y"]
    assert np.array_equal(got, expected) and np.allclose(got, X @ w, rtol=1e-4, atol=1e-4)
    # The session holds no array of ours: ONNX Runtime mapped the staged copy.
    assert entry.model.runtime is not None and entry.model.runtime.initializers == ()


def test_the_reader_hashes_the_staged_copy_and_returns_a_read_only_view_of_it(tmp_path):
    version = tmp_path / "v"
    write_large_model(version)
    raw = (version / "weights.bin").read_bytes()
    with staging.Staging(tmp_path) as stage:
        read = _files.read_model_dir(version, stage=stage)
        assert read.staged == {"weights.bin": "f0"}
        assert Path(stage.folder, "f0").read_bytes() == raw
    assert read.digests["weights.bin"] == hashlib.sha256(raw).hexdigest()
    data = read.files["weights.bin"]
    assert isinstance(data, memoryview) and data.readonly and data == raw
    assert "model.onnx" not in read.staged  # small files stay in memory
    assert not Path(stage.folder).exists()


def test_the_original_changed_after_staging_cannot_reach_the_session(tmp_path):
    def tamper(directory: Path, files: dict[str, _files.FileData]) -> None:
        # Between the copy (hashed, verified) and the session: rewrite the original in place.
        with open(directory / "weights.bin", "r+b") as f:
            f.seek(64)
            f.write(np.full(ROWS * COLS, 1000.0, np.float32).tobytes())

    version, w, repo, _ = _signed(tmp_path, scan=tamper)
    entry = repo.load("big", "1")
    assert entry.state == LOADED and entry.model is not None
    got = entry.model.run({"x": X}, [])["y"]
    assert np.frombuffer((version / "weights.bin").read_bytes(), np.float32, 1, 64)[0] == 1000
    assert np.allclose(got, X @ w, rtol=1e-4, atol=1e-4)  # the signed weights, not 1000s
    assert not np.allclose(got, X @ np.full_like(w, 1000.0))


def test_a_staged_file_whose_digest_does_not_match_the_signature_refuses_the_load(tmp_path):
    version, _, repo, events = _signed(tmp_path)
    with open(version / "weights.bin", "r+b") as f:  # changed after signing
        f.seek(1 << 20)
        f.write(b"\xff" * 8)
    entry = repo.load("big", "1")
    assert entry.state == REFUSED and "weights.bin" in entry.reason
    assert events == ["model_refused"]
    assert list((tmp_path / "stage").iterdir()) == []


def test_a_hostile_reference_beside_a_staged_file_is_refused_and_nothing_is_left(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 16)
    leak = TensorProto(name="leak", data_type=TensorProto.UINT8, dims=[16],
                       data_location=TensorProto.EXTERNAL)
    leak.external_data.add(key="location", value=str(secret))
    write_large_model(tmp_path / "models" / "big" / "1", extra=leak)
    (tmp_path / "stage").mkdir()
    repo = ModelRepository(tmp_path / "models", session_options=_options, verify=None,
                           staging_root=tmp_path / "stage")
    entry = repo.load("big", "1")
    assert entry.state == REFUSED and "external-data-outside" in entry.reason
    assert str(secret) not in entry.reason
    assert list((tmp_path / "stage").iterdir()) == []


def test_stale_staging_directories_of_dead_processes_are_removed_at_start(tmp_path):
    root = tmp_path / "stage"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = root / f"gw-stage-{dead_pid}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "f0").write_bytes(b"left by a crash")
    live = root / f"gw-stage-{os.getpid()}-xyz789"
    live.mkdir()
    (live / "f0").write_bytes(b"being loaded")
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "precious").write_bytes(b"not ours to remove")
    os.symlink(keep, root / f"gw-stage-{dead_pid}-link")  # a link is never followed
    other = root / "unrelated"
    other.mkdir()
    ModelRepository(tmp_path / "models", session_options=_options, verify=None,
                    staging_root=root)
    assert not stale.exists()
    assert (live / "f0").read_bytes() == b"being loaded"
    assert (keep / "precious").exists() and (root / f"gw-stage-{dead_pid}-link").is_symlink()
    assert other.exists()


def test_staging_is_used_only_when_onnx_runtime_honours_the_folder_option(monkeypatch):
    assert staging.folder_key_honoured()
    # A runtime that ignored the option would resolve the location against the working
    # directory: the probe fails, and models then load from memory.
    monkeypatch.setattr(staging, "FOLDER_KEY", "session.no_such_option")
    assert not staging.folder_key_honoured.__wrapped__()


@pytest.mark.parametrize("stage_files", [False, True])
def test_staging_off_or_impossible_loads_from_memory(tmp_path, stage_files):
    version = tmp_path / "models" / "big" / "1"
    w = write_large_model(version)
    root = tmp_path / "stage" if stage_files else None  # True: a root that does not exist
    repo = ModelRepository(tmp_path / "models", session_options=_options, verify=None,
                           staging_root=root)
    entry = repo.load("big", "1")
    assert entry.state == LOADED and entry.model is not None
    assert entry.model.runtime is not None and len(entry.model.runtime.initializers) == 1
    assert np.allclose(entry.model.run({"x": X}, [])["y"], X @ w, rtol=1e-4, atol=1e-4)


def test_no_room_to_stage_falls_back_to_memory_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    version = tmp_path / "models" / "big" / "1"
    w = write_large_model(version)
    (tmp_path / "stage").mkdir()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.os, "sendfile", full)
    repo = ModelRepository(tmp_path / "models", session_options=_options, verify=None,
                           staging_root=tmp_path / "stage")
    entry = repo.load("big", "1")
    assert entry.state == LOADED and entry.model is not None and entry.model.runtime is not None
    assert len(entry.model.runtime.initializers) == 1  # read into memory instead
    assert np.allclose(entry.model.run({"x": X}, [])["y"], X @ w, rtol=1e-4, atol=1e-4)
    assert list((tmp_path / "stage").iterdir()) == []


def _reason_without_staging(tmp_path: Path, scan=None) -> tuple[str, list[str]]:
    """The refusal of the same directory loaded with every digest checked first."""
    pub = tmp_path / "k.pub"
    events: list[str] = []
    repo = ModelRepository(
        tmp_path / "models", session_options=_options,
        verify=verifier(SigningSettings(trust=(TrustRule(name="t", pubkey=pub),))),
        scan=scan, on_event=lambda kind, fields: events.append(kind))
    entry = repo.load("big", "1")
    assert entry.state == REFUSED
    return entry.reason, events


def test_a_staged_digest_mismatch_refuses_with_the_serial_reason_even_if_the_scan_refuses(
        tmp_path, monkeypatch):
    from gateway.errors import ModelUnavailable
    from gateway.models._tensors import RuntimeModel

    def refuse(directory: Path, files: dict[str, _files.FileData]) -> None:
        raise ModelUnavailable("the scanner refuses this model")

    version, _, repo, events = _signed(tmp_path)
    with open(version / "weights.bin", "r+b") as f:  # changed after signing
        f.seek(4 << 20)
        f.write(b"\xff" * 8)
    built = []
    real = RuntimeModel.session
    monkeypatch.setattr(RuntimeModel, "session", lambda self, o: built.append(1) or real(self, o))
    staged = repo.load("big", "1")
    assert built == [1]  # the session was built while the copy was hashed, then dropped
    assert staged.state == REFUSED and repo.get("big", "1") is None
    assert "files changed since signing: weights.bin" in staged.reason
    assert (staged.reason, events) == _reason_without_staging(tmp_path)
    repo._scan = refuse  # the mismatch is still the reason, as when digests come first
    assert repo.load("big", "1").reason == _reason_without_staging(tmp_path, refuse)[0]
    assert list((tmp_path / "stage").iterdir()) == []


def test_onnx_runtime_never_sees_a_graph_that_does_not_verify(tmp_path, monkeypatch):
    from gateway.models._tensors import RuntimeModel

    version, _, repo, _ = _signed(tmp_path)
    with open(version / "model.onnx", "ab") as f:  # the graph changed after signing
        f.write(b"\x00")
    monkeypatch.setattr(RuntimeModel, "session", lambda *a: pytest.fail("session built"))
    entry = repo.load("big", "1")
    assert entry.state == REFUSED and "model.onnx" in entry.reason
    assert list((tmp_path / "stage").iterdir()) == []
    with open(version / "weights.bin", "r+b") as f:  # the weights too: both are named, as
        f.write(b"\xff" * 8)                         # when every digest is checked first
    entry = repo.load("big", "1")
    assert "files changed since signing: model.onnx, weights.bin" in entry.reason
    assert entry.reason == _reason_without_staging(tmp_path)[0]


def test_a_pending_file_the_signature_does_not_cover_is_refused_before_hashing(tmp_path):
    from gateway.models.signing import SignatureError, verify_files

    version, _, _, _ = _signed(tmp_path)
    settings = SigningSettings(trust=(TrustRule(name="t", pubkey=tmp_path / "k.pub"),))
    read = _files.read_model_dir(version)
    files = dict(read.files)
    digests = {k: v for k, v in read.digests.items() if k != "weights.bin"}
    bundle = read.signature
    assert bundle is not None
    verify_files("big", files, bundle, settings, version="1", digests=digests,
                 pending=frozenset({"weights.bin"}))  # the rest verifies
    with pytest.raises(SignatureError, match=r"unsigned files present.*extra\.bin"):
        verify_files("big", files, bundle, settings, version="1", digests=digests,
                     pending=frozenset({"weights.bin", "extra.bin"}))
    with pytest.raises(SignatureError, match=r"signed files missing: weights\.bin"):
        verify_files("big", files, bundle, settings, version="1", digests=digests)


def test_more_staged_files_than_hashing_threads_are_all_hashed_right(tmp_path):
    version = tmp_path / "v"
    (version / "sub").mkdir(parents=True)
    names = [f"w{i}.bin" for i in range(4)] + ["sub/w.bin"]  # more than the hashing pool
    for i, name in enumerate(names):
        (version / name).write_bytes(bytes([i]) * (staging.STAGE_MIN_BYTES + i))
    with staging.Staging(tmp_path) as stage:
        read = _files.read_model_dir(version, stage=stage, defer_staged_hashes=True)
        assert sorted(read.staged) == sorted(names) and read.digests == {}
        got = {name: future.result() for name, future in read.pending.items()}
    assert got == {name: hashlib.sha256((version / name).read_bytes()).hexdigest()
                   for name in names}
