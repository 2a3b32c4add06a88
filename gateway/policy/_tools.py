"""The security team's toolchain behind ``gateway policy explain|diff|fmt``.

One module per verb (``_explain.py``, ``_diff.py``, ``_fmt.py``); these run on the slow,
exhaustive path (:meth:`Snapshot.evaluate`) so they can say *why*; the request path never
calls them.
"""

from __future__ import annotations

from gateway.policy._diff import (
    Change,
    access_diff,
    compile_files,
    conditional_changes,
    load_revision,
)
from gateway.policy._explain import Explanation, explain
from gateway.policy._fmt import format_directory, write_atomically

__all__ = ["Change", "Explanation", "access_diff", "compile_files", "conditional_changes",
           "explain", "format_directory", "load_revision",            "write_atomically"]
