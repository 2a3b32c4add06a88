"""Shared fixtures: a demo environment on disk and a real gateway process serving it.

The gateway always runs in a subprocess: it is exercised through real mTLS connections,
exactly as clients see it. (This also keeps the OIP descriptors of ``tritonclient`` and of
the gateway out of one process: both define the ``inference`` proto package.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gateway.devenv import REPO, DemoEnv, GatewayProcess, make_demo_env, start_gateway
from tests.support.postgres import schema_dsn


def pytest_configure(config: pytest.Config) -> None:
    """Compile the gateway's modules to bytecode once, before any test starts a process.

    Why: the suite starts hundreds of ``gateway`` processes (servers, CLI commands). Where
    ``PYTHONDONTWRITEBYTECODE`` is set, none of them caches its bytecode, and each would
    compile every module from source again; a cache written here is read by all of them
    (reading one is allowed under that setting, and a stale one is never used: Python
    checks it against the source).
    """
    if sys.dont_write_bytecode:
        import compileall

        compileall.compile_dir(REPO / "gateway", quiet=1)


#: Small limits so that the limit tests need only small messages.
TEST_MAX_ELEMENTS = 4096
TEST_MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory) -> DemoEnv:
    return make_demo_env(tmp_path_factory.mktemp("demo"), server={
        "max_tensor_elements": TEST_MAX_ELEMENTS, "max_message_bytes": TEST_MAX_MESSAGE_BYTES})


@pytest.fixture(scope="session")
def gateway(demo_env) -> GatewayProcess:
    gw = start_gateway(demo_env)
    yield gw
    gw.stop()


def triton_client(gw: GatewayProcess, identity: str):
    """An unchanged ``tritonclient.grpc`` client presenting the demo identity's certificate."""
    return triton_client_at(gw.env, gw.target, identity)


def triton_client_at(env: DemoEnv, target: str, identity: str | None):
    """The same, for any server using ``env``'s PKI; ``identity=None`` presents no certificate."""
    import tritonclient.grpc as tc

    tls = {}
    if identity is not None:
        cert, key = env.client_files(identity)
        tls = {"private_key": str(key), "certificate_chain": str(cert)}
    return tc.InferenceServerClient(url=target, ssl=True,
                                    root_certificates=str(env.certs / "ca.pem"), **tls)


def channel_credentials(env: DemoEnv, identity: str | None = None, *,
                        cert: Path | None = None, key: Path | None = None):
    """gRPC channel credentials trusting the demo CA, with a client certificate if given."""
    import grpc

    if identity is not None:
        cert, key = env.client_files(identity)
    return grpc.ssl_channel_credentials(
        root_certificates=(env.certs / "ca.pem").read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)


def assert_records_match_schema(records: list[dict]) -> None:
    """Every record validates against the one record schema (gateway/audit/record.schema.json):
    tests that make a record kind or field call this on what the gateway really wrote."""
    import json

    import jsonschema

    from gateway.audit import RECORD_SCHEMA

    validator = jsonschema.Draft202012Validator(json.loads(RECORD_SCHEMA.read_text()))
    errors = [(r.get("kind"), f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
              for r in records for e in validator.iter_errors(r)]
    assert not errors, errors


# --- PostgreSQL -----------------------------------------------------------------------------

#: Where the PostgreSQL tests connect (trust authentication); the environment overrides it.
TEST_DSN_ENV = "GATEWAY_TEST_DSN"
DEFAULT_TEST_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The DSN of the test server, checked reachable. Skips without one, except under CI
    (CI=true), where a PostgreSQL test that cannot run fails: it must never pass by skipping."""
    import psycopg

    dsn = os.environ.get(TEST_DSN_ENV, DEFAULT_TEST_DSN)
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as err:
        message = f"PostgreSQL at {dsn!r} unreachable (set ${TEST_DSN_ENV}): {err}"
        if _under_ci():
            pytest.fail(message)
        pytest.skip(message)
    return dsn


@pytest.fixture(scope="session")
def pg_dsn(pg_server):
    """A DSN into one fresh schema for the whole test run (dropped at the end)."""
    yield from schema_dsn(pg_server, "run")


@pytest.fixture
def pg_fresh_dsn(pg_server):
    """A DSN into a fresh schema of this test's own (dropped after it)."""
    yield from schema_dsn(pg_server, "t")
