"""The live policy: load, decide, hot reload by atomic swap, shadow evaluation.

Concurrency design (read-copy-update): the live policy is one immutable :class:`Snapshot`
held in ``self._live``. ``decide`` reads that reference once and never locks; ``reload``
builds, validates and tests a complete new snapshot on the reloading thread and installs it
with a single reference assignment (atomic under the GIL). A reader therefore sees either the
old policy or the new one, never a mixture, and never waits for a reload. Reloads are
serialized among themselves by ``_reload_lock``, which the request path never touches.

After the swap the old snapshot is retired: flagged, then taken apart piece by piece so that
freeing a 100k-rule policy never holds the GIL for long. A decision that was still running
on it sees the flag when it finishes and is decided again on the new snapshot.

Call :meth:`PolicyStore.reload` from a thread, not from inside a signal handler: the handler
runs on the main thread and would deadlock if that thread is itself in a reload.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.policy._cases import load_cases, run_cases
from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._source import (
    CASES_DIR,
    MODEL_FILE,
    POLICY_FILE,
    PolicyError,
    Problem,
    digest_files,
    parse_files,
    read_directory,
)

log = logging.getLogger("gateway.policy")
_SWITCH_INTERVAL = 0.001  # seconds; see compile_directory


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt, accepted or rejected (the audit record of a policy change)."""

    accepted: bool
    old_digest: str
    new_digest: str
    error: str = ""
    reason: str = ""
    duration_s: float = 0.0


def case_files(directory: Path) -> list[Path]:
    """The test-case files shipped beside a policy (``tests/*.yaml``), in name order."""
    folder = directory / CASES_DIR
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []


def compile_directory(directory: Path, *, run_tests: bool = True,
                      beside_traffic: bool = False,
                      files: dict[str, bytes] | None = None) -> Snapshot:
    """Read, parse, validate and compile a policy directory, then run its own test cases.

    Raises :class:`PolicyError` listing every problem; nothing is installed anywhere.
    ``files``: the policy files already read from ``directory`` (else they are read here).

    ``beside_traffic`` (the store's choice: it compiles while requests are decided) does two
    things so that no request stalls for long while a 100k-rule policy compiles:

    - the cyclic GC is paused while compiling and the result is moved to the permanent
      generation (``gc.freeze``); otherwise full collections walk the ~10^6 objects of such a
      policy, holding the GIL for ~0.5 s. The cost: objects alive at that moment that later
      become cyclic garbage are never collected (a small leak per reload);
    - the interpreter's thread switch interval is lowered to 1 ms (from 5 ms), so a request
      thread waiting for the GIL gets it within about a millisecond.
    """
    if not beside_traffic:
        return _compile(directory, run_tests, files)
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        with _short_switch_interval():
            snapshot = _compile(directory, run_tests, files)
        gc.freeze()
    finally:
        if paused:
            gc.enable()
    return snapshot


@contextlib.contextmanager
def _short_switch_interval() -> Iterator[None]:
    """Let waiting request threads take the GIL within ~1 ms during long policy work."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _retire(snapshot: Snapshot) -> None:
    with _short_switch_interval():
        snapshot.retire()


def _compile(directory: Path, run_tests: bool, files: dict[str, bytes] | None) -> Snapshot:
    source = parse_files(read_directory(directory) if files is None else files)
    snapshot = Snapshot(source)
    if run_tests:
        cases = load_cases(case_files(directory), snapshot)
        report = run_cases(snapshot, cases)
        if report.failures:
            raise PolicyError([Problem(f.case.file, f.case.line, f"test case failed: {f}")
                               for f in report.failures])
    return snapshot


class _Shadow:
    """A candidate policy decided beside the live one; disagreements counted and logged."""

    def __init__(self, snapshot: Snapshot, directory: Path) -> None:
        self.snapshot = snapshot
        self.directory = directory
        # itertools.count: next() is atomic under the GIL, so counting needs no lock.
        self._decisions = itertools.count()
        self._grants = itertools.count()   # live denies, shadow allows
        self._revokes = itertools.count()  # live allows, shadow denies
        self.samples: deque[dict[str, object]] = deque(maxlen=100)
        self._logged: set[tuple[str, str, str]] = set()

    def observe(self, live: Decision, subject: str, model: str, action: str,
                attributes: Attributes | None) -> None:
        other = self.snapshot.decide(subject, model, action, attributes)
        if self.snapshot.retired:
            return  # replaced while deciding: not a meaningful comparison
        next(self._decisions)
        if other.allowed == live.allowed:
            return
        next(self._grants if other.allowed else self._revokes)
        sample = {"subject": subject, "model": model, "action": action,
                  "live": live.rule, "shadow": other.rule, "shadow_allows": other.allowed}
        self.samples.append(sample)
        key = (subject, model, action)
        if key not in self._logged and len(self._logged) < 10_000:
            self._logged.add(key)  # log each (subject, model, action) once
            log.warning("shadow policy %s disagrees: %s %s %s: live %s by %s, shadow %s by %s",
                        self.snapshot.digest[:12], subject, action, model or "(gateway)",
                        "allow" if live.allowed else "deny", live.rule,
                        "allow" if other.allowed else "deny", other.rule)

    def stats(self) -> dict[str, object]:
        grants, revokes = _peek(self._grants), _peek(self._revokes)
        return {"shadow_digest": self.snapshot.digest, "directory": str(self.directory),
                "decisions": _peek(self._decisions), "disagreements": grants + revokes,
                "shadow_allows_live_denies": grants, "shadow_denies_live_allows": revokes,
                "samples": list(self.samples)}


def _peek(counter: itertools.count) -> int:
    return counter.__reduce__()[1][0]  # the next value, without advancing


class PolicyStore:
    """The live policy of one gateway (see the package docstring for the API)."""

    def __init__(self, directory: Path, snapshot: Snapshot,
                 on_reload: Callable[[ReloadResult], None] | None = None) -> None:
        self.directory = Path(directory)
        self._live = snapshot
        self._shadow: _Shadow | None = None
        self._on_reload = on_reload
        self._reload_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._signature = self._stat_signature()

    @classmethod
    def load(cls, directory: Path, *,
             on_reload: Callable[[ReloadResult], None] | None = None) -> PolicyStore:
        """Load and test the policy in ``directory``; PolicyError if it is not valid."""
        snapshot = compile_directory(Path(directory), beside_traffic=True)
        return cls(Path(directory), snapshot, on_reload)

    # --- request path -------------------------------------------------------------------

    def decide(self, subject: str, model: str, action: str,
               attributes: Attributes | None = None) -> Decision:
        """Decide a request under the live policy (lock-free; safe during reloads)."""
        live = self._live
        decision = live.decide(subject, model, action, attributes)
        while live.retired:  # replaced (and being dismantled) while we decided: decide again
            live = self._live
            decision = live.decide(subject, model, action, attributes)
        shadow = self._shadow
        if shadow is not None:
            shadow.observe(decision, subject, model, action, attributes)
        return decision

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the live policy files."""
        return self._live.digest

    @property
    def snapshot(self) -> Snapshot:
        """The live compiled policy, for tools and tests. Valid until the next accepted
        reload, which dismantles it (see :meth:`Snapshot.retire`): do not keep it."""
        return self._live

    def files(self) -> dict[str, str]:
        """The text of the live policy files, by name (``model.conf``, ``policy.csv``), e.g.
        for a ``policy.read`` RPC. The digest covers exactly their UTF-8 bytes."""
        return {name: data.decode("utf-8") for name, data in self._live.source.files.items()}

    def references(self, prefix: str) -> bool:
        """Whether the live (or shadow) policy reads any attribute starting with ``prefix``."""
        shadow = self._shadow
        return prefix in self._live.prefixes or (
            shadow is not None and prefix in shadow.snapshot.prefixes)

    # --- reload -------------------------------------------------------------------------

    def reload(self, reason: str = "") -> ReloadResult:
        """Parse, validate, compile and test the directory; install it only if all pass.

        Never raises for a bad policy: the result says why it was rejected, the last good
        policy stays live, and ``on_reload`` hears about every attempt.
        """
        with self._reload_lock:
            started = time.perf_counter()
            old = self._live
            self._signature = self._stat_signature()
            new_digest = ""
            try:
                files = read_directory(self.directory)
                new_digest = digest_files(files)  # of exactly the bytes compiled
                snapshot = compile_directory(self.directory, beside_traffic=True, files=files)
            except PolicyError as err:
                result = ReloadResult(False, old.digest, new_digest, err.diagnostics(), reason,
                                      time.perf_counter() - started)
            except Exception as err:  # never let a reload take the watcher or server down
                log.exception("policy reload failed unexpectedly")
                result = ReloadResult(False, old.digest, new_digest,
                                      f"internal error: {type(err).__name__}: {err}", reason,
                                      time.perf_counter() - started)
            else:
                self._live = snapshot  # the one atomic swap
                result = ReloadResult(True, old.digest, snapshot.digest, "", reason,
                                      time.perf_counter() - started)
            if result.accepted:
                log.info("policy %s installed (was %s; %s)", result.new_digest[:12],
                         result.old_digest[:12], reason or "reload")
            else:
                log.error("policy reload rejected (%s); %s stays live:\n%s", reason or "reload",
                          result.old_digest[:12], result.error)
            if self._on_reload is not None:
                try:
                    self._on_reload(result)
                except Exception:
                    log.exception("on_reload callback failed")
            if result.accepted:
                _retire(old)  # after the callback: the audit record need not wait for this
            return result

    def _stat_signature(self) -> tuple:
        paths = [self.directory / MODEL_FILE, self.directory / POLICY_FILE,
                 *case_files(self.directory)]
        out = []
        for path in paths:
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    def start_watching(self, interval: float = 1.0) -> None:
        """Poll the policy files every ``interval`` seconds and reload when they change."""
        if self._watcher is not None:
            return
        self._watch_stop.clear()

        def watch() -> None:
            while not self._watch_stop.wait(interval):
                if self._stat_signature() != self._signature:
                    self.reload("file change")

        self._watcher = threading.Thread(target=watch, name="policy-watch", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the polling thread (waits for a reload in progress to finish)."""
        watcher = self._watcher
        if watcher is None:
            return
        self._watch_stop.set()
        watcher.join()
        self._watcher = None

    # --- shadow mode --------------------------------------------------------------------

    def load_shadow(self, directory: Path) -> str:
        """Decide every request also under the candidate policy in ``directory``.

        Responses still follow the live policy; disagreements are counted and logged. Returns
        the candidate's digest; PolicyError if it is not valid (its own tests must pass too).
        """
        with self._reload_lock:  # compiles are serialized (they pause the GC)
            snapshot = compile_directory(Path(directory), beside_traffic=True)
            previous, self._shadow = self._shadow, _Shadow(snapshot, Path(directory))
            if previous is not None:
                _retire(previous.snapshot)
        log.info("shadow policy %s loaded beside live %s", snapshot.digest[:12],
                 self._live.digest[:12])
        return snapshot.digest

    def clear_shadow(self) -> None:
        """Stop shadow evaluation."""
        with self._reload_lock:
            previous, self._shadow = self._shadow, None
            if previous is not None:
                _retire(previous.snapshot)

    def shadow_stats(self) -> dict[str, object] | None:
        """Counts of decisions and disagreements with the shadow policy (None: no shadow)."""
        shadow = self._shadow
        if shadow is None:
            return None
        stats = shadow.stats()
        stats["live_digest"] = self._live.digest
        return stats
