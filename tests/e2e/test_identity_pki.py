"""The development PKI, the `gateway certs` verbs, and IdentityVerifier below the TLS layer."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.cli import _certs
from gateway.errors import ConfigError, Unauthenticated
from gateway.identity import IdentityVerifier, pki

SCORER = "spiffe://demo.local/svc/scorer"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- init_dev_pki ---------------------------------------------------------------------

def test_init_dev_pki_writes_the_demo_layout(tmp_path: Path) -> None:
    out = pki.init_dev_pki(tmp_path / "dev")
    d = tmp_path / "dev"
    expected = {"ca.pem", "ca.key", "server.pem", "server.key"} | {
        f"clients/{n}.{ext}" for n in pki.DEMO_CLIENTS for ext in ("pem", "key")}
    assert set(_snapshot(d)) == expected  # and no temporary files left behind
    for key in d.rglob("*.key"):
        assert _mode(key) == 0o600, key
    assert out["ca"] == d / "ca.pem" and out["server"] == d / "server.pem"
    assert len(out["written"]) == 2 + len(pki.DEMO_CLIENTS) and out["kept"] == []

    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    for name, spiffe_id in pki.DEMO_CLIENTS.items():
        cert = x509.load_pem_x509_certificate((d / "clients" / f"{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert _uris(cert) == [spiffe_id]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_dev_pki_is_idempotent_and_force_starts_over(tmp_path: Path) -> None:
    pki.init_dev_pki(tmp_path)
    first = _snapshot(tmp_path)
    again = pki.init_dev_pki(tmp_path)
    assert _snapshot(tmp_path) == first
    assert again["written"] == [] and len(again["kept"]) == 2 + len(pki.DEMO_CLIENTS)

    forced = pki.init_dev_pki(tmp_path, force=True)
    after = _snapshot(tmp_path)
    assert all(after[name] != first[name] for name in first)
    assert len(forced["written"]) == 2 + len(pki.DEMO_CLIENTS)


def test_init_dev_pki_reissues_only_missing_or_foreign_leaves(tmp_path: Path) -> None:
    pki.init_dev_pki(tmp_path)
    first = _snapshot(tmp_path)
    (tmp_path / "clients" / "auditor.pem").unlink()
    pki.issue_client(pki.create_ca("stranger"), uris=[SCORER]).write(
        tmp_path / "clients" / "scorer.pem", tmp_path / "clients" / "scorer.key")
    out = pki.init_dev_pki(tmp_path)
    assert sorted(p.name for p in out["written"]) == ["auditor.pem", "scorer.pem"]
    after = _snapshot(tmp_path)
    assert after["ca.pem"] == first["ca.pem"] and after["server.pem"] == first["server.pem"]
    ca = x509.load_pem_x509_certificate(after["ca.pem"])
    x509.load_pem_x509_certificate(after["clients/scorer.pem"]).verify_directly_issued_by(ca)


def test_init_dev_pki_refuses_a_ca_without_its_key(tmp_path: Path) -> None:
    pki.init_dev_pki(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ConfigError, match=r"ca\.key does not"):
        pki.init_dev_pki(tmp_path)


def test_init_dev_pki_refuses_an_expired_or_broken_ca(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    pki.create_ca(not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1)
                  ).write(tmp_path / "ca.pem", tmp_path / "ca.key")
    with pytest.raises(ConfigError, match="has expired; use --force"):
        pki.init_dev_pki(tmp_path)
    (tmp_path / "ca.pem").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"cannot read certificate.*--force"):
        pki.init_dev_pki(tmp_path)
    assert len(pki.init_dev_pki(tmp_path, force=True)["written"]) == 2 + len(pki.DEMO_CLIENTS)


def test_write_file_replaces_atomically_with_the_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.key"
    pki.write_file(target, b"one", private=True)
    pki.write_file(target, b"two", private=True)
    assert target.read_bytes() == b"two" and _mode(target) == 0o600
    pki.write_file(tmp_path / "x.pem", b"cert")
    assert _mode(tmp_path / "x.pem") == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "x.key", "x.pem"]


def test_load_pair_names_a_key_that_does_not_match(tmp_path: Path) -> None:
    pki.init_dev_pki(tmp_path)
    with pytest.raises(ConfigError, match="does not belong"):
        pki.load_pair(tmp_path / "ca.pem", tmp_path / "server.key")


def test_issue_client_refuses_an_empty_window_and_no_names() -> None:
    ca = pki.create_ca()
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="empty"):
        pki.issue_client(ca, uris=[SCORER], not_before=now, not_after=now)
    with pytest.raises(ValueError, match="URI SAN or a common name"):
        pki.issue_client(ca)


# --- gateway certs init / issue -------------------------------------------------------

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway")
    _certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_certs_init_prints_what_it_wrote_then_what_it_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["certs", "init", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'clients' / 'scorer.pem'}" in out
    assert _run(["certs", "init", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote" not in out and f"kept  {tmp_path / 'server.pem'}" in out


def test_cli_certs_issue_mints_a_client_from_the_ca(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(["certs", "init", "--dir", str(tmp_path)])
    uri = "spiffe://demo.local/svc/batch"
    assert _run(["certs", "issue", "batch", "--uri", uri, "--days", "7",
                 "--dir", str(tmp_path)]) == 0
    assert "clients/batch.pem" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((tmp_path / "clients" / "batch.pem").read_bytes())
    assert _uris(cert) == [uri]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=7) <= lifetime <= dt.timedelta(days=7, minutes=10)
    assert _mode(tmp_path / "clients" / "batch.key") == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    # Not silently replaced...
    with pytest.raises(ConfigError, match="exists; pass --force"):
        _run(["certs", "issue", "batch", "--uri", uri, "--dir", str(tmp_path)])
    # ...unless asked.
    assert _run(["certs", "issue", "batch", "--cn", "batch", "--force",
                 "--dir", str(tmp_path)]) == 0
    assert "cn_issuers" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bad/name", "--uri", SCORER], "NAME"),
    ([".hidden", "--uri", SCORER], "NAME"),
    (["ok"], "give --uri"),
    (["ok", "--uri", "spiffe://demo.local/a/../b"], "relative segment"),
    (["ok", "--uri", "https://demo.local/a"], "scheme is 'https'"),
    (["ok", "--uri", SCORER, "--days", "0"], "--days"),
])
def test_cli_certs_issue_rejects_bad_input_by_name(tmp_path: Path, argv: list[str],
                                                   message: str) -> None:
    _run(["certs", "init", "--dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=message):
        _run(["certs", "issue", *argv, "--dir", str(tmp_path)])


def test_cli_certs_issue_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certs init"):
        _run(["certs", "issue", "x", "--uri", SCORER, "--dir", str(tmp_path)])


# --- IdentityVerifier on PEM bytes ----------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> pki.CertifiedKey:
    return pki.create_ca("Unit CA")


def test_identity_fields_and_abac_attributes(ca: pki.CertifiedKey) -> None:
    client = pki.issue_client(ca, uris=["spiffe://demo.local/team/audit/auditor"])
    ident = IdentityVerifier(["demo.local"]).verify_pem(client.cert_pem())
    assert ident.id == "spiffe://demo.local/team/audit/auditor"
    assert ident.trust_domain == "demo.local" and ident.path == ("team", "audit", "auditor")
    assert ident.cert_sha256 == client.cert.fingerprint(hashes.SHA256()).hex()
    assert ident.serial == f"{client.cert.serial_number:x}"
    assert ident.issuer == "CN=Unit CA,O=gateway demo"
    assert ident.not_after == int(client.cert.not_valid_after_utc.timestamp())
    assert ident.attributes() == {
        "caller.id": ident.id, "caller.trust_domain": "demo.local",
        "caller.path": "/team/audit/auditor", "caller.issuer": ident.issuer,
        "caller.serial": ident.serial, "caller.cert_sha256": ident.cert_sha256,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.id = "spiffe://demo.local/x"  # type: ignore[misc]
    assert not hasattr(ident, "__dict__")  # slots


def test_cn_identity_attributes(ca: pki.CertifiedKey) -> None:
    verifier = IdentityVerifier([], cn_issuers=["CN=Unit CA,O=gateway\\ demo"])
    ident = verifier.verify_pem(pki.issue_client(ca, cn="legacy").cert_pem())
    assert ident.id == "cn:legacy" and ident.trust_domain == "" and ident.path == ()
    assert ident.attributes()["caller.path"] == ""


def test_verifier_caches_identities_and_refusals_in_a_bounded_lru(ca: pki.CertifiedKey) -> None:
    verifier = IdentityVerifier(["demo.local"], cache_size=2)
    pems = [pki.issue_client(ca, uris=[f"spiffe://demo.local/svc/{i}"]).cert_pem()
            for i in range(3)]
    first = verifier.verify_pem(pems[0])
    assert verifier.verify_pem(bytes(pems[0])) is first  # equal bytes, not the same object
    bad = pki.issue_client(ca, uris=["spiffe://other.example/x"]).cert_pem()
    for _ in range(2):
        with pytest.raises(Unauthenticated, match=r"other\.example"):
            verifier.verify_pem(bad)
    assert verifier.cache_len() == 2  # [first, bad]
    verifier.verify_pem(pems[0])  # touch: [bad, first]
    second = verifier.verify_pem(pems[1])  # evicts the least recently used: bad
    assert verifier.cache_len() == 2
    assert verifier.verify_pem(pems[0]) is first  # FIFO would have evicted it; [second, first]
    verifier.verify_pem(pems[2])  # evicts second
    again = verifier.verify_pem(pems[1])
    assert again is not second and again == second  # parsed anew, same identity


def test_verifier_cache_is_safe_under_concurrent_callers(ca: pki.CertifiedKey) -> None:
    verifier = IdentityVerifier(["demo.local"], cache_size=4)  # small: constant eviction
    ids = [f"spiffe://demo.local/svc/w{i}" for i in range(12)]
    pems = [pki.issue_client(ca, uris=[u]).cert_pem() for u in ids]
    barrier = threading.Barrier(16)

    def work(seed: int) -> list[bool]:
        barrier.wait(timeout=30)
        return [verifier.verify_pem(pems[(seed + i) % 12]).id == ids[(seed + i) % 12]
                for i in range(300)]

    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(16)))
    assert all(all(r) for r in results)
    assert verifier.cache_len() <= 4


def test_verifier_refuses_an_expired_certificate_on_a_live_connection(
        ca: pki.CertifiedKey) -> None:
    now = dt.datetime.now(dt.UTC)
    old = pki.issue_client(ca, uris=[SCORER], not_before=now - dt.timedelta(days=2),
                           not_after=now - dt.timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="expired"):
        IdentityVerifier(["demo.local"]).verify_pem(old.cert_pem())


def test_verifier_refuses_a_signing_certificate_as_a_caller(ca: pki.CertifiedKey) -> None:
    with pytest.raises(Unauthenticated, match="CA certificate"):
        IdentityVerifier(["demo.local"], cn_issuers=[ca.cert.subject.rfc4514_string()]
                         ).verify_pem(ca.cert_pem())


def test_verifier_refuses_garbage(ca: pki.CertifiedKey) -> None:
    with pytest.raises(Unauthenticated, match="cannot be parsed"):
        IdentityVerifier(["demo.local"]).verify_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n")


@pytest.mark.parametrize("domains, issuers, message", [
    (["Demo.local"], [], "lower-case"),
    (["demo.local:443"], [], "port"),
    ([""], [], "empty"),
    (["demo.local"], ["not a dn"], "RFC 4514"),
    (["demo.local"], ["CN=x, O=y"], "no space after commas"),
])
def test_verifier_configuration_errors_name_the_setting(domains: list[str], issuers: list[str],
                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IdentityVerifier(domains, cn_issuers=issuers)


def test_authenticate_refuses_a_call_without_tls(ca: pki.CertifiedKey) -> None:
    # Plaintext exists only here, to prove authenticate() refuses it: the gateway has none.
    verifier = IdentityVerifier(["demo.local"])
    seen: list[str] = []

    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return verifier.authenticate(context).id.encode()
        except Unauthenticated as err:
            seen.append(str(err))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate" in info.value.details()
        assert len(seen) == 1
    finally:
        server.stop(None).wait()



def test_certificate_directories_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        pki.init_dev_pki(tmp_path / "a" / "b" / "dev")
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "dev",
                      tmp_path / "a" / "b" / "dev" / "clients"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
