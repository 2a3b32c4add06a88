"""Output conventions every ``gateway`` command follows (see the README, "Exit codes").

- results on stdout, diagnostics (warnings, progress, errors) on stderr;
- exit 0: done / allowed / all checks passed; 1: a check failed, a case failed, a request
  was denied; 2: bad usage or an error (unreadable input, unreachable gateway);
- ``--json`` prints one JSON document on stdout instead of the text form;
- paths in messages are relative to the working directory when they lie under it, so
  editors and CI annotations can jump to ``file:line``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OK, FAILED, ERROR = 0, 1, 2


def shown(path: Path | str) -> str:
    """``path`` as messages show it: relative to the working directory when under it."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def emit_json(data: object) -> None:
    """One JSON document on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def warn(message: str) -> None:
    """A diagnostic line on stderr."""
    print(message, file=sys.stderr)


def silence_stdout() -> None:
    """After a closed pipe (``gateway ... | head``): send further output nowhere, so the
    interpreter's final flush does not raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
