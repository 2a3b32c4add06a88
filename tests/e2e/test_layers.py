"""The package's shape, checked rather than reviewed.

Two rules from the architecture: layers point down (the import-linter contract in
``.importlinter``, run by ``make test``), and a package's private modules are private to it.
The second rule is a ratchet: today's known exceptions are listed below and may only shrink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

def _owner(module: str) -> str | None:
    """The package that owns ``module`` if it is private: the part before its first ``_name``."""
    parts = module.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def private_imports() -> set[tuple[str, str]]:
    """Every import of a private module from outside the package that owns it."""
    graph = grimp.build_graph("gateway", include_external_packages=False)
    found = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            owner = _owner(imported)
            if owner in (None, "gateway"):  # gateway._proto, gateway._atomic: shared by design
                continue
            if importer != owner and not importer.startswith(owner + "."):
                found.add((importer, imported))
    return found


def test_no_new_private_imports_across_packages():
    """A private module (``_name``) is used only inside the package that owns it; everything
    else goes through the package's public API (its ``__init__``)."""
    assert private_imports() == set(), "import the owning package's public API instead"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layer_contract_holds():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line", "broken"), [
    # A domain module that imports the serving layer.
    ("audit/_keys.py", "from gateway.server import _guard",
     "gateway.audit._keys -> gateway.server._guard"),
    # The guard importing a servicer above it.
    ("server/_guard.py", "from gateway.server import _oip",
     "gateway.server._guard -> gateway.server._oip"),
    # A domain module speaking the wire format itself.
    ("policy/_glob.py", "from gateway._proto.gateway.v1 import audit_pb2",
     "gateway.policy._glob -> gateway._proto.gateway.v1.audit_pb2"),
])
def test_layer_contract_fails_on_an_upward_import(tmp_path, module, line, broken):
    """The contracts can fail: each of these imports breaks one."""
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with (tmp_path / "gateway" / module).open("a") as f:
        f.write(f"\n{line}  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout
