"""Mutual-TLS server credentials that pick up new certificate files without a restart.

gRPC's dynamic SSL credentials call a fetcher before *every* TLS handshake; the fetcher
returns a new certificate configuration or None ("no change"). Ours costs three ``stat``
calls when nothing changed. When the files' identity (device, inode, size, mtime) changes
it reads and checks the new set (the key matches the certificate, the CA bundle parses)
before handing it to gRPC; a broken or half-rotated set keeps the last good configuration
and logs an error once per distinct state, so a rotation done file by file heals itself as
soon as the last file lands.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import ConfigError

log = logging.getLogger("gateway.identity")

_Signature = tuple[tuple[int, int, int, int], ...]
_NEVER: object = object()  # "no failed state yet" (None means "a file is missing")


class CertificateFiles:
    """The server certificate chain, its key and the client CA bundle(s), as files on disk.

    ``extra_cas`` (the per-domain trust bundles) join ``ca`` in the handshake's root set.
    """

    def __init__(self, cert: Path, key: Path, ca: Path, extra_cas: tuple[Path, ...] = ()) -> None:
        self.paths = (Path(cert), Path(key), Path(ca),
                      *(p for p in map(Path, extra_cas) if p != Path(ca)))
        self._lock = threading.Lock()
        signature = self._signature()
        if signature is None:
            missing = [str(p) for p in self.paths if not p.exists()]
            raise ConfigError(f"TLS file(s) missing: {', '.join(missing)} "
                              f"(run `gateway certs init` for a development PKI)")
        self.initial = self._load()  # ConfigError names the bad file
        self._current = signature
        self._failed: object = _NEVER
        #: Successful reloads since start (for monitoring and tests).
        self.reloads = 0

    def _signature(self) -> _Signature | None:
        try:
            stats = [os.stat(p) for p in self.paths]
        except OSError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_path, key_path, *ca_paths = self.paths
        try:
            chain_pem, key_pem, *ca_pems = (p.read_bytes() for p in self.paths)
        except OSError as err:
            raise ConfigError(f"cannot read TLS file: {err}") from err
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as err:
            raise ConfigError(f"{cert_path}: not a PEM certificate chain: {err}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{key_path}: not an unencrypted PEM private key: "
                              f"{err}") from None
        if key.public_key() != chain[0].public_key():
            raise ConfigError(f"{key_path} does not match the certificate in {cert_path}")
        for ca_path, ca_pem in zip(ca_paths, ca_pems, strict=True):
            try:
                x509.load_pem_x509_certificates(ca_pem)
            except ValueError as err:
                raise ConfigError(f"{ca_path}: not a PEM CA bundle: {err}") from None
        roots = b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem in ca_pems)
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The gRPC fetcher: a new configuration if the files changed and are good, else None.

        Never raises: an exception here would surface inside gRPC core's handshake.
        """
        try:
            signature = self._signature()
            if signature == self._current or signature == self._failed:
                return None
            with self._lock:
                if signature == self._current:
                    return None
                if signature is None:
                    missing = [str(p) for p in self.paths if not p.exists()]
                    log.error("TLS file(s) missing: %s; keeping the last good "
                              "certificates", ", ".join(missing))
                    self._failed = signature
                    return None
                try:
                    config = self._load()
                except ConfigError as err:
                    log.error("TLS reload failed, keeping the last good certificates: %s",
                              err)
                    self._failed = signature
                    return None
                self._current = signature
                self._failed = _NEVER
                self.reloads += 1
                log.info("TLS certificates reloaded from %s", ", ".join(map(str, self.paths)))
                return config
        except Exception:  # a bug here must not break every handshake
            log.exception("unexpected error while checking TLS files")
            return None


def server_credentials(cert: Path, key: Path, ca: Path,
                       extra_cas: tuple[Path, ...] = ()) -> grpc.ServerCredentials:
    """mTLS server credentials: client certificates required and verified against ``ca``
    (and ``extra_cas``); the files are re-read when they change (checked at each new
    connection).

    Raises ConfigError naming the file if the initial set is missing or broken.
    """
    files = CertificateFiles(cert, key, ca, extra_cas)
    return grpc.dynamic_ssl_server_credentials(
        files.initial,
        # The stub wants a configuration every time; gRPC documents None as "no change".
        files.fetch,  # type: ignore[arg-type]
        require_client_authentication=True)


def https_client_auth(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A TLS server context for a plain HTTPS listener (the /metrics endpoint): ``cert`` and
    ``key`` as the gRPC port uses them, client certificates required and verified against
    ``ca``. Read once; ConfigError names the files if they cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load {cert}, {key} or {ca} for HTTPS: {err}") from err
    context.verify_mode = ssl.CERT_REQUIRED
    return context
