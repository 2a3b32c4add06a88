"""End to end: the gateway admits only callers with an acceptable client certificate."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.identity import pki
from tests.conftest import channel_credentials


@pytest.fixture(scope="module")
def odd_certs(gateway, tmp_path_factory):
    """Client certificates the gateway must refuse, minted for this test module."""
    out = tmp_path_factory.mktemp("odd-certs")
    env = gateway.env
    ca = pki.load_pair(env.certs / "ca.pem", env.certs / "ca.key")
    now = dt.datetime.now(dt.UTC)
    certs = {
        "other-ca": pki.issue_client(pki.create_ca("some other CA"),
                                     uris=["spiffe://demo.local/svc/scorer"]),
        "expired": pki.issue_client(ca, uris=["spiffe://demo.local/svc/scorer"],
                                    not_before=now - dt.timedelta(days=10),
                                    not_after=now - dt.timedelta(days=1)),
        "two-uris": pki.issue_client(ca, uris=["spiffe://demo.local/svc/scorer",
                                               "spiffe://demo.local/svc/admin"]),
        "foreign-domain": pki.issue_client(ca, uris=["spiffe://evil.example/svc/scorer"]),
        "cn-only": pki.issue_client(ca, cn="scorer"),
        "dot-dot": pki.issue_client(ca, uris=["spiffe://demo.local/svc/../team/security/admin"]),
    }
    paths = {}
    for name, certified in certs.items():
        certified.write(out / f"{name}.pem", out / f"{name}.key")
        paths[name] = (out / f"{name}.pem", out / f"{name}.key")
    return paths


def _server_live(gateway, credentials) -> grpc.StatusCode:
    channel = grpc.secure_channel(gateway.target, credentials)
    try:
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()
    finally:
        channel.close()


def test_valid_certificate_is_admitted(gateway):
    assert _server_live(gateway, channel_credentials(gateway.env, "scorer")) == \
        grpc.StatusCode.OK


def test_no_client_certificate_is_refused(gateway):
    # The TLS handshake itself fails: there is no way in without a certificate.
    assert _server_live(gateway, channel_credentials(gateway.env)) == \
        grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", ["other-ca", "expired"])
def test_certificates_failing_the_handshake_are_refused(gateway, odd_certs, name):
    cert, key = odd_certs[name]
    assert _server_live(gateway, channel_credentials(gateway.env, cert=cert, key=key)) == \
        grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", ["two-uris", "foreign-domain", "cn-only", "dot-dot"])
def test_certificates_without_an_acceptable_identity_are_unauthenticated(gateway, odd_certs,
                                                                         name):
    cert, key = odd_certs[name]
    assert _server_live(gateway, channel_credentials(gateway.env, cert=cert, key=key)) == \
        grpc.StatusCode.UNAUTHENTICATED
