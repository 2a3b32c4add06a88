"""Trust policy evaluation: which signer may sign which model, and the signature check itself.

Rules are tried in configuration order. A key-signed bundle names its key by
``publicKey.hint``; the rules whose ``pubkey`` has that hint are its candidates. A
certificate-signed bundle's chain is validated against each certificate rule's CA at the
verification time, and the signing certificate's identities are matched against the rule's
``identities`` globs. Among candidates, only rules whose ``models`` globs match the model name
count. A candidate rule past its ``revoked_at`` refuses the signer outright, even if another
rule also names it: revoking a leaked key must not depend on finding every rule that lists
it. Every refusal names the rule(s) involved.

Certificate chains are validated by ``cryptography``'s RFC 5280 path builder with the WebPKI
profile for CA certificates (basicConstraints CA, keyUsage keyCertSign: stricter than the
OpenSSL store ``model_signing`` uses) and any extensions on the signing certificate, which
must however be meant for signing (``_check_signing_usage``).

Without a trusted timestamp the verifier cannot know when a signature was made, so both
revocation and certificate validity are judged at verification time: a key revoked from T
admits nothing from T on, and an expired signing certificate is refused (re-sign in time).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.models.signing._bundle import DSSE_PAYLOAD_TYPE, Bundle, pae
from gateway.models.signing._errors import SignatureError

if TYPE_CHECKING:
    from gateway.models.signing import TrustRule

#: ECDSA curves OMS allows (as ``model_signing``), each with the hash it is used with.
_CURVE_HASHES = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384,
                 "secp521r1": hashes.SHA512}


class TrustError(SignatureError):
    """Refused by the trust policy; ``rule`` names the deciding rule ('' if none applied)."""


@dataclass(frozen=True)
class Admitted:
    """Who signed (key id or certificate identity) and the rule that admitted it."""

    signer: str
    rule: str


def ecdsa_hash(public_key: object) -> hashes.HashAlgorithm:
    """The OMS hash for an EC key, or :class:`TrustError` for any other key type/curve."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TrustError(f"unsupported signature algorithm: {type(public_key).__name__} "
                         "(only ECDSA P-256/P-384/P-521)")
    name = public_key.curve.name
    if name not in _CURVE_HASHES:
        raise TrustError(f"unsupported ECDSA curve {name} (only P-256/P-384/P-521)")
    return _CURVE_HASHES[name]()


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """OMS ``publicKey.hint``: hex SHA-256 of the SubjectPublicKeyInfo PEM."""
    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read a PEM public key, accepting only the OMS ECDSA curves."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise TrustError("the rule's public key cannot be read",
                         detail=f"cannot read public key {path}: {err.strerror}") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise TrustError("the rule's public key is not a PEM public key",
                         detail=f"{path} is not a PEM public key") from err
    ecdsa_hash(key)
    return key  # type: ignore[return-value]


def load_ca(path: Path) -> list[x509.Certificate]:
    """Read a PEM bundle of trusted CA certificates."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as err:
        raise TrustError("the rule's CA bundle cannot be read",
                         detail=f"cannot read CA bundle {path}: {err.strerror}") from err
    except ValueError as err:
        raise TrustError("the rule's CA bundle holds no PEM certificate",
                         detail=f"{path} holds no PEM certificate") from err
    return certs


def cert_identities(cert: x509.Certificate) -> list[str]:
    """Identities a rule can match: SAN URIs, e-mails, DNS names, then the subject CN."""
    out: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for kind in (x509.UniformResourceIdentifier, x509.RFC822Name, x509.DNSName):
            out.extend(str(v) for v in san.get_values_for_type(kind))
    except x509.ExtensionNotFound:
        pass
    out.extend(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return out


def _check_signing_usage(cert: x509.Certificate) -> None:
    """The signing certificate must be meant for signing: KU digitalSignature, EKU codeSigning.

    Each extension is checked when present (at least one must be), which is stricter than
    ``model_signing`` (it accepts either) yet accepts what it issues in practice.
    """
    ku = eku = None
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    if ku is None and eku is None:
        raise TrustError("signing certificate has neither KeyUsage nor ExtendedKeyUsage")
    if ku is not None and not ku.digital_signature:
        raise TrustError("signing certificate's KeyUsage lacks digitalSignature")
    if eku is not None and ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise TrustError("signing certificate's ExtendedKeyUsage lacks codeSigning")


def _validate_chain(chain: tuple[x509.Certificate, ...], ca: list[x509.Certificate],
                    now: datetime) -> None:
    """RFC 5280 path validation of chain[0] via chain[1:] to a CA in ``ca``, at ``now``."""
    policy = (verification.PolicyBuilder().store(verification.Store(ca)).time(now)
              .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                                  ee_policy=verification.ExtensionPolicy.permit_all()))
    try:
        policy.build_client_verifier().verify(chain[0], list(chain[1:]))
    except verification.VerificationError as err:
        raise TrustError(f"certificate chain does not validate: {err}") from err


def _verify_sig(public_key: ec.EllipticCurvePublicKey, bundle: Bundle, who: str,
                rule: str) -> None:
    try:
        public_key.verify(bundle.signature, pae(DSSE_PAYLOAD_TYPE, bundle.payload),
                          ec.ECDSA(ecdsa_hash(public_key)))
    except InvalidSignature as err:
        raise TrustError(f"the DSSE signature does not verify with {who} (payload edited or "
                         f"signed by another key)", rule) from err


def _revoked(rule: TrustRule, now: datetime) -> bool:
    return bool(rule.revoked_at) and now >= datetime.fromisoformat(rule.revoked_at)


def admit(model_name: str, bundle: Bundle, rules: tuple[TrustRule, ...], now: datetime
          ) -> Admitted:
    """Find the rule that admits this bundle's signer for ``model_name`` and verify the
    DSSE signature with that rule's key; raise :class:`TrustError` naming why not."""
    if not any(_covers(r, model_name) for r in rules):
        raise TrustError("no [signing] trust rule covers this model name")
    problems: list[str] = []
    details: list[str] = []
    candidates: list[tuple[TrustRule, ec.EllipticCurvePublicKey, str]] = []
    if bundle.key_hint is not None:
        who = f"key sha256:{bundle.key_hint}"
        for rule in rules:
            if rule.pubkey is None:
                continue
            try:
                key = load_public_key(rule.pubkey)
            except TrustError as err:
                problems.append(f"rule {rule.name!r}: {err}")
                details.append(f"rule {rule.name!r}: {err.detail}")
                continue
            if key_hint(key) == bundle.key_hint:
                candidates.append((rule, key, f"sha256:{bundle.key_hint}"))
    else:
        leaf = bundle.chain[0]
        identities = cert_identities(leaf)
        who = f"certificate {identities[0] if identities else leaf.subject.rfc4514_string()!r}"
        for rule in rules:
            if rule.ca is None:
                continue
            try:
                _validate_chain(bundle.chain, load_ca(rule.ca), now)
                _check_signing_usage(leaf)
                public_key = leaf.public_key()
                ecdsa_hash(public_key)
            except TrustError as err:
                problems.append(f"rule {rule.name!r}: {err}")
                details.append(f"rule {rule.name!r}: {err.detail}")
                continue
            matched = [i for i in identities if any(fnmatchcase(i, g) for g in rule.identities)]
            if not matched:
                problems.append(f"rule {rule.name!r}: identity {', '.join(identities) or '-'} "
                                f"not in {', '.join(rule.identities)}")
                details.append(problems[-1])
                continue
            candidates.append((rule, public_key, matched[0]))  # type: ignore[arg-type]
    if not candidates:
        shown = f" ({'; '.join(problems)})" if problems else ""
        full = f" ({'; '.join(details)})" if details else ""
        raise TrustError(f"signed by {who}, which no trust rule accepts{shown}",
                         detail=f"signed by {who}, which no trust rule accepts{full}")
    # Revocation is about the signer (a leaked key), so it holds across every rule naming it.
    for rule, _, _ in candidates:
        if _revoked(rule, now):
            raise TrustError(f"rule {rule.name!r} revoked {who} from {rule.revoked_at}",
                             rule.name)
    covering = [c for c in candidates if _covers(c[0], model_name)]
    if not covering:
        names = "; ".join(f"rule {r.name!r} only for {', '.join(r.models)}"
                          for r, _, _ in candidates)
        raise TrustError(f"{who} may not sign this model: {names}",
                         candidates[0][0].name)
    rule, public_key, signer = covering[0]
    _verify_sig(public_key, bundle, who, rule.name)
    return Admitted(signer=signer, rule=rule.name)


def _covers(rule: TrustRule, model_name: str) -> bool:
    return any(fnmatchcase(model_name, glob) for glob in rule.models)
