"""OMS signature format: in-toto statement in a DSSE envelope in a Sigstore bundle v0.3.

Writer and strict reader for exactly what OpenSSF Model Signing (``model_signing`` 1.x,
"traditional" key and certificate signing) exchanges:

- Sigstore bundle, media type ``application/vnd.dev.sigstore.bundle.v0.3+json``, with
  ``verificationMaterial`` holding either ``publicKey.hint`` (hex SHA-256 of the public key's
  SubjectPublicKeyInfo PEM) or ``x509CertificateChain.certificates[].rawBytes`` (base64 DER,
  signing certificate first), and an empty ``tlogEntries``;
- DSSE envelope (DSSE v1.0 protocol), payload type ``application/vnd.in-toto+json``, one
  signature over PAE(payloadType, payload);
- in-toto Statement v1 with predicate type ``https://model_signing/signature/v1.0``: the
  predicate's ``serialization`` (method ``files``, ``hash_type`` sha256) and ``resources``
  (name, algorithm, digest); the single subject's sha256 is SHA-256 over the resources'
  raw digests in order.

The reader is stricter than ``model_signing``: duplicate JSON keys, unknown fields at any
level, other predicate types (including the pre-1.0 ``Digests/v0.1``), other hash or
signature algorithms, symlink-following serializations and unsafe resource names are all
refused. The writer emits RFC 8785 canonical JSON and deterministic ECDSA (RFC 6979), so
signing the same files with the same key gives the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography import x509

from gateway.models.signing._errors import SignatureError
from gateway.models.signing._manifest import ManifestError, check_name, root_digest, sort_key

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: A bundle larger than this is refused before parsing (a 100k-file manifest is ~15 MB).
MAX_BUNDLE_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleError(SignatureError):
    """The bundle or its statement is malformed or uses something we do not accept."""


@dataclass(frozen=True)
class Bundle:
    """The parts of a parsed bundle; ``key_hint`` xor ``chain`` is set."""

    key_hint: str | None
    chain: tuple[x509.Certificate, ...]
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class Statement:
    """The signed manifest: resources (name -> sha256 hex) in signed order, and its root."""

    subject_name: str
    root: str
    resources: dict[str, str]
    ignore_paths: tuple[str, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: "DSSEv1" SP len SP type SP len SP body."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def build_statement(subject_name: str, digests: dict[str, str],
                    ignore_paths: tuple[str, ...] = ("model.sig",)) -> bytes:
    """The canonical in-toto statement payload for ``digests`` (name -> sha256 hex)."""
    ordered = sorted(digests.items(), key=lambda item: sort_key(item[0]))
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": root_digest(ordered)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256",
                              "allow_symlinks": False,
                              "ignore_paths": sorted(ignore_paths)},
            "resources": [{"name": name, "algorithm": "sha256", "digest": digest}
                          for name, digest in ordered],
        },
    }
    return rfc8785.dumps(statement)


def build_bundle(payload: bytes, signature: bytes, *, key_hint: str | None = None,
                 chain: tuple[x509.Certificate, ...] = ()) -> bytes:
    """The canonical bundle JSON for a signed payload with key or certificate material."""
    from cryptography.hazmat.primitives.serialization import Encoding

    if chain:
        material: dict[str, Any] = {"x509CertificateChain": {"certificates": [
            {"rawBytes": _b64(cert.public_bytes(Encoding.DER))} for cert in chain]}}
    else:
        material = {"publicKey": {"hint": key_hint}}
    material["tlogEntries"] = []
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {"payload": _b64(payload), "payloadType": DSSE_PAYLOAD_TYPE,
                         "signatures": [{"sig": _b64(signature), "keyid": ""}]},
    }
    return rfc8785.dumps(bundle)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise BundleError(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleError(f"{where} is not valid base64") from err


def _strict_json(data: bytes, what: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise BundleError(f"{what}: duplicate JSON key {key!r}")
            obj[key] = value
        return obj

    def no_constants(name: str) -> Any:
        raise BundleError(f"{what}: non-standard JSON constant {name}")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates,
                          parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{what}: not valid UTF-8 JSON: {err}") from err


def _obj(value: Any, where: str, required: set[str], optional: set[str] = frozenset()
         ) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{where} must be a JSON object")
    missing = sorted(required - set(value))
    if missing:
        raise BundleError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(value) - required - optional)
    if unknown:
        raise BundleError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return value


def _expect(value: Any, expected: Any, where: str) -> None:
    if value != expected:
        raise BundleError(f"{where} is {value!r}; only {expected!r} is supported")


def parse_bundle(blob: bytes) -> Bundle:
    """Parse and structurally check a bundle (the signature itself is checked by the caller)."""
    if len(blob) > MAX_BUNDLE_BYTES:
        raise BundleError(f"signature bundle larger than {MAX_BUNDLE_BYTES} bytes")
    top = _obj(_strict_json(blob, "bundle"), "bundle",
               {"mediaType", "verificationMaterial", "dsseEnvelope"})
    _expect(top["mediaType"], BUNDLE_MEDIA_TYPE, "bundle mediaType")
    material = _obj(top["verificationMaterial"], "verificationMaterial", set(),
                    {"publicKey", "x509CertificateChain", "tlogEntries"})
    if material.get("tlogEntries", []) != []:
        raise BundleError("verificationMaterial.tlogEntries: transparency log entries are "
                          "not supported (must be empty)")
    if ("publicKey" in material) == ("x509CertificateChain" in material):
        raise BundleError("verificationMaterial must hold exactly one of publicKey and "
                          "x509CertificateChain")
    key_hint = None
    chain: tuple[x509.Certificate, ...] = ()
    if "publicKey" in material:
        hint = _obj(material["publicKey"], "verificationMaterial.publicKey", {"hint"})["hint"]
        if not isinstance(hint, str) or not _HEX64.fullmatch(hint):
            raise BundleError("publicKey.hint must be the 64-hex SHA-256 of the public key PEM")
        key_hint = hint
    else:
        certs = _obj(material["x509CertificateChain"], "x509CertificateChain",
                     {"certificates"})["certificates"]
        if not isinstance(certs, list) or not certs:
            raise BundleError("x509CertificateChain.certificates must be a non-empty list")
        parsed = []
        for i, entry in enumerate(certs):
            der = _unb64(_obj(entry, f"certificates[{i}]", {"rawBytes"})["rawBytes"],
                         f"certificates[{i}].rawBytes")
            try:
                parsed.append(x509.load_der_x509_certificate(der))
            except ValueError as err:
                raise BundleError(f"certificates[{i}] is not a DER certificate") from err
        chain = tuple(parsed)
    envelope = _obj(top["dsseEnvelope"], "dsseEnvelope", {"payload", "payloadType", "signatures"})
    _expect(envelope["payloadType"], DSSE_PAYLOAD_TYPE, "dsseEnvelope.payloadType")
    sigs = envelope["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1:
        raise BundleError("dsseEnvelope must hold exactly one signature")
    sig = _obj(sigs[0], "dsseEnvelope.signatures[0]", {"sig"}, {"keyid"})
    if not isinstance(sig.get("keyid", ""), str):
        raise BundleError("dsseEnvelope.signatures[0].keyid must be a string")
    return Bundle(key_hint=key_hint, chain=chain,
                  payload=_unb64(envelope["payload"], "dsseEnvelope.payload"),
                  signature=_unb64(sig["sig"], "dsseEnvelope.signatures[0].sig"))


def parse_statement(payload: bytes) -> Statement:
    """Parse the (already authenticated) payload into a manifest, refusing anything unknown."""
    st = _obj(_strict_json(payload, "statement"), "statement",
              {"_type", "subject", "predicateType", "predicate"})
    _expect(st["_type"], STATEMENT_TYPE, "statement _type")
    _expect(st["predicateType"], PREDICATE_TYPE, "statement predicateType")
    subjects = st["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise BundleError("statement must have exactly one subject")
    subject = _obj(subjects[0], "subject", {"name", "digest"})
    digest = _obj(subject["digest"], "subject.digest", {"sha256"})["sha256"]
    if not isinstance(subject["name"], str) or not isinstance(digest, str):
        raise BundleError("subject name and digest must be strings")
    predicate = _obj(st["predicate"], "predicate", {"serialization", "resources"})
    ser = _obj(predicate["serialization"], "predicate.serialization",
               {"method", "hash_type", "allow_symlinks"}, {"ignore_paths"})
    _expect(ser["method"], "files", "serialization method")
    _expect(ser["hash_type"], "sha256", "serialization hash_type")
    _expect(ser["allow_symlinks"], False, "serialization allow_symlinks")
    ignore_paths = ser.get("ignore_paths", [])
    if not isinstance(ignore_paths, list):
        raise BundleError("serialization ignore_paths must be a list")
    try:
        ignored = tuple(check_name(p, "ignore_paths entry") for p in ignore_paths)
    except ManifestError as err:
        raise BundleError(str(err)) from err
    resources: dict[str, str] = {}
    ordered = []
    if not isinstance(predicate["resources"], list):
        raise BundleError("predicate resources must be a list")
    for i, item in enumerate(predicate["resources"]):
        res = _obj(item, f"resources[{i}]", {"name", "algorithm", "digest"})
        _expect(res["algorithm"], "sha256", f"resources[{i}] algorithm")
        try:
            name = check_name(res["name"], "signed resource name")
        except ManifestError as err:
            raise BundleError(str(err)) from err
        if name in resources:
            raise BundleError(f"signed resource {name!r} listed twice")
        if not isinstance(res["digest"], str) or not _HEX64.fullmatch(res["digest"]):
            raise BundleError(f"resources[{i}] digest must be 64 lower-case hex characters")
        resources[name] = res["digest"]
        ordered.append((name, res["digest"]))
    if root_digest(ordered) != digest:
        raise BundleError("subject digest does not match the resources (inconsistent manifest)")
    return Statement(subject_name=subject["name"], root=digest, resources=resources,
                     ignore_paths=ignored)
