"""``[server] processes = N``: N worker processes behind one port, a hub, and their supervisor.

    supervisor = Supervisor(load_config("gateway.toml"))
    supervisor.start()          # hub, then N workers, each ready; raises GatewayError if not
    code = supervisor.run()     # until SIGTERM/SIGINT; restarts what crashes; the exit code

The supervisor (the ``gateway serve`` process) never creates a gRPC object: it reserves the
port with an ``SO_REUSEPORT`` socket it never listens on (as gRPC's multiprocessing example
does, so port 0 names one port for every worker), forks the hub (:mod:`._hub`: the audit log,
the shared state, ``/metrics``), waits until it serves, then forks the workers; each builds
its own gRPC server after the fork and listens on the same port, the kernel spreading
connections among them.

Signals are taken synchronously: their handlers do nothing, the numbers arrive on a wakeup
pipe (``signal.set_wakeup_fd``) that the supervisor's one loop reads with the children's
ready pipes, so none interrupts it half-way through a restart, whichever thread of the
process the kernel delivered it to:

- a worker or the hub that exits is restarted (after a back-off that grows while it keeps
  failing soon after start); while the hub is down workers fail closed (UNAVAILABLE, health
  NOT_SERVING: their ``RemoteAuditLog`` cannot make records durable);
- SIGTERM/SIGINT drain: every worker stops accepting and finishes its calls in flight (their
  records durable), then the hub closes the log with a final signed checkpoint;
- SIGHUP is forwarded to every worker (each reloads its policy).

Exit status: 0 after a clean drain; 1 when a process had to be killed or failed while
draining; start-up failures raise :class:`~gateway.errors.GatewayError` (the CLI prints it and
exits 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway._atomic import private_dir, write_atomic
from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError
from gateway.server._hub import RuntimePaths, run_hub

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("gateway.supervisor")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
#: How long a process may take to say it is ready (model verification, log recovery).
_READY_TIMEOUT_S = 120.0
#: A process that ran at least this long before exiting is restarted at once.
_STABLE_S = 10.0
_MAX_BACKOFF_S = 30.0
#: Workers finish their calls in flight within this grace; the hub then closes the log.
_DRAIN_GRACE_S = 10.0
_HUB = "hub"


@dataclass
class _Child:
    """A process the supervisor keeps running: the hub or worker ``w<k>``."""

    name: str
    pid: int = 0
    started: float = 0.0
    ready_fd: int = -1
    ready: bool = False
    backoff: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    buffer: bytes = field(default=b"", repr=False)


class Supervisor:
    """Runs the hub and ``[server] processes`` workers; see the module docstring."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.paths = RuntimePaths(config.server.runtime_dir)
        self.port = 0
        self.metrics_url = ""
        self._reserved: socket.socket | None = None
        self._hub = _Child(_HUB)
        self._workers = [_Child(f"w{k}") for k in range(1, config.server.processes + 1)]
        self._draining = False
        self._failed_drain = False
        self._wake_r = self._wake_w = -1
        self._early: list[int] = []

    @property
    def instance_id(self) -> str:
        """The host's instance id: ``[server] instance_id`` or host name and port."""
        return self.config.server.instance_id or f"{socket.gethostname()}:{self.port}"

    def _publish(self) -> None:
        """``<runtime_dir>/processes.json``: which pid is the supervisor, the hub and each
        worker, and whether each is ready, for operators (and tests) to see at a glance."""
        table: dict[str, object] = {"supervisor": {"pid": os.getpid(), "ready": True},
                                    "port": self.port}
        for child in self._children():
            table[child.name] = {"pid": child.pid, "ready": child.ready, "restarts":
                                 child.restarts}
        write_atomic(self.paths.processes, json.dumps(table, indent=1).encode(), mode=0o600)

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Reserve the port, start the hub, then the workers; return once all are ready."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, _ignore)
        _label_logs("supervisor")
        self._prepare_runtime_dir()
        self._reserve_port()
        try:
            self._spawn(self._hub)
            self._await_ready([self._hub])
            for worker in self._workers:
                self._spawn(worker)
            self._await_ready(self._workers)
        except BaseException:
            self._kill_all()
            raise
        log.info("%d worker processes serving port %d (hub pid %d)", len(self._workers),
                 self.port, self._hub.pid)

    def _prepare_runtime_dir(self) -> None:
        """The sockets' directory, 0700 and ours; the metrics directory emptied (values left by
        a previous run would be added to this one's)."""
        root = self.paths.root
        private_dir(root)
        info = root.stat()
        if info.st_uid != os.getuid():
            raise GatewayError(f"[server] runtime_dir {root} belongs to another user")
        os.chmod(root, 0o700)
        shutil.rmtree(self.paths.metrics, ignore_errors=True)
        self.paths.desired_state.unlink(missing_ok=True)
        self.paths.metrics.mkdir(mode=0o700)
        # Read by prometheus-client in every process forked from here (see _child_metrics).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.paths.metrics)

    def _reserve_port(self) -> None:
        host, _, port = self.config.server.listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as err:
            sock.close()
            raise GatewayError(f"cannot listen on {self.config.server.listen}: {err}") from None
        self._reserved = sock  # kept open (never listening) so the port stays ours
        self.port = sock.getsockname()[1]

    def _spawn(self, child: _Child) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.close(read_fd)
                code = self._child_main(child.name, write_fd)
            except BaseException:
                log.exception("%s failed", child.name)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        child.pid, child.started, child.ready_fd = pid, time.monotonic(), read_fd
        child.ready, child.buffer, child.restart_at = False, b"", None
        self._publish()

    def _await_ready(self, children: list[_Child]) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        waiting = [c for c in children if not c.ready]
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(f"{', '.join(c.name for c in waiting)} not ready after "
                                   f"{_READY_TIMEOUT_S:.0f} s")
            signals, readable = self._wait(remaining, [c.ready_fd for c in waiting])
            self._early.extend(signals)  # taken once running (a drain needs the children)
            for child in [c for c in waiting if c.ready_fd in readable]:
                message = self._read_ready(child)
                if message is None:
                    continue
                if not message.get("ok"):
                    what = "the hub" if child.name == _HUB else f"worker {child.name}"
                    # A configuration error stays one (the CLI then says how paths resolved).
                    error = ConfigError if message.get("config") else GatewayError
                    raise error(f"{what} did not start: {message.get('error')}")
                waiting.remove(child)

    def _read_ready(self, child: _Child) -> dict | None:
        """The child's ready line once complete (a child that exits first: not ok)."""
        data = os.read(child.ready_fd, 65536)
        child.buffer += data
        if data and not child.buffer.endswith(b"\n"):
            return None
        os.close(child.ready_fd)
        child.ready_fd = -1
        try:
            message = json.loads(child.buffer) if child.buffer else None
        except ValueError:
            message = None
        if not isinstance(message, dict):
            message = {"ok": False, "error": "exited before it was ready (see the log above)"}
        child.ready = bool(message.get("ok"))
        if child.name == _HUB and child.ready:
            self.metrics_url = str(message.get("metrics") or "")
        self._publish()
        return message

    # -- the children -----------------------------------------------------------------------

    def _child_main(self, name: str, ready_fd: int) -> int:
        # A process group of its own: Ctrl-C in a terminal reaches the supervisor alone,
        # which drains workers before the hub (the hub must not close the log first).
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        _label_logs(name)
        _child_metrics()
        self._reserved = None  # the fd stays open in the child; the supervisor owns it

        def report(message: dict[str, object]) -> None:
            os.write(ready_fd, json.dumps(message).encode() + b"\n")
            os.close(ready_fd)

        if name == _HUB:
            # The hub takes SIGTERM/SIGINT with sigtimedwait: blocked now, while this
            # process has one thread, so in every thread it starts.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            return run_hub(self.config, self.paths, f"{self.instance_id}/hub", report)
        return self._run_worker(name, report)

    def _run_worker(self, name: str, report: Callable[[dict[str, object]], None]) -> int:
        from gateway.audit import RemoteAuditLog
        from gateway.server import Gateway

        instance = f"{self.instance_id}/{name}"
        host = self.config.server.listen.rpartition(":")[0]
        state = self.config.state
        if state.backend == "local":  # PostgreSQL state stays PostgreSQL (replicas)
            state = dataclasses.replace(state, backend="host", socket=self.paths.state_socket)
        config = dataclasses.replace(
            self.config, state=state, server=dataclasses.replace(
                self.config.server, listen=f"{host}:{self.port}", instance_id=instance))
        try:
            # The hub's file log; a PostgreSQL log each worker writes itself (Gateway opens it).
            audit = None if config.audit.backend == "postgresql" else RemoteAuditLog.connect(
                self.paths.audit_socket, config.audit, instance_id=instance)
            gateway = Gateway.start(config, audit=audit, worker=True)
        except (GatewayError, OSError) as err:
            report({"ok": False, "error": err.diagnostics() if isinstance(err, GatewayError)
                    else str(err), "config": isinstance(err, ConfigError)})
            return 2
        gateway.install_signal_handlers()
        report({"ok": True, "port": gateway.port})
        gateway.wait()
        return 0

    # -- running ----------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT has drained everything; return the exit status."""
        signals, self._early = self._early, []
        while True:
            for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: draining %d workers", signal.Signals(signum).name,
                             len(self._workers))
                    return self._drain()
                if signum == signal.SIGHUP:
                    self._forward(signal.SIGHUP)
            self._reap()
            self._restart_due()
            pending = [c for c in self._children() if c.ready_fd >= 0]
            # Restarted children that have not said they are ready yet are read as they do.
            signals, readable = self._wait(self._next_restart_in(),
                                           [c.ready_fd for c in pending])
            for child in (c for c in pending if c.ready_fd in readable):
                self._note_ready(child)

    def _wait(self, timeout: float, fds: list[int]) -> tuple[list[int], list[int]]:
        """Wait up to ``timeout`` for a signal or one of ``fds``; the signals that arrived
        (their numbers, from the wakeup pipe) and the readable fds."""
        readable, _, _ = select.select([self._wake_r, *fds], [], [], max(timeout, 0.0))
        signals: list[int] = []
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                signals = list(os.read(self._wake_r, 512))
        return signals, [fd for fd in readable if fd != self._wake_r]

    def _children(self) -> list[_Child]:
        return [self._hub, *self._workers]

    def _next_restart_in(self) -> float:
        due = [c.restart_at for c in self._children() if c.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    def _note_ready(self, child: _Child) -> None:
        message = self._read_ready(child)
        if message is None:
            return
        if message.get("ok"):
            log.info("%s (pid %d) is back and serving", child.name, child.pid)
        else:
            log.error("%s (pid %d) did not start: %s", child.name, child.pid,
                      message.get("error"))

    def _forward(self, sig: signal.Signals) -> None:
        log.info("%s: forwarded to %d workers (each reloads its policy)", sig.name,
                 len(self._workers))
        for worker in self._workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, sig)

    def _reap(self) -> list[_Child]:
        """Collect every exited child; schedule its restart unless draining."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = next((c for c in self._children() if c.pid == pid), None)
            if child is None:
                continue
            exited.append(child)
            lived = time.monotonic() - child.started
            how = _describe(status)
            child.pid, child.ready = 0, False
            if child.ready_fd >= 0:
                os.close(child.ready_fd)
                child.ready_fd = -1
            _mark_dead(pid)
            if self._draining:
                if status != 0:
                    self._failed_drain = True
                    log.error("%s (pid %d) %s while draining", child.name, pid, how)
                continue
            child.backoff = 0.1 if lived >= _STABLE_S else min(
                max(child.backoff * 2, 0.5), _MAX_BACKOFF_S)
            child.restart_at = time.monotonic() + child.backoff
            child.restarts += 1
            if child.name == _HUB:
                log.error("hub (pid %d) %s after %.1f s; restarting in %.1f s; until it is "
                          "back every worker answers UNAVAILABLE (health NOT_SERVING)",
                          pid, how, lived, child.backoff)
            else:
                log.error("worker %s (pid %d) %s after %.1f s; restarting in %.1f s",
                          child.name, pid, how, lived, child.backoff)
        if exited:
            self._publish()
        return exited

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self._children():
            if child.restart_at is not None and child.restart_at <= now and not child.pid:
                self._spawn(child)
                log.info("%s restarted (pid %d)", child.name, child.pid)

    # -- stopping ---------------------------------------------------------------------------

    def _drain(self) -> int:
        """Workers first (stop accepting, finish calls in flight, records durable), then the
        hub (final signed checkpoint); whatever overstays its grace is killed (status 1)."""
        self._draining = True
        for child in self._children():
            child.restart_at = None
        self._stop([w for w in self._workers if w.pid], _DRAIN_GRACE_S + 20)
        self._stop([self._hub] if self._hub.pid else [], 60.0)
        if self._reserved is not None:
            self._reserved.close()
        self.paths.processes.unlink(missing_ok=True)
        if self._failed_drain:
            log.error("stopped, but not cleanly (see above)")
            return 1
        log.info("stopped: every worker drained, the audit log closed")
        return 0

    def _stop(self, children: list[_Child], timeout: float) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.pid for c in children):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for child in (c for c in children if c.pid):
                    log.error("%s (pid %d) still running %.0f s after SIGTERM: killed",
                              child.name, child.pid, timeout)
                    self._failed_drain = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            self._wait(min(max(remaining, 0.01), 0.5), [])  # SIGCHLD, or time to look again
            self._reap()

    def _kill_all(self) -> None:
        self._draining = True
        for child in self._children():
            if child.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
                child.pid = 0
        self.paths.processes.unlink(missing_ok=True)


def _ignore(signum: int, frame: object) -> None:
    """The supervisor's signal handler: the number already went to the wakeup pipe."""


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _die_with_parent() -> None:
    """A child gets SIGTERM if the supervisor dies (Linux ``PR_SET_PDEATHSIG``): no orphan
    keeps the port or the log."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    if os.getppid() == 1:
        os._exit(0)


def _label_logs(name: str) -> None:
    """Log lines say which process wrote them (``[supervisor]``, ``[hub]``, ``[w1]``, ...)."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        fmt = getattr(handler, "_gateway_fmt", None) or (
            formatter._fmt if formatter is not None and formatter._fmt else "%(message)s")
        handler._gateway_fmt = fmt  # type: ignore[attr-defined]  # the unlabelled format
        handler.setFormatter(logging.Formatter(fmt.replace("%(name)s", f"[{name}] %(name)s")))


def _child_metrics() -> None:
    """Metrics created from now on write to the multiprocess directory (prometheus-client
    picks its value class when first imported, which the supervisor did before the directory
    was known)."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (prometheus-client's ``live*`` modes)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)


def supervise(config: GatewayConfig, on_ready: Callable[[Supervisor], None]) -> int:
    """Start, call ``on_ready`` (the CLI prints where it listens), run; the exit status."""
    supervisor = Supervisor(config)
    supervisor.start()
    on_ready(supervisor)
    sys.stdout.flush()
    return supervisor.run()
