"""Mutual TLS and SPIFFE caller identity, over real TLS on loopback.

A tiny gRPC server (a generic handler with raw-bytes serializers, not the inference proto)
answers "who am I" with the identity IdentityVerifier derives, or UNAUTHENTICATED. Each
refusal case is shown against a twin that is accepted, so the tests can fail both ways.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.errors import ConfigError, Unauthenticated
from gateway.identity import IdentityVerifier, pki, server_credentials

SCORER = "spiffe://demo.local/svc/scorer"
CALL_TIMEOUT = 10.0


@dataclass
class Server:
    port: int
    server: grpc.Server
    calls: list[str]  # method names the handler reached (handshake refusals never do)
    lock: threading.Lock


@dataclass
class Pki:
    dir: Path
    ca: pki.CertifiedKey
    other_ca: pki.CertifiedKey


def _start(creds: grpc.ServerCredentials, verifiers: dict[str, IdentityVerifier]) -> Server:
    calls: list[str] = []
    lock = threading.Lock()

    def handler_for(name: str, verifier: IdentityVerifier):
        def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
            with lock:
                calls.append(name)
            try:
                return verifier.authenticate(context).id.encode()
            except Unauthenticated as err:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        return grpc.unary_unary_rpc_method_handler(who_am_i)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Identity", {name: handler_for(name, v) for name, v in verifiers.items()}),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port
    server.start()
    return Server(port, server, calls, lock)


def _call(port: int, root: bytes, client: pki.CertifiedKey | None,
          method: str = "WhoAmI") -> str:
    """One call on a fresh channel (a fresh TLS handshake): the identity id, or raises."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key_pem() if client else None,
        certificate_chain=client.cert_pem() if client else None)
    # A local subchannel pool: no connection is ever shared with an earlier channel.
    with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return channel.unary_unary(f"/test.Identity/{method}")(
            b"", timeout=CALL_TIMEOUT).decode()


def _refused(port: int, root: bytes, client: pki.CertifiedKey | None,
             method: str = "WhoAmI") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call(port, root, client, method)
    return info.value


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_dev_pki(directory)
    ca = pki.load_pair(directory / "ca.pem", directory / "ca.key")
    return Pki(directory, ca, pki.create_ca("some other CA"))


@pytest.fixture(scope="module")
def server(dev: Pki) -> Iterator[Server]:
    creds = server_credentials(dev.dir / "server.pem", dev.dir / "server.key",
                               dev.dir / "ca.pem")
    ca_dn = dev.ca.cert.subject.rfc4514_string()
    running = _start(creds, {
        "WhoAmI": IdentityVerifier(["demo.local", "partner.example"]),
        "WhoAmICn": IdentityVerifier(["demo.local"], cn_issuers=[ca_dn]),
    })
    yield running
    running.server.stop(None).wait()


def _root(dev: Pki) -> bytes:
    return (dev.dir / "ca.pem").read_bytes()


def _client(dev: Pki, name: str) -> pki.CertifiedKey:
    return pki.load_pair(dev.dir / "clients" / f"{name}.pem", dev.dir / "clients" / f"{name}.key")


# --- accepted -------------------------------------------------------------------------

def test_demo_scorer_is_accepted_with_its_spiffe_id(dev: Pki, server: Server) -> None:
    assert _call(server.port, _root(dev), _client(dev, "scorer")) == SCORER


@pytest.mark.parametrize("name, spiffe_id", sorted(pki.DEMO_CLIENTS.items()))
def test_every_demo_identity_is_accepted(dev: Pki, server: Server, name: str,
                                         spiffe_id: str) -> None:
    assert _call(server.port, _root(dev), _client(dev, name)) == spiffe_id


# --- refused at the TLS handshake -----------------------------------------------------

def _assert_handshake_refused(server: Server, err: grpc.RpcError, before: int) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    with server.lock:
        assert len(server.calls) == before, "the handler must never see this caller"


def test_no_client_certificate_is_refused(dev: Pki, server: Server) -> None:
    before = len(server.calls)
    _assert_handshake_refused(server, _refused(server.port, _root(dev), None), before)


def test_certificate_from_another_ca_is_refused(dev: Pki, server: Server) -> None:
    foreign = pki.issue_client(dev.other_ca, uris=[SCORER])
    before = len(server.calls)
    _assert_handshake_refused(server, _refused(server.port, _root(dev), foreign), before)
    # Same SPIFFE ID from the configured CA is fine: the CA is what made the difference.
    assert _call(server.port, _root(dev), pki.issue_client(dev.ca, uris=[SCORER])) == SCORER


def test_expired_certificate_is_refused(dev: Pki, server: Server) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue_client(dev.ca, uris=[SCORER], not_before=now - dt.timedelta(days=10),
                               not_after=now - dt.timedelta(days=1))
    before = len(server.calls)
    _assert_handshake_refused(server, _refused(server.port, _root(dev), expired), before)


def test_not_yet_valid_certificate_is_refused(dev: Pki, server: Server) -> None:
    now = dt.datetime.now(dt.UTC)
    future = pki.issue_client(dev.ca, uris=[SCORER], not_before=now + dt.timedelta(days=1),
                              not_after=now + dt.timedelta(days=10))
    before = len(server.calls)
    _assert_handshake_refused(server, _refused(server.port, _root(dev), future), before)


# --- refused by the SPIFFE rules (UNAUTHENTICATED with the reason) --------------------

@pytest.mark.parametrize("uris, reason", [
    ([SCORER, "spiffe://demo.local/svc/other"], "2 URI SANs"),
    ([SCORER, SCORER], "2 URI SANs"),
    (["https://demo.local/svc/scorer"], "scheme is 'https'"),
    (["urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"], "scheme is 'urn'"),
    (["SPIFFE://demo.local/svc/scorer"], "lower case"),
    (["spiffe://evil.example/svc/scorer"], "'evil.example', which is not accepted"),
    (["spiffe://Demo.local/svc/scorer"], "must be lower-case"),
    (["spiffe://DEMO.LOCAL/svc/scorer"], "must be lower-case"),
    (["spiffe://demo.local/svc/../scorer"], "relative segment '..'"),
    (["spiffe://demo.local/svc/./scorer"], "relative segment '.'"),
    (["spiffe://demo.local/../svc/scorer"], "relative segment '..'"),
    (["spiffe://demo.local/svc//scorer"], "empty segment"),
    (["spiffe://demo.local/svc/scorer/"], "empty segment"),
    (["spiffe://demo.local//svc/scorer"], "empty segment"),
    (["spiffe://demo.local"], "has no path"),
    (["spiffe://demo.local/"], "has no path"),
    (["spiffe:///svc/scorer"], "trust domain is empty"),
    (["spiffe://demo.local/svc/%73corer"], "percent-encoded"),
    (["spiffe://demo%2elocal/svc/scorer"], "percent-encoded"),
    (["spiffe://demo.local/svc/scorer?x=1"], "query"),
    (["spiffe://demo.local/svc/scorer#frag"], "fragment"),
    (["spiffe://demo.local:8443/svc/scorer"], "port"),
    (["spiffe://admin@demo.local/svc/scorer"], "userinfo"),
    (["spiffe://demo.local/svc/sc orer"], "contains ' '"),
    (["spiffe://demo.local/svc/scorer;v=1"], "contains ';'"),
    (["spiffe://demo.local/svc/sc~orer"], "contains '~'"),
    (["spiffe://demo.local/svc/a+b"], "contains '+'"),
    (["spiffe://demo_local!/svc/scorer"], "contains '!'"),
    (["spiffe://demo.local/" + "a" * 2048], "longer than 2048 bytes"),
])
def test_invalid_spiffe_ids_are_unauthenticated(dev: Pki, server: Server, uris: list[str],
                                                reason: str) -> None:
    client = pki.issue_client(dev.ca, uris=uris, cn="scorer")
    err = _refused(server.port, _root(dev), client)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason in err.details()


def test_second_trust_domain_on_the_list_is_accepted(dev: Pki, server: Server) -> None:
    client = pki.issue_client(dev.ca, uris=["spiffe://partner.example/ns/prod/sa/batch_1"])
    assert _call(server.port, _root(dev), client) == "spiffe://partner.example/ns/prod/sa/batch_1"


def test_path_segments_may_use_mixed_case_dots_dashes_underscores(dev: Pki,
                                                                   server: Server) -> None:
    uri = "spiffe://demo.local/Team.A/svc-1/my_worker..v2"
    assert _call(server.port, _root(dev), pki.issue_client(dev.ca, uris=[uri])) == uri


# --- CN-only certificates -------------------------------------------------------------

def test_cn_only_certificate_is_refused_unless_its_issuer_is_configured(
        dev: Pki, server: Server) -> None:
    legacy = pki.issue_client(dev.ca, cn="legacy-batch")
    err = _refused(server.port, _root(dev), legacy, "WhoAmI")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "cn_issuers" in err.details()
    assert _call(server.port, _root(dev), legacy, "WhoAmICn") == "cn:legacy-batch"


def test_cn_identity_still_needs_a_configured_trust_domain_for_uris(dev: Pki,
                                                                    server: Server) -> None:
    # A URI SAN always takes the SPIFFE path: a bad URI is not rescued by the CN.
    client = pki.issue_client(dev.ca, uris=["spiffe://evil.example/x"], cn="legacy-batch")
    err = _refused(server.port, _root(dev), client, "WhoAmICn")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("cn", ["bad,name", "a:b", " lead", "trail ", "tab\there", "quote'"])
def test_unusable_common_names_are_refused(dev: Pki, server: Server, cn: str) -> None:
    err = _refused(server.port, _root(dev), pki.issue_client(dev.ca, cn=cn), "WhoAmICn")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not usable as an identity" in err.details()


# --- server certificate and CA rotation without restart -------------------------------

def test_rotated_server_certificate_and_ca_bundle_are_used_by_new_connections(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    ca_a = pki.create_ca("CA A")
    pki.issue_server(ca_a).write(cert, key)
    pki.write_file(ca_file, ca_a.cert_pem())
    client_a = pki.issue_client(ca_a, uris=[SCORER])
    ca_b = pki.create_ca("CA B")
    client_b = pki.issue_client(ca_b, uris=["spiffe://demo.local/svc/rotated"])

    running = _start(server_credentials(cert, key, ca_file),
                     {"WhoAmI": IdentityVerifier(["demo.local"])})
    try:
        port = running.port
        assert _call(port, ca_a.cert_pem(), client_a) == SCORER
        # Before rotation: the server presents A's certificate and trusts only CA A.
        assert _refused(port, ca_b.cert_pem(), client_a).code() == grpc.StatusCode.UNAVAILABLE
        assert _refused(port, ca_a.cert_pem(), client_b).code() == grpc.StatusCode.UNAVAILABLE

        # Rotate: a server certificate from CA B, and a client bundle trusting A and B.
        pki.issue_server(ca_b).write(cert, key)
        pki.write_file(ca_file, ca_a.cert_pem() + ca_b.cert_pem())

        # A client trusting only CA B now succeeds: the new certificate is presented...
        assert _call(port, ca_b.cert_pem(), client_b) == "spiffe://demo.local/svc/rotated"
        assert _call(port, ca_b.cert_pem(), client_a) == SCORER
        # ...and one trusting only CA A fails: the old one is not.
        assert _refused(port, ca_a.cert_pem(), client_a).code() == grpc.StatusCode.UNAVAILABLE

        # A broken replacement keeps the last good configuration and logs why.
        with caplog.at_level(logging.ERROR, logger="gateway.identity"):
            pki.write_file(cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n")
            assert _call(port, ca_b.cert_pem(), client_b) == "spiffe://demo.local/svc/rotated"
        assert any("TLS reload failed" in r.getMessage() and str(cert) in r.getMessage()
                   for r in caplog.records)

        # A half-done rotation (new certificate, old key) is not loaded either.
        ca_c = pki.create_ca("CA C")
        pki.write_file(cert, pki.issue_server(ca_c).cert_pem())
        assert _call(port, ca_b.cert_pem(), client_b) == "spiffe://demo.local/svc/rotated"
        assert any("does not match" in r.getMessage() for r in caplog.records)
    finally:
        running.server.stop(None).wait()


# --- credentials set-up errors --------------------------------------------------------

def test_server_credentials_name_the_missing_file(tmp_path: Path, dev: Pki) -> None:
    with pytest.raises(ConfigError, match=r"missing.*server\.pem"):
        server_credentials(tmp_path / "server.pem", dev.dir / "server.key", dev.dir / "ca.pem")


def test_server_credentials_refuse_a_key_of_another_certificate(tmp_path: Path,
                                                                dev: Pki) -> None:
    with pytest.raises(ConfigError, match="does not match"):
        server_credentials(dev.dir / "server.pem", dev.dir / "clients" / "scorer.key",
                           dev.dir / "ca.pem")


def test_server_credentials_refuse_a_broken_ca_bundle(tmp_path: Path, dev: Pki) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"ca\.pem: not a PEM CA bundle"):
        server_credentials(dev.dir / "server.pem", dev.dir / "server.key", bad)
