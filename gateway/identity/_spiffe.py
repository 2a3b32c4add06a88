"""SPIFFE ID syntax, per spiffe/spiffe ``standards/SPIFFE-ID.md`` (sections 2, 2.1, 2.2, 2.3).

The checks are done by hand on the string rather than through ``urllib.parse``, whose
lenient parsing (it lower-cases nothing, splits ports, ignores some characters) would make
the accepted set of IDs depend on its quirks. Every rejection says which rule failed.
"""

from __future__ import annotations

import string

from gateway.errors import IdentityError

SCHEME_PREFIX = "spiffe://"

#: Section 2.3: implementations must support IDs up to 2048 bytes; we refuse longer ones.
MAX_ID_BYTES = 2048
#: Section 2.3: RFC 3986 limits the host, hence the trust domain name, to 255 bytes.
MAX_TRUST_DOMAIN_BYTES = 255

# Section 2.1: trust domain names use [a-z0-9.-_] only.
_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
# Section 2.2: path segments use [a-zA-Z0-9.-_] only.
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


class SpiffeIdError(IdentityError, ValueError):
    """The string is not a valid SPIFFE ID; the message names the rule it breaks."""


def check_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid trust domain name (section 2.1), else raise."""
    if not name:
        raise SpiffeIdError("trust domain is empty")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if "@" in name:
        raise SpiffeIdError("trust domain must not carry userinfo ('@')")
    if ":" in name:
        raise SpiffeIdError("trust domain must not carry a port (':')")
    if "%" in name:
        raise SpiffeIdError("trust domain must not contain percent-encoded characters")
    if name != name.lower():
        raise SpiffeIdError(f"trust domain {name!r} must be lower-case")
    bad = sorted(set(name) - _TRUST_DOMAIN_CHARS)
    if bad:
        raise SpiffeIdError(f"trust domain {name!r} contains {_chars(bad)}; "
                            f"only [a-z0-9.-_] are allowed")
    return name


def parse_spiffe_id(uri: str) -> tuple[str, tuple[str, ...]]:
    """Split a SPIFFE ID into (trust domain, path segments); raise SpiffeIdError if invalid.

    Besides the syntax of SPIFFE-ID.md, the path must be non-empty: X509-SVID.md section 3.1
    requires a leaf (a caller) to have a non-root path; a bare trust domain names the
    signing authority, never a workload.
    """
    if len(uri.encode()) > MAX_ID_BYTES:
        raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    if not uri.startswith(SCHEME_PREFIX):
        if uri.lower().startswith(SCHEME_PREFIX):
            raise SpiffeIdError(f"{uri!r}: scheme must be written 'spiffe' in lower case")
        scheme = uri.partition(":")[0] if ":" in uri else ""
        if scheme:
            raise SpiffeIdError(f"{uri!r}: scheme is {scheme!r}, not 'spiffe'")
        raise SpiffeIdError(f"{uri!r}: not a spiffe:// URI")
    rest = uri[len(SCHEME_PREFIX):]
    # Query and fragment are checked first: '?' and '#' may appear before the first '/'.
    if "?" in rest:
        raise SpiffeIdError(f"{uri!r}: a SPIFFE ID must not have a query ('?')")
    if "#" in rest:
        raise SpiffeIdError(f"{uri!r}: a SPIFFE ID must not have a fragment ('#')")
    trust_domain, slash, path = rest.partition("/")
    try:
        check_trust_domain(trust_domain)
    except SpiffeIdError as err:
        raise SpiffeIdError(f"{uri!r}: {err}") from None
    if not slash or not path:
        raise SpiffeIdError(f"{uri!r}: has no path; a caller's SPIFFE ID names a workload "
                            f"under its trust domain (spiffe://{trust_domain}/...)")
    if "%" in path:
        raise SpiffeIdError(f"{uri!r}: path must not contain percent-encoded characters")
    segments = tuple(path.split("/"))
    for segment in segments:
        if segment == "":
            raise SpiffeIdError(f"{uri!r}: path has an empty segment "
                                f"('//' or a trailing '/')")
        if segment in (".", ".."):
            raise SpiffeIdError(f"{uri!r}: path has a relative segment {segment!r}")
        bad = sorted(set(segment) - _SEGMENT_CHARS)
        if bad:
            raise SpiffeIdError(f"{uri!r}: path segment {segment!r} contains {_chars(bad)}; "
                                f"only [a-zA-Z0-9.-_] are allowed")
    return trust_domain, segments


def _chars(chars: list[str]) -> str:
    return ", ".join(repr(c) for c in chars)
