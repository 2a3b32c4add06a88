"""SPIFFE trust bundles: an identity must chain to the bundle of the trust domain it names."""

from __future__ import annotations

import pytest

from gateway.config import TlsSettings
from gateway.errors import ConfigError, Unauthenticated
from gateway.identity import IdentityVerifier, pki


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    demo, partner = pki.create_ca("demo CA"), pki.create_ca("partner CA")
    demo.write(out / "demo.pem", out / "demo.key")
    partner.write(out / "partner.pem", out / "partner.key")
    verifier = IdentityVerifier([], trust_bundles={"demo.local": out / "demo.pem",
                                                   "partner.example": out / "partner.pem"})
    return demo, partner, verifier


def test_an_identity_chains_to_its_own_domain_only(cas):
    demo, partner, verifier = cas
    ok = pki.issue_client(demo, uris=["spiffe://demo.local/svc/a"])
    assert verifier.verify_pem(ok.cert_pem()).id == "spiffe://demo.local/svc/a"
    assert verifier.verify_pem(pki.issue_client(
        partner, uris=["spiffe://partner.example/x"]).cert_pem()).trust_domain == \
        "partner.example"
    forged = pki.issue_client(partner, uris=["spiffe://demo.local/team/security/admin"])
    with pytest.raises(Unauthenticated, match="trust bundle"):
        verifier.verify_pem(forged.cert_pem())


def test_an_intermediate_of_the_bundle_needs_the_presented_chain(cas):
    demo, _, verifier = cas
    intermediate = pki.create_ca("demo issuing CA", issuer=demo)
    leaf = pki.issue_client(intermediate, uris=["spiffe://demo.local/svc/b"])
    chain = leaf.cert_pem() + intermediate.cert_pem()
    with pytest.raises(Unauthenticated):
        IdentityVerifier([], trust_bundles=verifier_bundles(verifier)).verify_pem(
            leaf.cert_pem())
    assert verifier.verify_pem(leaf.cert_pem(), chain).id == "spiffe://demo.local/svc/b"


def verifier_bundles(verifier: IdentityVerifier) -> dict:
    files = verifier.bundle_files
    return {"demo.local": files[0], "partner.example": files[1]}


def test_two_domains_on_one_bundle_are_a_configuration_error():
    with pytest.raises(ConfigError, match="trust_bundles"):
        TlsSettings(trust_domains=("demo.local", "partner.example"))
    TlsSettings(trust_domains=("demo.local", "partner.example"),
                trust_bundles={"partner.example": "p.pem"})  # one left on [tls] ca: fine
