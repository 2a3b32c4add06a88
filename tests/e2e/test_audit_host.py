"""One audit log per host: worker processes append through the hub's LogServer.

Real processes (subprocesses of this interpreter) on a real Unix socket, a real file log with
fsync, the real verifier. No sleeps: every wait is on a condition, a line or a process, with a
deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.audit import (
    AuditSettings,
    LogServer,
    ProofError,
    Receipt,
    RemoteAuditLog,
    _frames,
    ensure_keys,
    offline,
)
from gateway.audit._canonical import EncodingError
from gateway.audit._keys import load_signer
from gateway.audit._store import list_segments, split_records
from gateway.devenv import REPO, run_cli
from gateway.errors import AuditDataError, AuditUnavailable
from tests.support.waiting import wait_for

DEADLINE = 60.0


@pytest.fixture
def settings(tmp_path: Path) -> AuditSettings:
    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "keys" / "log.skey",
                      payload_key=tmp_path / "keys" / "payload.key", name="test.local/audit",
                      segment_bytes=1 << 20)
    ensure_keys(s)
    return s


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "audit.sock"


@pytest.fixture
def server(settings, sock_path):
    srv = LogServer(settings, sock_path, instance_id="hub")
    srv.start()
    yield srv
    srv.stop()


def _records(s: AuditSettings) -> list[bytes]:
    out: list[bytes] = []
    for _first, path in list_segments(s.directory):
        out.extend(split_records(path.read_bytes())[0])
    return out


def _leaf(record: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + record).digest()


def _verify_cli(s: AuditSettings, tmp_path: Path) -> None:
    """``gateway audit verify`` on the log, as an auditor runs it (exit 0: every check holds)."""
    config = tmp_path / "verify.toml"
    config.write_text(f'[audit]\ndirectory = "{s.directory}"\nsigning_key = "{s.signing_key}"\n'
                      f'payload_key = "{s.payload_key}"\nname = "{s.name}"\n')
    done = run_cli("audit", "verify", "--config", str(config), "--quiet", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _wait_for(condition, what: str, deadline: float = DEADLINE) -> None:
    """The shared wait (tests/support/waiting.py), in this file's argument order."""
    wait_for(what, condition, deadline)


# -- real worker processes ------------------------------------------------------------------

_WORKER = r"""
import sys, threading
from dataclasses import replace
from pathlib import Path
from gateway.audit import AuditSettings, RemoteAuditLog
sock, key, instance, threads, count = sys.argv[1:6]
log = RemoteAuditLog.connect(Path(sock), AuditSettings(payload_key=Path(key)),
                             instance_id=instance)
assert log.wait_connected(60), "no hub"
print("connected", flush=True)
sys.stdin.readline()  # every worker starts appending at once
out, lock = [], threading.Lock()
def work(t):
    for i in range(int(count)):
        r = log.append("decision", {"request_id": f"{instance}-{t}-{i}", "decision": "allow",
                                    "payload": {"hmac": log.payload_digest(b"x"), "size": i}})
        with lock:
            out.append(f"{r.index} {r.leaf_hash.hex()}")
ts = [threading.Thread(target=work, args=(t,)) for t in range(int(threads))]
for t in ts: t.start()
for t in ts: t.join()
log.close()
print("\n".join(out), flush=True)
"""

_HUB = r"""
import sys
from dataclasses import replace
from pathlib import Path
from gateway.audit import AuditSettings, LogServer
d, skey, pkey, name, sock = sys.argv[1:6]
s = AuditSettings(directory=Path(d), signing_key=Path(skey), payload_key=Path(pkey), name=name,
                  segment_bytes=1 << 20)
server = LogServer(s, Path(sock), instance_id="hub")
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
server.stop()
"""


def _spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _expect_line(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    got = proc.stdout.readline().strip() if ready else "(nothing)"
    if got != line:
        raise AssertionError(f"expected {line!r}, got {got!r}: {proc.stderr.read()}")


def _hub(settings: AuditSettings, sock_path: Path) -> subprocess.Popen:
    proc = _spawn(_HUB, settings.directory, settings.signing_key, settings.payload_key,
                  settings.name, sock_path)
    _expect_line(proc, "ready")
    return proc


def test_worker_processes_share_one_log_that_verifies(settings, sock_path, server, tmp_path):
    threads, count = 8, 40
    workers = [_spawn(_WORKER, sock_path, settings.payload_key, f"w{k}", threads, count)
               for k in range(2)]
    for w in workers:
        _expect_line(w, "connected")
    hub_receipts: list[Receipt] = []
    stop = threading.Event()

    def hub_records() -> None:  # the hub's own records, interleaved with the workers'
        while not stop.is_set():
            hub_receipts.append(server.log.append("anomaly", {"event": "hub-own"}))

    hub_thread = threading.Thread(target=hub_records)
    hub_thread.start()
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    receipts: dict[int, bytes] = {}
    try:
        for w in workers:
            out, err = w.communicate(timeout=DEADLINE * 2)
            assert w.returncode == 0, err
            for line in out.splitlines():
                index, leaf = line.split()
                assert int(index) not in receipts
                receipts[int(index)] = bytes.fromhex(leaf)
    finally:
        stop.set()
        hub_thread.join()
    assert len(receipts) == 2 * threads * count
    assert hub_receipts
    for r in hub_receipts:
        assert r.index not in receipts
        receipts[r.index] = r.leaf_hash

    with RemoteAuditLog.connect(sock_path, settings, instance_id="auditor") as client:
        note = client.fresh_checkpoint()
        assert note is not None
        key = offline.parse_verifier(load_signer(settings.signing_key).vkey)
        cp = offline.open_checkpoint(note, key)
        assert cp.size == client.size >= len(receipts)
        entries = client.entries(0, cp.size)
        assert len(entries) == cp.size
        for index, leaf in receipts.items():
            assert _leaf(entries[index]) == leaf
            offline.verify_inclusion_path(index, cp.size, leaf,
                                          client.inclusion_proof(index, cp.size), cp.root)
    records = [json.loads(e) for e in entries]
    assert [r["seq"] for r in records] == list(range(len(records)))
    instances = {r["instance"] for r in records}
    assert {"w0", "w1", "hub"} <= instances
    # The hub's records interleave with the workers' (one index space, not one after another).
    hub_seqs = [r["seq"] for r in records if r["instance"] == "hub" and r["kind"] == "anomaly"]
    worker_seqs = [r["seq"] for r in records if r["instance"] in ("w0", "w1")]
    assert min(hub_seqs) < max(worker_seqs) and min(worker_seqs) < max(hub_seqs)
    server.stop()
    assert json.loads(_records(settings)[-1])["kind"] == "log_close"
    _verify_cli(settings, tmp_path)


def test_sigkill_of_the_hub_loses_no_acknowledged_record_and_clients_recover(
        settings, sock_path, tmp_path):
    hub = _hub(settings, sock_path)
    client = RemoteAuditLog.connect(sock_path, settings, instance_id="w0")
    assert client.wait_connected(DEADLINE) and client.healthy
    acked: dict[int, bytes] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        i = 0
        while True:
            try:
                r = client.append("decision", {"request_id": f"{t}-{i}"})
            except AuditUnavailable as err:  # the hub is gone: fail closed, stop
                with lock:
                    failures.append(err)
                return
            with lock:
                acked[r.index] = r.leaf_hash
            i += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(acked) >= 300, "300 receipts under load")
        hub.send_signal(signal.SIGKILL)
        hub.wait(DEADLINE)
        for t in threads:
            t.join(DEADLINE)
            assert not t.is_alive()
    finally:
        if hub.poll() is None:
            hub.kill()
    assert len(failures) == len(threads)  # every appender in flight failed closed
    _wait_for(lambda: not client.healthy, "the client to notice the hub is gone")
    with pytest.raises(AuditUnavailable):
        client.append("decision", {"request_id": "while-down"})
    with pytest.raises(AuditUnavailable):
        client.fresh_checkpoint()

    # A new hub on the same socket: the client reconnects by itself.
    hub = _hub(settings, sock_path)
    try:
        assert client.wait_connected(DEADLINE)
        _wait_for(lambda: client.healthy, "the client to be healthy again")
        after = client.append("decision", {"request_id": "after"})
        assert after.index > max(acked)
        acked[after.index] = after.leaf_hash
        client.close()
    finally:
        hub.stdin.close()
        hub.wait(DEADLINE)
    assert hub.returncode == 0, hub.stderr.read()
    records = _records(settings)
    for index, leaf in acked.items():
        assert _leaf(records[index]) == leaf, f"acknowledged record {index} lost"
    assert not any(b'"while-down"' in r for r in records)
    _verify_cli(settings, tmp_path)


def _raw(sock_path: Path, *, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(str(sock_path))
    if hello:
        s.sendall(_frames.hello("raw"))
        kind, _ = _frames.FrameReader(s, _frames.MAX_REPLY).read()
        assert kind == _frames.WELCOME
    return s


def _refused(s: socket.socket, reason: str) -> None:
    """The hub answers ERROR naming ``reason``, then closes the connection."""
    reader = _frames.FrameReader(s, _frames.MAX_REPLY)
    got = reader.read()
    assert got is not None and got[0] == _frames.ERROR and reason in got[1].decode(), got
    assert reader.read() is None
    s.close()


@pytest.mark.parametrize("attack", ["oversized", "unknown-type", "short-append", "no-hello",
                                    "trailing-bytes", "bad-version", "too-many-records"])
def test_a_malformed_frame_closes_only_its_connection(settings, sock_path, server, attack):
    good = RemoteAuditLog.connect(sock_path, settings, instance_id="w0")
    before = good.append("decision", {"request_id": "before"})
    item = _frames.item(b"decision", b'{"request_id":"evil"}')
    if attack == "oversized":
        s = _raw(sock_path)
        s.sendall(struct.pack("!IB", _frames.MAX_REQUEST + 1, _frames.APPEND))
        _refused(s, "exceeds the limit")
    elif attack == "unknown-type":
        s = _raw(sock_path)
        s.sendall(_frames.frame(99, b"\0" * 8))
        _refused(s, "unexpected frame type 99")
    elif attack == "short-append":  # says 3 records, holds 1
        s = _raw(sock_path)
        s.sendall(_frames.frame(_frames.APPEND, struct.pack("!II", 1, 3) + item))
        _refused(s, "fewer records")
    elif attack == "no-hello":
        s = _raw(sock_path, hello=False)
        s.sendall(_frames.append(1, [item]))
        _refused(s, "HELLO")
    elif attack == "too-many-records":
        s = _raw(sock_path)
        s.sendall(_frames.frame(_frames.APPEND, struct.pack("!II", 1, 1 << 20) + item))
        _refused(s, "exceeds the limit")
    elif attack == "trailing-bytes":
        s = _raw(sock_path)
        s.sendall(_frames.frame(_frames.APPEND, struct.pack("!II", 1, 1) + item + b"xx"))
        _refused(s, "after its last record")
    else:
        s = _raw(sock_path, hello=False)
        s.sendall(_frames.frame(_frames.HELLO, struct.pack("!H", 99) + b"raw"))
        _refused(s, "protocol version")
    after = good.append("decision", {"request_id": "after"})
    assert good.healthy and after.index > before.index
    good.close()
    assert not any(b'"evil"' in r for r in _records(settings))


def test_bad_records_in_a_frame_are_refused_one_by_one(settings, sock_path, server):
    """Non-canonical bytes, floats, reserved keys and an empty kind get a data error; the
    frame's good record is appended; the connection stays open."""
    s = _raw(sock_path)
    items = [_frames.item(b"decision", b'{"request_id":"ok"}'),
             _frames.item(b"decision", b'{"b":1,"a":2}'),            # keys not sorted
             _frames.item(b"decision", b'{"a":1.5}'),                # a float
             _frames.item(b"decision", b'{"a": 1}'),                 # whitespace
             _frames.item(b"decision", b'{"seq":7}'),                # a reserved key
             _frames.item(b"", b'{"a":1}'),                          # no kind
             _frames.item(b"decision", b'[1]'),                      # not an object
             _frames.item(b"decision", b'{"a":"\\u00e9"}')]          # escaped non-ASCII
    s.sendall(_frames.append(7, items))
    reader = _frames.FrameReader(s, _frames.MAX_REPLY)
    kind, body = reader.read()
    assert kind == _frames.APPENDED
    request, healthy, _seconds, results = _frames.parse_appended(body)
    assert request == 7 and healthy
    assert results[0][0] == _frames.OK
    assert [r[0] for r in results[1:]] == [_frames.DATA] * 7
    assert "reserved" in results[4][2] and "floats" in results[2][2]
    s.sendall(_frames.call(8, _frames.STATUS))  # still served
    kind, body = reader.read()
    assert kind == _frames.RESULT and _frames.parse_result(body)[:3] == (8, True, _frames.OK)
    s.close()
    records = _records(settings)
    assert _leaf(records[results[0][1]]) == results[0][2]
    assert json.loads(records[results[0][1]])["instance"] == "raw"


def test_the_client_refuses_what_the_file_log_refuses(settings, sock_path, server):
    with RemoteAuditLog.connect(sock_path, settings, instance_id="w0") as client:
        with pytest.raises(ValueError, match="reserved"):
            client.append("decision", {"seq": 1})
        with pytest.raises(ValueError, match="kind"):
            client.append("", {"a": 1})
        for bad in ({"a": 1.5}, {"a": 2**60}, {"a": object()}, {"é": 1}, {1: "x"},
                    {"a": "\ud800"}):
            with pytest.raises(EncodingError):
                client.append("decision", bad)
        assert client.healthy


def test_the_socket_is_private_and_one_hub_serves_it(settings, sock_path, server, tmp_path):
    mode = sock_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    with pytest.raises(AuditUnavailable, match="another audit log server"):
        LogServer(settings, sock_path, instance_id="hub2").start()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(AuditUnavailable, match="mode 0700"):
        LogServer(settings, loose / "audit.sock", instance_id="hub3").start()


def test_reads_are_forwarded_with_their_errors(settings, sock_path, server):
    lg = server.log
    with RemoteAuditLog.connect(sock_path, settings, instance_id="w0") as client:
        seen: list[tuple[float, int]] = []
        client.observe_commits(lambda seconds, records: seen.append((seconds, records)))
        receipts = [client.append("decision", {"request_id": f"r{i}"}) for i in range(5)]
        assert len(seen) == 5 and all(n == 1 and s >= 0 for s, n in seen)
        note = client.fresh_checkpoint()
        assert note == lg.checkpoint() == client.checkpoint()
        size = client.size
        assert size == lg.size and client.checkpoint_age >= 0
        assert client.checkpoint_note(size) == note
        assert client.checkpoint_note(size + 100) is None
        assert client.root(size) == lg.root(size)
        assert client.entries(0, size + 10) == lg.entries(0, size)
        assert client.entries(3, 3) == []
        r = receipts[2]
        assert client.inclusion_proof(r.index, size) == lg.inclusion_proof(r.index, size)
        assert client.consistency_proof(2, size) == lg.consistency_proof(2, size)
        with pytest.raises(ProofError):
            client.inclusion_proof(size + 5, size)
        with pytest.raises(AuditDataError):
            client.entries(-1, 3)
        assert client.payload_digest(b"a", b"b") == lg.payload_digest(b"ab")


def test_without_a_hub_clients_fail_closed_then_connect(settings, sock_path):
    client = RemoteAuditLog.connect(sock_path, settings, instance_id="w0")
    try:
        assert not client.healthy
        with pytest.raises(AuditUnavailable, match="unreachable"):
            client.append("decision", {"request_id": "x"})
        with pytest.raises(AuditUnavailable):
            client.checkpoint()
        server = LogServer(settings, sock_path, instance_id="hub")
        server.start()
        try:
            assert client.wait_connected(DEADLINE)
            assert client.healthy
            r = client.append("decision", {"request_id": "y"})
            assert r.index == server.log.size - 1
        finally:
            server.stop()
        # A hub stopped cleanly: its clients fail closed too (and keep trying).
        _wait_for(lambda: not client.healthy, "the client to notice the hub stopped")
        with pytest.raises(AuditUnavailable):
            client.append("decision", {"request_id": "z"})
    finally:
        client.close()


def test_announced_calls_are_gathered_into_one_frame_and_commit(tmp_path, sock_path):
    """The worker's sender waits for the records of calls announced in flight (here with a
    window long enough that only the gather, never the clock, decides): one frame, one
    reply and one hub commit carry them all."""
    s = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "keys" / "log.skey",
                      payload_key=tmp_path / "keys" / "payload.key", name="test.local/audit",
                      group_commit_window_us=30_000_000)
    ensure_keys(s)
    server = LogServer(s, sock_path, instance_id="hub")
    server.start()
    commits: list[int] = []
    server.log.observe_commits(lambda seconds, records: commits.append(records))
    try:
        with RemoteAuditLog.connect(sock_path, s, instance_id="w0") as client:
            for _ in range(3):
                client.announce()
            receipts: list[Receipt] = []
            threads = [threading.Thread(target=lambda: receipts.append(
                client.append("decision", {"request_id": "r"}))) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE)
            assert len(receipts) == 3
            # The commit callback runs just after the receipts leave: wait for it.
            _wait_for(lambda: sum(commits) >= 3, "the hub's commit callback")
            assert commits == [3], commits
    finally:
        server.stop()


def test_a_stuck_hub_makes_clients_unhealthy_until_it_moves(settings, sock_path):
    """SIGSTOP: the hub holds its socket but answers nothing; health must not wait for it."""
    hub = _hub(settings, sock_path)
    client = RemoteAuditLog.connect(sock_path, settings, instance_id="w0")
    try:
        assert client.wait_connected(DEADLINE) and client.healthy
        hub.send_signal(signal.SIGSTOP)
        _wait_for(lambda: not client.healthy, "health to turn with the hub stopped")
        hub.send_signal(signal.SIGCONT)
        _wait_for(lambda: client.healthy, "health to come back when the hub moves again")
        assert client.append("decision", {"request_id": "after"}).index > 0
        client.close()
    finally:
        hub.send_signal(signal.SIGCONT)
        hub.stdin.close()
        hub.wait(DEADLINE)
    assert hub.returncode == 0


def test_a_hub_log_that_cannot_write_fails_workers_closed_then_recovers(settings, sock_path):
    """The hub's disk refuses a write (file size limit): the worker's append fails closed,
    its health turns, and both come back with the next commit that lands."""
    s = replace(settings, preallocate=False, checkpoint_ms=60_000)
    server = LogServer(s, sock_path, instance_id="hub")
    server.start()
    client = RemoteAuditLog.connect(sock_path, s, instance_id="w0")
    try:
        acked = [client.append("decision", {"request_id": f"r{i}"}) for i in range(5)]
        seg = list_segments(s.directory)[-1][1]
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (seg.stat().st_size + 40, hard))
        try:
            with pytest.raises(AuditUnavailable, match="durable"):
                client.append("decision", {"request_id": "refused", "note": "x" * 200})
            assert not client.healthy
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
        acked.append(client.append("decision", {"request_id": "after"}))
        assert client.healthy
        client.close()
    finally:
        server.stop()
    records = _records(s)
    for r in acked:
        assert _leaf(records[r.index]) == r.leaf_hash
    assert not any(b'"refused"' in r for r in records)


_LOOPING_WORKER = r"""
import sys
from pathlib import Path
from gateway.audit import AuditSettings, RemoteAuditLog
log = RemoteAuditLog.connect(Path(sys.argv[1]), AuditSettings(payload_key=Path(sys.argv[2])),
                             instance_id="doomed")
assert log.wait_connected(60)
i = 0
while True:
    r = log.append("decision", {"request_id": f"doomed-{i}"})
    print(r.index, r.leaf_hash.hex(), flush=True)
    i += 1
"""


def test_a_worker_killed_mid_append_harms_neither_the_hub_nor_other_workers(
        settings, sock_path, server, tmp_path):
    good = RemoteAuditLog.connect(sock_path, settings, instance_id="w0")
    doomed = _spawn(_LOOPING_WORKER, sock_path, settings.payload_key)
    try:
        assert doomed.stdout is not None
        acked = {}
        for _ in range(50):  # its receipts, as they come
            ready, _, _ = select.select([doomed.stdout], [], [], DEADLINE)
            assert ready, doomed.stderr.read()
            index, leaf = doomed.stdout.readline().split()
            acked[int(index)] = bytes.fromhex(leaf)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(DEADLINE)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    after = [good.append("decision", {"request_id": f"after-{i}"}) for i in range(5)]
    assert good.healthy and server.log.healthy
    good.close()
    server.stop()
    records = _records(settings)
    for index, leaf in acked.items():
        assert _leaf(records[index]) == leaf
    for r in after:
        assert _leaf(records[r.index]) == r.leaf_hash
    _verify_cli(settings, tmp_path)
