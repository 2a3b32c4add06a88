"""Directories for keys, certificates and the audit log are 0700 whatever the umask."""

from __future__ import annotations

import os
import stat

from gateway._atomic import private_dir
from gateway.audit._keys import generate


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_parents_are_created_private_and_existing_ones_left(tmp_path):
    tmp_path.chmod(0o755)
    old = os.umask(0)
    try:
        private_dir(tmp_path / "x" / "y" / "z")
        generate(tmp_path / "audit" / "keys" / "log.skey", tmp_path / "audit" / "keys" / "p.key",
                 "test")
    finally:
        os.umask(old)
    assert _mode(tmp_path) == 0o755
    for path in (tmp_path / "x", tmp_path / "x" / "y", tmp_path / "x" / "y" / "z",
                 tmp_path / "audit", tmp_path / "audit" / "keys"):
        assert _mode(path) == 0o700, path
