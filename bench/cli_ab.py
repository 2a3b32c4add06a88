"""CPU of one `gateway` command, another commit's CLI beside this checkout's.

    python -m bench.cli_ab REV [ROUNDS]      # e.g. python -m bench.cli_ab 350a8ed 8

Runs ``--help``, ``audit verify`` on a small closed log (22 records, one worker) and
``policy test policies``, each as a new process (what a user and the e2e tests pay per
command), in alternating rounds: REV's package (``git archive REV gateway``, first on
``PYTHONPATH``) then this checkout's. CPU is user + system of the process and its children
(``getrusage(RUSAGE_CHILDREN)``, the kernel's accounting /proc reports). Prints the median
per command and the load average before and after, since the machine is shared.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.audit import small_log

_REPO = Path(__file__).resolve().parent.parent


def _small_log(root: Path) -> Path:
    """A closed log of 20 appended records, checkpoints every 8; its config file."""
    return small_log(root, 20, name="bench.local/audit")[0]


def _cpu(args: list[str], pythonpath: str | None, cwd: Path) -> float:
    """User + system seconds of ``python -m gateway ARGS`` (and its children), run in
    ``cwd``: not the repository, whose ``gateway`` ``-m`` would import ahead of PYTHONPATH."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    rev = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    with tempfile.TemporaryDirectory(prefix="gateway-cli-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", rev, "gateway"], cwd=_REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        config = _small_log(Path(tmp))
        commands = {
            "--help": ["--help"],
            "audit verify (small log)": ["audit", "verify", "--quiet", "--jobs", "1",
                                         "--config", str(config)],
            "policy test policies": ["policy", "test", str(_REPO / "policies"),
                                     str(_REPO / "policies/tests/demo.yaml")],
        }
        sides = {rev: str(base), "this checkout": None}
        figures: dict[tuple[str, str], list[float]] = {}
        print(f"load average before: {os.getloadavg()}")
        for _ in range(rounds):
            for name, args in commands.items():
                for side, path in sides.items():
                    figures.setdefault((name, side), []).append(_cpu(args, path, Path(tmp)))
        print(f"load average after:  {os.getloadavg()}")
        print(f"{'command':<28}{'side':<16}{'median CPU s':>13}{'min':>8}{'max':>8}")
        for (name, side), values in figures.items():
            print(f"{name:<28}{side:<16}{statistics.median(values):>13.3f}"
                  f"{min(values):>8.3f}{max(values):>8.3f}")


if __name__ == "__main__":
    main()
