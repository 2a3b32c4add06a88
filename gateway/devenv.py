"""Throwaway gateway deployments for tests and benchmarks.

    env = make_demo_env(tmp / "gw", server={"max_tensor_elements": 4096})
    gw = start_gateway(env)          # a `gateway serve` subprocess, ready when this returns
    ...                              # connect to gw.target with env's client certificates
    gw.stop()

Everything is real: a fresh PKI, signed demo models, a copy of the shipped policy, its own
audit log, and the gateway running as a separate process reached over mutual TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_DEMO_INIT_LOCK = threading.Lock()


@dataclass
class DemoEnv:
    """A self-contained gateway deployment in a temporary directory."""

    root: Path
    config: Path
    certs: Path
    models: Path
    policies: Path
    audit: Path

    def client_files(self, name: str) -> tuple[Path, Path]:
        return self.certs / "clients" / f"{name}.pem", self.certs / "clients" / f"{name}.key"


def make_demo_env(root: Path, **overrides: dict[str, object]) -> DemoEnv:
    """Create certs, signed demo models, a copy of the shipped policy and a config file.

    Keyword arguments override config keys by section, e.g. ``server={"workers": 4}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    env = DemoEnv(root=root, config=root / "gateway.toml", certs=root / "certs" / "dev",
                  models=root / "models", policies=root / "policies", audit=root / "audit")
    shutil.copytree(REPO / "policies", env.policies)
    sections: dict[str, dict[str, object]] = {
        # One process unless a test asks for workers (``server={"processes": 2}``): the
        # default, one per CPU, would make every test's gateway a supervisor and a hub.
        "server": {"listen": "127.0.0.1:0", "processes": 1},
        # certs/dev, as in the demo defaults, so the default signing trust rule applies.
        "tls": {"cert": "certs/dev/server.pem", "key": "certs/dev/server.key",
                "ca": "certs/dev/ca.pem"},
        "models": {"repository": "models"},
        "policy": {"directory": "policies"},
        "audit": {"directory": "audit"},
        "monitor": {"metrics_listen": "127.0.0.1:0"},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    env.config.write_text(_render(sections))
    _demo_init(env.config)
    return env


def _demo_init(config: Path) -> None:
    """``gateway demo init --config CONFIG``, the command itself, run in this process.

    Why not a subprocess like :func:`run_cli`: a test run makes a deployment per module or
    test, and a fresh interpreter's start and imports cost more CPU than the set-up itself.
    The command loads no generated gRPC code, so it cannot clash with a client's in this
    process. Its output is captured by swapping ``sys.stdout``, which is process-wide: one
    set-up at a time (the lock).
    """
    import contextlib
    import io

    from gateway.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _DEMO_INIT_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "init", "--config", str(config)])
    if code != 0:
        raise AssertionError(f"gateway demo init exited {code}:\n{out.getvalue()}\n"
                             f"{err.getvalue()}")


def add_replica(env: DemoEnv, name: str) -> DemoEnv:
    """Another replica of ``env``'s deployment: the same PKI, models and settings, with its
    own config file ``<name>.toml``, audit directory ``audit-<name>`` (and witness copy
    beside it) and instance id ``name`` (start it with :func:`start_gateway`). Shared state
    (a PostgreSQL policy source, say) is shared only if the configuration says so."""
    import tomllib

    sections = tomllib.loads(env.config.read_text())
    sections.setdefault("server", {})["instance_id"] = name
    audit = sections.setdefault("audit", {})
    audit["directory"] = f"audit-{name}"
    audit["witness"] = f"audit-{name}-witness/checkpoint"  # each log has its own witness
    config = env.root / f"{name}.toml"
    config.write_text(_render(sections))
    return DemoEnv(root=env.root, config=config, certs=env.certs, models=env.models,
                   policies=env.policies, audit=env.root / f"audit-{name}")


def make_replicas(root: Path, count: int = 2, **overrides: dict[str, object]) -> list[DemoEnv]:
    """``count`` replicas of one deployment (:func:`make_demo_env` with ``overrides``, then
    :func:`add_replica`), with instance ids ``<random>-a``, ``-b``, ...: unique even on a
    database server other runs share (they name connections in pg_stat_activity)."""
    import secrets

    tag = secrets.token_hex(4)
    server = {**overrides.pop("server", {}), "instance_id": f"{tag}-a"}
    env = make_demo_env(root, server=server, **overrides)
    return [env, *(add_replica(env, f"{tag}-{chr(ord('a') + i)}") for i in range(1, count))]


def _render(sections: dict[str, dict[str, object]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{key} = {_toml(value)}\n"
                                           for key, value in table.items())
                   for name, table in sections.items())


def profile_demo_model(env: DemoEnv, *, seed: int = 0) -> Path:
    """Refit demo-mlp's reference profile on N(0, 1) data of another ``seed`` and re-sign it.

    (`gateway demo init` already profiles it with seed 0.) Such inputs score low, far-away
    probes high. Returns the model version directory.
    """
    import numpy as np

    from gateway.models.demo import demo_reference

    np.save(env.root / "ref.npy", demo_reference(seed=seed))
    version = env.models / "demo-mlp" / "1"
    run_cli("model", "profile", str(version), "--data", str(env.root / "ref.npy"))
    run_cli("model", "sign", str(version), "--key",
            str(env.certs / "signing" / "demo-signer.key"))
    return version


def _toml(value: object) -> str:
    """A TOML value for the config file (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) \
            + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def run_cli(*args: str, check: bool = True, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``gateway`` command as a user would (a separate process)."""
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"gateway {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class GatewayProcess:
    """A gateway subprocess; ``target`` is its host:port."""

    env: DemoEnv
    proc: subprocess.Popen
    port: int
    metrics_url: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, then the exit status. A gateway still running 30 s later is asked for
        every thread's stack (SIGUSR1, see ``gateway serve``), which is printed for the
        failing test's report, and killed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)  # time to write the stacks; it does not exit
                self.proc.kill()
                self.proc.wait()
                print("gateway did not stop within 30 s of SIGTERM; its stderr:\n"
                      + "".join(self.stderr_lines))
        return self.proc.returncode


def start_gateway(env: DemoEnv, *, timeout: float = 60) -> GatewayProcess:
    """Start ``gateway serve`` and return once it prints where it listens (it is then ready)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(env.config),
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.root,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None  # both are pipes (above)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(stderr), daemon=True).start()
    port, metrics = 0, ""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in stdout:
            if line.startswith("gateway listening on "):
                port = int(line.split()[3].rsplit(":", 1)[1])
            elif line.startswith("metrics on "):
                metrics = line.split()[2]
            elif line.startswith("try:"):
                break
    finally:
        timer.cancel()
    if not port:
        proc.kill()
        proc.wait()
        raise AssertionError("gateway did not start:\n" + "".join(stderr_lines))
    # Keep draining stdout so the process never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
    return GatewayProcess(env=env, proc=proc, port=port, metrics_url=metrics,
                          stderr_lines=stderr_lines)


