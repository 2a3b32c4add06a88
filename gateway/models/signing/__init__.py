"""Model signatures in the OpenSSF Model Signing (OMS) format, checked against a trust policy.

    from gateway.models.signing import sign_model, verify_files
    sign_model(Path("models/iris/1"), key=Path("signer.key"))   # writes models/iris/1/model.sig
    verified = verify_files("iris", files, sig_bytes, config.signing)  # files: name -> bytes

``model.sig`` is a Sigstore bundle holding a DSSE-signed in-toto statement whose predicate
lists every file of the model version directory with its SHA-256 (``model.sig`` excluded), as
``model_signing`` 1.x writes and reads it: ours verifies with ``model_signing verify
key|certificate`` and theirs with ours. Verification works on bytes already in memory, so the
caller loads exactly the bytes that were verified (no re-reading of paths afterwards).

Verification is stricter than ``model_signing`` (see ``_bundle`` and ``_manifest``): unknown
fields, predicate types and algorithms are refused, unsafe names (absolute, ``..``) in a
signed manifest are refused, and every file present must be signed: nothing is ignored.
Encrypted files (``X.enc``) are signed and verified as their plaintext ``X``
(see :mod:`gateway.models.encryption`).

The trust policy (:class:`SigningSettings`, the ``[signing]`` table) says which keys or
certificate identities may sign which model names::

    [signing]
    require_signature = true
    kek_file = "keys/kek.hex"                       # for encrypted models (or kek_env)

    [[signing.trust]]
    name = "release-2026"                           # named in refusals and audit records
    models = ["fraud-*", "iris"]                    # model-name globs
    pubkey = "certs/signing/release-2026.pub"       # ECDSA P-256/384/521 PEM

    [[signing.trust]]
    name = "release-2025"                           # a second key, valid during rotation...
    pubkey = "certs/signing/release-2025.pub"
    revoked_at = "2026-12-01T00:00:00Z"             # ...until it is revoked

    [[signing.trust]]
    name = "org-ca"
    ca = "certs/org-ca.pem"                         # signing certificates chaining to this CA
    identities = ["release@example.com", "spiffe://example.org/ci/*"]

The built-in default trusts the demo key made by :func:`ensure_demo_signing_key`
(``certs/dev/signing/demo-signer.pub``) for every model, as rule ``demo``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway._atomic import write_atomic
from gateway.errors import ConfigError
from gateway.models import _files, _pipeline
from gateway.models._files import FileData
from gateway.models.signing import _bundle, _manifest, _trust
from gateway.models.signing._bundle import Statement
from gateway.models.signing._errors import SignatureError

__all__ = [
    "SIGNATURE_NAME",
    "SignatureError",
    "SigningSettings",
    "Statement",
    "TrustRule",
    "VerifiedModel",
    "default_subject",
    "ensure_demo_signing_key",
    "read_model_files",
    "sign_model",
    "signed_statement",
    "signed_subject",
    "verifier",
    "verify_files",
    "verify_model",
]

SIGNATURE_NAME = _manifest.SIGNATURE_NAME
#: Where `gateway demo init` puts the demo signing key pair (relative to the working dir).
DEMO_SIGNING_DIR = Path("certs/dev/signing")


@dataclass(frozen=True)
class TrustRule:
    """One ``[[signing.trust]]`` entry: a signer (a key, or a CA plus identities) and the
    models it may sign."""

    #: Unique name, reported in refusals and in :attr:`VerifiedModel.rule`.
    name: str
    #: Model-name globs (fnmatch, case-sensitive) this rule admits.
    models: tuple[str, ...] = ("*",)
    #: PEM public key (ECDSA P-256/P-384/P-521) of a key signer. Set this or ``ca``.
    pubkey: Path | None = None
    #: PEM CA bundle that certificate signers' chains must validate to. Set this or ``pubkey``.
    ca: Path | None = None
    #: Globs over the signing certificate's SAN URIs / e-mails / DNS names / subject CN.
    identities: tuple[str, ...] = ("*",)
    #: ISO 8601 time with zone from which this rule admits nothing ("" = never revoked).
    revoked_at: str = ""
    #: Bind signatures to what they are served as: "name" requires the signed subject to be
    #: the model's name (``<name>``, or ``<name>/<version>`` with the loaded version);
    #: "version" requires ``<name>/<version>`` exactly; "" binds nothing (``model_signing``
    #: names the subject after the signed directory). A signed copy of one model placed
    #: under another name or version is then refused.
    bind: str = ""
    #: Rollback protection: refuse a version lower than one this rule already admitted for
    #: the same model name in this process (versions load in ascending order at start-up).
    no_rollback: bool = False

    def __post_init__(self) -> None:
        where = f"[[signing.trust]] {self.name!r}"
        if not self.name:
            raise ConfigError("[[signing.trust]]: every rule needs a non-empty name")
        if (self.pubkey is None) == (self.ca is None):
            raise ConfigError(f"{where}: set exactly one of pubkey and ca")
        if not self.models:
            raise ConfigError(f"{where}: models must list at least one glob")
        if self.revoked_at:
            try:
                when = datetime.fromisoformat(self.revoked_at)
            except ValueError as err:
                raise ConfigError(f"{where}: revoked_at {self.revoked_at!r} is not an ISO 8601 "
                                  f"time") from err
            if when.tzinfo is None:
                raise ConfigError(f"{where}: revoked_at needs a time zone (e.g. ...Z)")
        if self.bind not in ("", "name", "version"):
            raise ConfigError(f"{where}: bind must be \"name\", \"version\" or \"\" (not "
                              f"{self.bind!r})")


def _demo_rules() -> tuple[TrustRule, ...]:
    return (TrustRule(name="demo", models=("*",), pubkey=DEMO_SIGNING_DIR / "demo-signer.pub",
                      bind="version"),)


@dataclass(frozen=True)
class SigningSettings:
    """The ``[signing]`` table: the trust policy for model signatures and the KEK source."""

    #: Refuse models without ``model.sig``. When false an unsigned model may be served, but a
    #: present signature must still verify.
    require_signature: bool = True
    #: Trust rules, tried in order; the default trusts the demo key for every model.
    trust: tuple[TrustRule, ...] = field(default_factory=_demo_rules)
    #: File holding the key-encryption key (64 hex chars) for encrypted (``*.enc``) files.
    kek_file: Path | None = None
    #: Environment variable holding the KEK, used when ``kek_file`` is unset.
    kek_env: str = ""

    def __post_init__(self) -> None:
        names = [rule.name for rule in self.trust]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"[signing]: duplicate trust rule name(s) {', '.join(dupes)}")


@dataclass(frozen=True)
class VerifiedModel:
    """What a successful verification proves."""

    #: Hex SHA-256 over the manifest (the OMS subject digest), naming this exact model.
    digest: str
    #: ``sha256:<key hint>`` for a key signer, the certificate identity for a certificate.
    signer: str
    #: Name of the trust rule that admitted the signer.
    rule: str
    #: Every signed file name, in manifest order.
    files: tuple[str, ...] = ()


def verify_files(model_name: str, files: Mapping[str, FileData], bundle: bytes,
                 settings: SigningSettings, *, version: str = "",
                 digests: Mapping[str, str] | None = None,
                 now: datetime | None = None,
                 pending: frozenset[str] = frozenset()) -> VerifiedModel:
    """Verify ``bundle`` (model.sig bytes) over ``files`` (relative POSIX name -> plaintext).

    ``files`` must hold every file of the version directory except ``model.sig`` and the
    ignored git paths (as :func:`gateway.models._files.read_model_dir` returns them); one
    not in the signed manifest is refused, never ignored. ``digests`` are the files'
    SHA-256 if already computed while reading. ``pending`` names files present whose digest
    is not known yet: everything else is verified, and their digests are taken as signed, so
    the caller must verify again once they are known (see :func:`verifier`). Raises
    :class:`SignatureError`.
    """
    if digests is None:
        digests = _manifest.digests_of_bytes(files)
    for name in (*digests, *pending):
        _manifest.check_name(name, "file name")
    return _verify(model_name, version, dict(digests), bundle, settings, now, pending)


def verifier(settings: SigningSettings, *, now: datetime | None = None) -> _pipeline.Verify:
    """The signature step of the load pipeline for this trust policy (serving and the CLI).

    A model without ``model.sig`` is refused when ``require_signature`` is set, and otherwise
    served unverified (the step returns None); a present signature must always verify.
    The step remembers the versions its ``no_rollback`` rules admitted, per model name, so
    a version lower than one already admitted (and not admitted itself) is refused.

    Called with ``pending`` (staged files still being hashed, :mod:`gateway.models._pipeline`)
    it checks everything but those digests and neither checks nor records rollback: the
    pipeline calls it again, without ``pending``, over every digest, and that call decides.
    """
    rules = {rule.name: rule for rule in settings.trust}
    admitted: dict[str, set[int]] = {}
    lock = threading.Lock()

    def verify(name: str, version: str, files: dict[str, FileData], digests: dict[str, str],
               bundle: bytes | None, *, pending: frozenset[str] = frozenset()
               ) -> tuple[str, str, str] | None:
        if bundle is None:
            if settings.require_signature:
                raise SignatureError(f"model {name!r} is unsigned (no {SIGNATURE_NAME}); "
                                     "refused")
            return None
        verified = verify_files(name, files, bundle, settings, version=version,
                                digests=digests, now=now, pending=pending)
        if rules[verified.rule].no_rollback and version.isdigit() and not pending:
            with lock:
                seen = admitted.setdefault(name, set())
                if seen and int(version) not in seen and int(version) < max(seen):
                    raise SignatureError(
                        f"model {name!r} version {version} is older than version {max(seen)}, "
                        f"already trusted; rule {verified.rule!r} refuses rollback",
                        verified.rule)
                seen.add(int(version))
        return verified.digest, verified.signer, verified.rule

    return verify


def verify_model(model_dir: Path, settings: SigningSettings, *, model_name: str | None = None,
                 version: str | None = None, kek: bytes | None = None,
                 now: datetime | None = None, progress: bool = False) -> VerifiedModel:
    """Verify ``model_dir`` exactly as the gateway does before serving it (for the CLI).

    The same pipeline as serving (:func:`gateway.models._pipeline.open_version`): the one
    reader, in-memory decryption, the signature, then every external-data reference. The
    name and version for the trust policy default to the repository layout's
    ``models/<name>/<version>``. A signature is required whatever ``require_signature`` says.
    """
    name = model_name or model_dir.resolve().parent.name
    version = version if version is not None else model_dir.resolve().name
    signed = SigningSettings(require_signature=True, trust=settings.trust)
    check = verifier(signed, now=now)
    result: list[VerifiedModel] = []

    def verify(name: str, version: str, files: dict[str, FileData], digests: dict[str, str],
               bundle: bytes | None, *, pending: frozenset[str] = frozenset()
               ) -> tuple[str, str, str] | None:
        # load=False below: nothing is staged, so nothing is ever pending here.
        verified = check(name, version, files, digests, bundle, pending=pending)
        # require_signature is set: an unsigned model raised instead of returning None.
        assert verified is not None
        digest, signer, rule = verified
        signed = tuple(sorted(digests, key=_manifest.sort_key))
        result.append(VerifiedModel(digest, signer, rule, files=signed))
        return verified

    with _progress_bar(progress, f"verify {model_dir}") as on_bytes:
        _pipeline.open_version(model_dir, name, version, verify=verify,
                               decrypt=_decrypter(kek), on_bytes=on_bytes, load=False)
    return result[0]


def _verify(model_name: str, version: str, digests: dict[str, str], blob: bytes,
            settings: SigningSettings, now: datetime | None,
            pending: frozenset[str] = frozenset()) -> VerifiedModel:
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    where = f"model {model_name!r}"
    try:
        bundle = _bundle.parse_bundle(blob)
    except _bundle.BundleError as err:
        raise SignatureError(f"{where}: malformed {SIGNATURE_NAME}: {err}") from err
    try:
        admitted = _trust.admit(model_name, bundle, settings.trust, now)
    except _trust.TrustError as err:
        raise SignatureError(f"{where}: untrusted signature: {err}", err.rule,
                             detail=f"{where}: untrusted signature: {err.detail}") from err
    try:
        statement = _bundle.parse_statement(bundle.payload)
    except _bundle.BundleError as err:
        raise SignatureError(f"{where}: signed manifest refused: {err}", admitted.rule) from err
    for name in pending:  # present, digest not known yet: taken as signed (see verify_files)
        digests[name] = statement.resources.get(name, "")
    problems = _manifest.differences(statement.resources, digests, statement.ignore_paths)
    if problems:
        raise SignatureError(f"{where} does not match its signature: " + "; ".join(problems),
                             admitted.rule)
    rule = next(r for r in settings.trust if r.name == admitted.rule)
    _check_subject(rule, statement.subject_name, model_name, version)
    return VerifiedModel(digest=statement.root, signer=admitted.signer, rule=admitted.rule,
                         files=tuple(statement.resources))


def _check_subject(rule: TrustRule, subject: str, name: str, version: str) -> None:
    """Refuse a signature whose subject names another model (or version) than the loaded one."""
    if not rule.bind:
        return
    signed_name, _, signed_version = subject.partition("/")
    wanted = f"{name}/{version}" if rule.bind == "version" else name
    ok = signed_name == name and (signed_version == version if (
        signed_version or rule.bind == "version") else True)
    if not ok:
        raise SignatureError(
            f"model {name!r} version {version or '?'}: signed as {subject!r}, not as "
            f"{wanted!r}; rule {rule.name!r} binds signatures to the model they are served as",
            rule.name)


def signed_subject(bundle: bytes) -> str:
    """The subject a bundle names (not verified: for tools deciding whether to re-sign)."""
    return signed_statement(bundle).subject_name


def signed_statement(bundle: bytes) -> Statement:
    """The manifest a bundle carries (not verified: for tools that describe a signature).

    :raises SignatureError: the bundle or its statement cannot be parsed.
    """
    return _bundle.parse_statement(_bundle.parse_bundle(bundle).payload)


def default_subject(model_dir: Path) -> str:
    """``<name>/<version>`` for a repository layout ``.../<name>/<version>``, else the
    directory's name (as ``model_signing`` names it)."""
    resolved = model_dir.resolve()
    if resolved.name.isdigit() and resolved.parent.name:
        return f"{resolved.parent.name}/{resolved.name}"
    return resolved.name


def read_model_files(model_dir: Path, *, kek: bytes | None = None) -> dict[str, FileData]:
    """The files :func:`verify_files` expects, read by the one reader, ``X.enc`` decrypted.

    Raises :class:`~gateway.errors.ModelUnavailable` (a subclass naming the offending file)
    for links, special files and encrypted files without ``kek``.
    """
    return _files.plaintext(_files.read_model_dir(model_dir), _decrypter(kek))[0]


def _decrypter(kek: bytes | None) -> Callable[[FileData], bytes] | None:
    if kek is None:
        return None
    from gateway.models.encryption import decrypt_bytes

    return lambda blob: decrypt_bytes(blob, kek)


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str) -> Iterator[Callable[[int], object] | None]:
    """A tqdm byte counter on stderr (for the CLI), as an ``on_bytes`` callback or None."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False) as bar:
        yield bar.update


def sign_model(model_dir: Path, *, key: Path, cert: Path | None = None,
               chain: Sequence[Path] = (), progress: bool = False,
               kek: bytes | None = None, subject: str | None = None) -> Path:
    """Sign every file of ``model_dir`` (``model.sig`` excluded) and write ``model_dir/model.sig``.

    ``key`` is an unencrypted PEM ECDSA private key (P-256/P-384/P-521). With ``cert`` (its
    X.509 certificate) and ``chain`` (intermediate/CA PEMs) the bundle carries the certificate
    chain; otherwise the key's hint. Output is deterministic (canonical JSON, RFC 6979
    ECDSA). ``kek`` decrypts ``*.enc`` files so their plaintext is what gets signed.
    ``subject`` names what is signed (default :func:`default_subject`: ``<name>/<version>``
    in a repository), which trust rules with ``bind`` check against what it is served as.
    The signature leaves out, and records in its ignore paths, ``model_signing``'s default
    ignore set (``.git``, ``.gitattributes``, ``.github``, ``.gitignore``, ``model.sig``).
    """
    private_key = _load_private_key(key)
    public_key = private_key.public_key()
    certs: tuple[x509.Certificate, ...] = ()
    if cert is not None:
        leaf = _load_certs(cert)[0]
        if leaf.public_key() != public_key:
            raise SignatureError(f"{cert}: certificate does not belong to the key {key}")
        certs = (leaf, *(c for path in chain for c in _load_certs(path)))
    elif chain:
        raise SignatureError("--chain needs --cert (the signing certificate)")
    with _progress_bar(progress, f"sign {model_dir}") as on_bytes:
        model = _files.read_model_dir(model_dir, on_bytes=on_bytes, keep_only=frozenset())
    _, digests, _ = _files.plaintext(model, _decrypter(kek))
    payload = _bundle.build_statement(subject or default_subject(model_dir), digests,
                                      _files.SIGNATURE_IGNORE_PATHS)
    try:
        algorithm = ec.ECDSA(_trust.ecdsa_hash(public_key), deterministic_signing=True)
    except _trust.TrustError as err:
        raise SignatureError(f"{key}: {err}") from err
    signature = private_key.sign(_bundle.pae(_bundle.DSSE_PAYLOAD_TYPE, payload), algorithm)
    blob = _bundle.build_bundle(payload, signature, key_hint=_trust.key_hint(public_key),
                                chain=certs)
    target = model_dir / SIGNATURE_NAME
    write_atomic(target, blob, mode=0o644)
    return target


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise SignatureError(f"cannot read signing key {path}: {err.strerror}") from err
    except TypeError as err:
        raise SignatureError(f"{path}: password-protected keys are not supported") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SignatureError(f"{path} is not a PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"{path}: OMS signing needs an ECDSA key (P-256/P-384/P-521)")
    try:
        _trust.ecdsa_hash(key.public_key())
    except _trust.TrustError as err:
        raise SignatureError(f"{path}: {err}") from err
    return key


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as err:
        raise SignatureError(f"cannot read certificate {path}: {err.strerror}") from err
    except ValueError as err:
        raise SignatureError(f"{path} holds no PEM certificate") from err



def ensure_demo_signing_key(directory: Path = DEMO_SIGNING_DIR) -> tuple[Path, Path]:
    """Create (if absent) the demo ECDSA P-256 signing key pair in ``directory``.

    Returns (``demo-signer.key``, mode 0600; ``demo-signer.pub``). The default
    :class:`SigningSettings` trusts ``certs/dev/signing/demo-signer.pub`` for every model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / "demo-signer.key", directory / "demo-signer.pub"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(private, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
    if not public.exists():
        key = _load_private_key(private)
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        write_atomic(public, public_pem, mode=0o644)
    return private, public
