"""What a caller may read of a model error: reasons, not server internals.

Errors of the models package are written so that ``str(err)`` names no server path; these
helpers are the net under that rule, applied where a reason becomes caller-visible (a
refused entry's reason, an ONNX Runtime failure). The full text goes to the log and the
audit record.
"""

from __future__ import annotations

import re

# An absolute POSIX path of two or more components (a server path), not a lone "/".
_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.@+-]+/)+[\w.@+-]*")
# ONNX Runtime's "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : text" prefix.
_ORT = re.compile(r"^\[ONNXRuntimeError\] : \d+ : ([A-Z_]+) : ?(.*)$", re.S)
# A C++ source location ONNX Runtime puts in front of many messages.
_SOURCE = re.compile(r"\S+\.(?:cc|cpp|h|hpp|cu):\d+")


def redact(text: str) -> str:
    """``text`` with absolute paths replaced by ``<path>``."""
    return _PATH.sub("<path>", text)


def ort_message(err: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message without its source location and C++ signature.

    A message with a source location reads ``file:line signature condition was false.
    text``: the text after "was false." is kept; when there is none, the signature cannot
    be told from the message, so only the status name is given (e.g. ``FAIL``).
    """
    text = " ".join(str(err).split())
    match = _ORT.match(text)
    code, body = (match.group(1), match.group(2)) if match else ("", text)
    where = _SOURCE.search(body)
    if where:
        _, enforced, tail = body[where.end():].partition(" was false. ")
        if not enforced or not tail.strip():
            return f"ONNX Runtime error {code or type(err).__name__} (details in the server log)"
        body = f"{body[:where.start()].strip()} {tail.strip()}".strip()
    body = redact(body)[:limit]
    return f"{code}: {body}" if code else body
