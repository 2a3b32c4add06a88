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
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

from gateway.errors import GatewayError, PermissionDenied
from gateway.policy._cases import parse_cases, run_cases
from gateway.policy._condition import Attributes
from gateway.policy._engine import Decision, Snapshot
from gateway.policy._shadow import RequestRow, RulePair, Shadow, ShadowStats, ShadowSummary
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


@dataclass(frozen=True, slots=True)
class Bundle:
    """A complete candidate policy as read from its source: what one reload compiles.

    ``files`` holds model.conf and policy.csv (what the digest covers), ``cases`` the test
    case files as ``(name, bytes)``, ``label`` where it came from (e.g. ``postgresql
    version 4``), recorded with the reload.
    """

    files: dict[str, bytes]
    cases: tuple[tuple[str, bytes], ...] = ()
    label: str = ""

    @property
    def digest(self) -> str:
        """The policy digest decisions will name (of ``files`` only, as for a directory)."""
        return digest_files(self.files)

    @property
    def key(self) -> str:
        """Identifies the whole bundle, cases and label included: a watcher that saw this
        key before (installed or refused) need not compile it again."""
        return digest_files({**self.files, **{f"case:{n}": d for n, d in self.cases},
                             "label": self.label.encode()})


class Source(Protocol):
    """Where a store's policy comes from: a directory, or PostgreSQL (``_postgres``)."""

    #: "files" or "postgresql", for status and metrics.
    kind: str

    def read(self) -> Bundle:
        """The current policy; PolicyError if it is incomplete, another GatewayError (e.g.
        ``DatabaseUnavailable``) if the source cannot be read at all."""

    def watch(self, stop: threading.Event, interval: float,
              reload: Callable[..., ReloadResult | None]) -> None:
        """Call ``reload(reason)`` on every change until ``stop`` is set (runs on a thread)."""

    def status(self) -> tuple[bool, str]:
        """(reachable, last error): the source's health, for metrics and health checks."""

    def close(self) -> None:
        """Release connections (nothing for a directory)."""


class DirectorySource:
    """A policy directory on disk, watched by polling file metadata."""

    kind = "files"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._signature = self._stat_signature()

    def read(self) -> Bundle:
        self._signature = self._stat_signature()  # before reading: a later write is seen
        files = read_directory(self.directory)
        cases, problems = [], []
        for path in case_files(self.directory):
            try:
                cases.append((str(path), path.read_bytes()))
            except OSError as err:
                problems.append(Problem(str(path), 0, f"cannot read: {err.strerror}"))
        if problems:
            raise PolicyError(problems)
        return Bundle(files, tuple(cases))

    def watch(self, stop: threading.Event, interval: float,
              reload: Callable[..., ReloadResult | None]) -> None:
        while not stop.wait(interval):
            if self._stat_signature() != self._signature:
                reload("file change")

    def status(self) -> tuple[bool, str]:
        return True, ""

    def close(self) -> None:
        pass

    def _stat_signature(self) -> tuple[tuple[str, int | None, int | None, int | None], ...]:
        paths = [self.directory / MODEL_FILE, self.directory / POLICY_FILE,
                 *case_files(self.directory)]
        out: list[tuple[str, int | None, int | None, int | None]] = []
        for path in paths:
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(path), None, None, None))
        return tuple(out)


def compile_directory(directory: Path, *, run_tests: bool = True,
                      beside_traffic: bool = False) -> Snapshot:
    """Read, parse, validate and compile a policy directory, then run its own test cases.

    Raises :class:`PolicyError` listing every problem; nothing is installed anywhere.
    """
    return compile_bundle(DirectorySource(directory).read(), run_tests=run_tests,
                          beside_traffic=beside_traffic)


def compile_bundle(bundle: Bundle, *, run_tests: bool = True,
                   beside_traffic: bool = False) -> Snapshot:
    """Parse, validate and compile a bundle, then run its own test cases (every source's
    one path to a snapshot: a push checks exactly what a replica's reload will check).

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
        return _compile(bundle, run_tests)
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        with _short_switch_interval():
            snapshot = _compile(bundle, run_tests)
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


def _compile(bundle: Bundle, run_tests: bool) -> Snapshot:
    source = parse_files(bundle.files)
    snapshot = Snapshot(source)
    if run_tests:
        cases = parse_cases(list(bundle.cases), snapshot)
        report = run_cases(snapshot, cases)
        if report.failures:
            raise PolicyError([Problem(f.case.file, f.case.line,
                                       f"test case failed: {f.outcome()}")
                               for f in report.failures])
    return snapshot


class ShadowSamples(ShadowStats):
    """The shadow's totals and up to 100 of its disagreeing requests."""

    live_digest: str
    samples: list[RequestRow]


class ShadowReport(ShadowStats):
    """The shadow's totals and every disagreement, by rule pair and by request."""

    live_digest: str
    by_rule: list[RulePair]
    by_request: list[RequestRow]


class PolicyStore:
    """The live policy of one gateway (see the package docstring for the API)."""

    def __init__(self, source: Source | Path, snapshot: Snapshot,
                 on_reload: Callable[[ReloadResult], None] | None = None, *,
                 on_shadow_summary: Callable[[ShadowSummary], object] | None = None,
                 shadow_summary_interval: float = 60.0) -> None:
        if isinstance(source, (str, Path)):
            source = DirectorySource(Path(source))
        self.source: Source = source
        #: The policy directory (files source only; None for PostgreSQL).
        self.directory: Path | None = getattr(source, "directory", None)
        self._live = snapshot
        self._seen = ""  # key of the last bundle a watcher compiled (installed or refused)
        self._shadow: Shadow | None = None
        self._on_reload = on_reload
        self._on_shadow_summary = on_shadow_summary
        self._summary_interval = shadow_summary_interval
        self._summary_stop = threading.Event()
        self._summarizer: threading.Thread | None = None
        #: The shadow directory of the configuration, set again by an empty admin request.
        self.configured_shadow: Path | None = None
        #: The tree :meth:`shadow_directory` confines run-time shadow requests to (None: any).
        self.shadow_root: Path | None = None
        self._reload_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def load(cls, directory: Path, **options: Any) -> PolicyStore:
        """Load and test the policy in ``directory``; PolicyError if it is not valid.

        ``options`` are those of :meth:`open`.
        """
        return cls.open(DirectorySource(Path(directory)), **options)

    @classmethod
    def open(cls, source: Source, *,
             on_reload: Callable[[ReloadResult], None] | None = None,
             shadow: Path | None = None,
             shadow_root: Path | None = None,
             on_shadow_summary: Callable[[ShadowSummary], object] | None = None,
             shadow_summary_interval: float = 60.0) -> PolicyStore:
        """Read, compile and test the policy of ``source``; PolicyError if it is not valid,
        another GatewayError (e.g. ``DatabaseUnavailable``) if the source cannot be read:
        the gateway does not start without a verified policy.

        ``shadow``: a candidate policy directory to decide beside it from the start (see
        :meth:`load_shadow`); ``on_shadow_summary`` receives the aggregated disagreements for
        the audit log (see :mod:`gateway.policy._shadow`); ``shadow_root``: the only tree
        :meth:`shadow_directory` accepts run-time shadow directories from.
        """
        bundle = source.read()
        snapshot = compile_bundle(bundle, beside_traffic=True)
        store = cls(source, snapshot, on_reload, on_shadow_summary=on_shadow_summary,
                    shadow_summary_interval=shadow_summary_interval)
        store._seen = bundle.key
        store.configured_shadow = shadow
        store.shadow_root = None if shadow_root is None else Path(shadow_root).resolve()
        if shadow is not None:
            store.load_shadow(shadow)
        return store

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

    def reload(self, reason: str = "", *, if_changed: bool = False) -> ReloadResult | None:
        """Read, parse, validate, compile and test the source; install it only if all pass.

        Never raises for a bad policy: the result says why it was rejected, the last good
        policy stays live, and ``on_reload`` hears about every attempt. ``if_changed`` (a
        source's watcher): return None, recording nothing, when the source holds the bundle
        last compiled (installed or refused), and let an unreadable source's error
        propagate (the watcher reports and retries; it is not a policy change).
        """
        with self._reload_lock:
            started = time.perf_counter()
            old = self._live
            new_digest = ""
            try:
                bundle = self.source.read()
                if bundle.label:
                    reason = f"{reason or 'reload'}: {bundle.label}"
                if if_changed and bundle.key == self._seen:
                    return None
                self._seen = bundle.key
                new_digest = bundle.digest  # of exactly the bytes compiled
                snapshot = compile_bundle(bundle, beside_traffic=True)
            except PolicyError as err:
                result = ReloadResult(False, old.digest, new_digest, err.diagnostics(), reason,
                                      time.perf_counter() - started)
            except GatewayError as err:  # the source itself is unreadable (database down)
                if if_changed:
                    raise
                result = ReloadResult(False, old.digest, new_digest, str(err), reason,
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

    def source_status(self) -> tuple[bool, str]:
        """(reachable, last error) of the policy source; the live policy stays in force
        while it is unreachable (it was verified when installed)."""
        return self.source.status()

    def start_watching(self, interval: float = 1.0) -> None:
        """Watch the source (files: poll every ``interval`` s; PostgreSQL: LISTEN/NOTIFY,
        polling every ``interval`` s as a backstop) and reload when it changes."""
        if self._watcher is not None:
            return
        self._watch_stop.clear()

        def watch() -> None:
            self.source.watch(self._watch_stop, interval, self.reload)

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

    def close(self) -> None:
        """Stop watching and release the source's connections."""
        self.stop_watching()
        self.source.close()

    # --- shadow mode --------------------------------------------------------------------

    def shadow_directory(self, requested: str) -> Path:
        """The directory a run-time request names, if it lies under ``shadow_root``.

        Checked on the resolved path (symbolic links followed) before anything is read, so a
        caller with ``policy.load`` cannot use the request to probe the host's file system:
        a path outside the tree is refused the same way whether it exists or not.

        :raises PermissionDenied: the path is outside the tree.
        """
        path = Path(requested)
        if self.shadow_root is None:
            return path
        resolved = path.resolve()
        if not resolved.is_relative_to(self.shadow_root):
            raise PermissionDenied(f"shadow policies are loaded only from under "
                                   f"{self.shadow_root} ([policy] shadow_root)",
                                   reason="shadow-root")
        return resolved

    def load_shadow(self, directory: Path) -> str:
        """Decide every request also under the candidate policy in ``directory``.

        The candidate is checked and tested like a reload (it must compile and pass its own
        cases). Responses still follow the live policy; disagreements are counted, exported
        as metrics and summarised in the audit log. Replaces any previous shadow (whose
        final summary is emitted). Returns the candidate's digest; PolicyError if invalid.
        """
        with self._reload_lock:  # compiles are serialized (they pause the GC)
            snapshot = compile_directory(Path(directory), beside_traffic=True)
            shadow = Shadow(snapshot, Path(directory))
            previous, self._shadow = self._shadow, shadow
        if previous is not None:
            self._summarise(previous, final=True)
            _retire(previous.snapshot)
        self._summarise(shadow, final=False, force=True)
        self._start_summarizer()
        log.info("shadow policy %s loaded beside live %s", snapshot.digest[:12],
                 self._live.digest[:12])
        return snapshot.digest

    def clear_shadow(self) -> ShadowSummary | None:
        """Stop shadow evaluation; returns the final summary (None: there was no shadow)."""
        with self._reload_lock:
            previous, self._shadow = self._shadow, None
        self._summary_stop.set()
        if self._summarizer is not None:
            self._summarizer.join()
            self._summarizer = None
        if previous is None:
            return None
        summary = self._summarise(previous, final=True, force=True)
        _retire(previous.snapshot)
        return summary

    def shadow_stats(self) -> ShadowSamples | None:
        """Counts of decisions and disagreements with the shadow policy (None: no shadow)."""
        shadow = self._shadow
        if shadow is None:
            return None
        return {**shadow.stats(), "live_digest": self._live.digest,
                "samples": shadow.requests()[:100]}

    def shadow_report(self) -> ShadowReport | None:
        """Totals, disagreements by rule pair and by request (None: no shadow)."""
        shadow = self._shadow
        if shadow is None:
            return None
        return {**shadow.stats(), "live_digest": self._live.digest,
                "by_rule": shadow.pairs(), "by_request": shadow.requests()}

    @property
    def shadow(self) -> Shadow | None:
        """The shadow under observation (for the metrics collector)."""
        return self._shadow

    def _summarise(self, shadow: Shadow, *, final: bool, force: bool = False
                   ) -> ShadowSummary:
        summary = shadow.summary(self._live.digest, final)
        if self._on_shadow_summary is not None and (
                force or final or shadow.disagreements > shadow.reported):
            shadow.reported = summary["disagreements"]
            try:
                self._on_shadow_summary(summary)
            except Exception:
                log.exception("shadow summary callback failed")
        return summary

    def _start_summarizer(self) -> None:
        if self._on_shadow_summary is None or self._summary_interval <= 0:
            return
        if self._summarizer is not None and self._summarizer.is_alive():
            return
        self._summary_stop.clear()

        def loop() -> None:
            while not self._summary_stop.wait(self._summary_interval):
                shadow = self._shadow
                if shadow is not None:
                    self._summarise(shadow, final=False)

        self._summarizer = threading.Thread(target=loop, name="shadow-summary", daemon=True)
        self._summarizer.start()


def open_source(kind: str, directory: Path, dsn: str = "", *, name: str = "") -> Source:
    """The policy source a configuration names: ``files`` (``directory``) or ``postgresql``
    (``dsn``, else ``$GATEWAY_DSN``; ``name`` labels its connections in pg_stat_activity)."""
    if kind == "files":
        return DirectorySource(directory)
    if kind == "postgresql":
        from gateway.db import resolve_dsn
        from gateway.policy.postgres import PostgresSource

        return PostgresSource(resolve_dsn(dsn), name=name or "gateway-policy")
    raise PolicyError(f"unknown policy source {kind!r}; known: files, postgresql")


class SourceCollector:
    """Prometheus collector of a store's source health (register it on a registry)."""

    def __init__(self, store: PolicyStore) -> None:
        self._store = store

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up, _ = self._store.source_status()
        gauge = GaugeMetricFamily("gateway_policy_source_up", "1 while the policy source (files "
                                  "or PostgreSQL) can be read; at 0 the installed policy stays "
                                  "live and changes wait until it is back.", labels=["source"])
        gauge.add_metric([self._store.source.kind], 1 if up else 0)
        yield gauge
