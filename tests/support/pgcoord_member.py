"""A PgCoordinator member in a process of its own, for tests/e2e/test_state_pgcoord.py.

    python -m tests.support.pgcoord_member DSN MEMBER LOG

Subscribes to topic ``models``; its handler appends ``{"key": ..., "payload": ...}`` to LOG
(one JSON line each, flushed and fsync'd before it answers) and answers the error
``"refused by <member>"`` when the payload's ``fail`` names this member. Prints ``ready``
once the stored state is applied; stops on SIGTERM (closing the member) or when killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Mapping


def main(dsn: str, member: str, log_path: str) -> None:
    from gateway.state import PgCoordinator

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def handler(key: str, payload: Mapping[str, object]) -> str | None:
        with open(log_path, "a") as f:
            f.write(json.dumps({"key": key, "payload": dict(payload)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return f"refused by {member}" if payload.get("fail") == member else None

    coordinator = PgCoordinator(dsn, member, poll_seconds=0.5)
    coordinator.subscribe("models", handler)
    print("ready", flush=True)
    stop.wait()
    coordinator.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
