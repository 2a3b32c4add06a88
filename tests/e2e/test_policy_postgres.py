"""Policy in PostgreSQL, end to end: `gateway policy push`, two replicas (real gateway
processes) learning of each version, direct writes by Casbin tools, and the failure cases.

Every test runs against the real server of conftest's ``pg_server`` in schemas of its own.
Waits are bounded polls of an observable effect (GetPolicy, a decision, an audit record).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from gateway._proto.gateway.v1 import admin_pb2 as pb
from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.audit._store import read_records
from gateway.devenv import REPO, make_demo_env, make_replicas, run_cli, start_gateway
from gateway.policy import MODEL_FILE, POLICY_FILE
from gateway.policy._source import digest_files
from gateway.policy.postgres import merge_rows, rule_rows
from tests.conftest import channel_credentials, schema_dsn, triton_client
from tests.support.relay import PgRelay
from tests.support.waiting import WAIT, wait_for

#: Bound on every wait for a replica to change policy (the target is 2 s; CI is slower).

#: A rule the shipped policy lacks, and a case for it: auditors may read demo-mlp metadata.
EXTRA_RULE = "p, role:auditors, demo-mlp, metadata, allow\n"
EXTRA_CASE = """  - name: auditors read demo-mlp metadata (pushed)
    caller: spiffe://demo.local/team/audit/auditor
    model: demo-mlp
    action: metadata
    expect: allow
"""


def policy_dir(root: Path, *, rule: str = "", case: str = "") -> Path:
    """A copy of the shipped policy, with ``rule`` appended to policy.csv and ``case`` to
    the case file."""
    target = root / f"policy-{time.monotonic_ns()}"
    shutil.copytree(REPO / "policies", target)
    with (target / POLICY_FILE).open("a") as f:
        f.write(rule)
    with (target / "tests" / "demo.yaml").open("a") as f:
        f.write(case)
    return target


def live_digest(gw) -> str:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "admin")) as channel:
        return pb_grpc.PolicyAdminStub(channel).GetPolicy(pb.GetPolicyRequest()).digest


def reloads(gw) -> list[dict]:
    records = [json.loads(r) for _, _, recs, _ in read_records(gw.env.audit) for r in recs]
    return [r for r in records if r["kind"] == "policy_reload"]


def may_read_metadata(gw, identity: str, model: str) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        triton_client(gw, identity).get_model_metadata(model)
    except InferenceServerException as err:
        assert err.status() == "StatusCode.PERMISSION_DENIED", err
        return False
    return True


def push(directory: Path, dsn: str, *extra: str, check: bool = True):
    return run_cli("policy", "push", str(directory), "--dsn", dsn, *extra, check=check)


def push_and_wait(directory: Path, dsn: str, gateways) -> str:
    """Push ``directory`` and wait until every replica decides with it; its digest."""
    push(directory, dsn)
    digest = versions(dsn)[-1][1]
    for gw in gateways:
        wait_for(f"{gw.target} to install {digest[:12]}", lambda gw=gw: live_digest(gw) == digest)
    return digest


def versions(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version, digest FROM gateway_policy_version "
                            "ORDER BY version").fetchall()


@pytest.fixture(scope="module")
def cluster(pg_server, tmp_path_factory):
    """Two gateway processes on different ports reading one policy from one schema."""
    root = tmp_path_factory.mktemp("pgpolicy")
    schemas = schema_dsn(pg_server, "policy")
    dsn = next(schemas)
    push(REPO / "policies", dsn)
    # A long polling backstop: a change seen within WAIT came by NOTIFY (or a reconnect).
    envs = make_replicas(root / "gw", policy={"source": "postgresql", "dsn": dsn,
                                              "watch_interval": 60.0},
                         models={"reverify_interval": 0.0})
    gateways = [start_gateway(e) for e in envs]
    try:
        yield dsn, gateways, root
    finally:
        for gw in gateways:
            gw.stop()
        next(schemas, None)  # drop the schema


def test_push_reaches_both_replicas(cluster):
    dsn, gateways, root = cluster
    before = [live_digest(gw) for gw in gateways]
    assert before[0] == before[1] == versions(dsn)[-1][1]
    assert not any(may_read_metadata(gw, "auditor", "demo-mlp") for gw in gateways)

    directory = policy_dir(root, rule=EXTRA_RULE, case=EXTRA_CASE)
    out = push(directory, dsn, "--comment", "auditors read demo-mlp").stdout
    version, digest = versions(dsn)[-1]
    assert f"published policy version {version} (digest {digest})" in out
    assert digest != before[0]
    for gw in gateways:
        wait_for(f"{gw.target} to install {digest[:12]}", lambda gw=gw: live_digest(gw) == digest)
        assert may_read_metadata(gw, "auditor", "demo-mlp")  # the new rule decides
        installed = [r for r in reloads(gw) if r["new_digest"] == digest]
        assert installed and installed[-1]["accepted"] is True
        assert f"postgresql version {version}" in installed[-1]["trigger"]
    # Decisions name the digest of the policy that took them.
    decisions = [json.loads(r) for _, _, recs, _ in read_records(gateways[1].env.audit)
                 for r in recs if b'"decision"' in r]
    assert decisions[-1]["policy"]["digest"] == digest


def test_a_policy_failing_its_cases_is_not_pushed(cluster, tmp_path):
    dsn, _, _ = cluster
    before = versions(dsn)
    # The rule revokes what a shipped case expects: the scorer's inference on demo-mlp.
    directory = policy_dir(tmp_path, rule="p, role:scorers, demo-mlp, infer, deny\n")
    result = push(directory, dsn, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout and "not published" in result.stdout
    assert versions(dsn) == before  # nothing written
    # A policy that does not even parse: exit 2, located, nothing written.
    (directory / POLICY_FILE).write_text("p, role:x, demo-mlp, fly, allow\n")
    result = push(directory, dsn, check=False)
    assert result.returncode == 2 and "policy.csv:1" in result.stderr
    assert versions(dsn) == before


def _write_version_behind_push(dsn: str, directory: Path) -> str:
    """What a careless script could do: a version and its rules written by plain SQL."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes()
             for p in directory.rglob("*") if p.is_file()}
    digest = digest_files({MODEL_FILE: files[MODEL_FILE], POLICY_FILE: files[POLICY_FILE]})
    rows = [line.split(", ") for line in files[POLICY_FILE].decode().splitlines()
            if line.strip() and not line.startswith("#")]
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SELECT max(version) + 1 FROM gateway_policy_version").fetchone()[0]
        conn.execute("INSERT INTO gateway_policy_version (version, digest) VALUES (%s, %s)",
                     (version, digest))
        for path, data in files.items():
            conn.execute("INSERT INTO gateway_policy_file VALUES (%s, %s, %s)",
                         (version, path, data))
        conn.execute("DELETE FROM casbin_rule")
        for row in rows:
            columns = ", ".join(["ptype"] + [f"v{i}" for i in range(len(row) - 1)])
            conn.execute(f"INSERT INTO casbin_rule ({columns}) VALUES "
                         f"({', '.join(['%s'] * len(row))})", row)
    return digest


def test_a_version_written_behind_push_that_fails_its_cases_is_refused_and_audited(
        cluster, tmp_path):
    dsn, gateways, _ = cluster
    good = live_digest(gateways[0])
    bad = _write_version_behind_push(dsn, policy_dir(
        tmp_path, rule="p, role:scorers, demo-mlp, infer, deny\n"))
    for gw in gateways:
        refused = wait_for(f"{gw.target} to refuse {bad[:12]}", lambda gw=gw: [
            r for r in reloads(gw) if r["new_digest"] == bad and not r["accepted"]])
        assert "test case failed" in refused[-1]["error"]
        assert live_digest(gw) == good  # the last good policy stays live ...
        assert triton_client(gw, "scorer").is_model_ready("demo-mlp")  # ... and decides


def test_a_casbin_rule_row_inserted_by_a_casbin_tool_is_installed(cluster):
    dsn, gateways, _ = cluster
    push_and_wait(REPO / "policies", dsn, gateways)  # whatever an earlier test left
    assert not any(may_read_metadata(gw, "auditor", "demo-types") for gw in gateways)
    # What casbin_sqlalchemy_adapter's add_policy("p", "p", [...]) sends: a plain INSERT.
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO casbin_rule (ptype, v0, v1, v2, v3) "
                     "VALUES ('p', 'role:auditors', 'demo-types', 'metadata', 'allow')")
    shipped = (REPO / "policies" / POLICY_FILE).read_bytes()
    expected = digest_files({MODEL_FILE: (REPO / "policies" / MODEL_FILE).read_bytes(),
                             POLICY_FILE: shipped + b"p, role:auditors, demo-types, metadata, "
                             b"allow\n"})
    for gw in gateways:
        wait_for(f"{gw.target} to install the edited rules",
                 lambda gw=gw: live_digest(gw) == expected)
        assert may_read_metadata(gw, "auditor", "demo-types")
        record = [r for r in reloads(gw) if r["new_digest"] == expected][-1]
        assert record["accepted"] and "casbin_rule edited" in record["trigger"]
    # The rule deleted again (remove_policy: a plain DELETE): revoked, and the replicas are
    # back on the pushed text byte for byte, digest included.
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM casbin_rule WHERE v0 = 'role:auditors' AND v1 = 'demo-types'")
    for gw in gateways:
        wait_for(f"{gw.target} to revoke it", lambda gw=gw: _policy_csv(gw) == shipped)
        assert not may_read_metadata(gw, "auditor", "demo-types")


def _policy_csv(gw) -> bytes:
    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "admin")) as channel:
        return pb_grpc.PolicyAdminStub(channel).GetPolicy(pb.GetPolicyRequest()) \
            .policy_csv.encode()


def _casbin_enforcer(dsn: str):
    """pycasbin with casbin_sqlalchemy_adapter on the same table, as a Casbin shop runs it."""
    import casbin
    import casbin_sqlalchemy_adapter
    from psycopg import conninfo
    from sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://", connect_args=conninfo.conninfo_to_dict(dsn))
    adapter = casbin_sqlalchemy_adapter.Adapter(engine)
    return casbin.Enforcer(str(REPO / "policies" / MODEL_FILE), adapter), engine


def test_the_casbin_sqlalchemy_adapter_reads_and_writes_the_published_rules(cluster):
    dsn, gateways, _ = cluster
    shipped = push_and_wait(REPO / "policies", dsn, gateways)
    enforcer, engine = _casbin_enforcer(dsn)
    try:
        # It reads what push wrote: every rule and role link of the shipped policy.
        assert ["role:scorers", "demo-mlp", "infer", "allow"] in enforcer.get_policy()
        assert ["spiffe://demo.local/svc/scorer", "role:scorers"] in \
            enforcer.get_grouping_policy()
        assert len(enforcer.get_policy()) + len(enforcer.get_grouping_policy()) == \
            len(rule_rows((REPO / "policies" / POLICY_FILE).read_bytes()))
        # Its writes reach every replica, validated and tested like a push.
        assert enforcer.add_policy("role:auditors", "demo-types", "metadata", "allow")
        for gw in gateways:
            wait_for(f"{gw.target} to grant the adapter's rule",
                     lambda gw=gw: live_digest(gw) != shipped)
            assert may_read_metadata(gw, "auditor", "demo-types")
        assert enforcer.remove_policy("role:auditors", "demo-types", "metadata", "allow")
        for gw in gateways:
            wait_for(f"{gw.target} to be back on the pushed policy",
                     lambda gw=gw: live_digest(gw) == shipped)
            assert not may_read_metadata(gw, "auditor", "demo-types")
    finally:
        engine.dispose()


def test_a_casbin_rule_row_that_does_not_validate_is_refused(cluster):
    dsn, gateways, _ = cluster
    good = push_and_wait(REPO / "policies", dsn, gateways)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO casbin_rule (ptype, v0, v1, v2, v3) "
                     "VALUES ('p', 'role:scorers', 'demo-mlp', 'fly', 'allow')")
    try:
        for gw in gateways:
            refused = wait_for(f"{gw.target} to refuse the bad row", lambda gw=gw: [
                r for r in reloads(gw) if not r["accepted"] and "'fly'" in (r["error"] or "")])
            assert "casbin_rule edited" in refused[-1]["trigger"]
            assert live_digest(gw) == good
    finally:
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM casbin_rule WHERE v2 = 'fly'")


def _policy_backends(dsn: str, instance: str) -> set[int]:
    with psycopg.connect(dsn) as conn:
        return {pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"gateway-policy {instance}%",))}


def test_replicas_reconnect_after_their_connections_are_terminated(cluster, tmp_path):
    dsn, gateways, _ = cluster
    instances = [gw.env.config.read_text().split('instance_id = "')[1].split('"')[0]
                 for gw in gateways]
    killed = set()
    for instance in instances:
        pids = wait_for(f"{instance}'s connections", lambda i=instance: _policy_backends(dsn, i))
        killed |= pids
    with psycopg.connect(dsn) as conn:
        for pid in killed:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    directory = policy_dir(tmp_path, rule=EXTRA_RULE + "p, role:auditors, demo-types, ready, "
                           "allow\n", case=EXTRA_CASE)
    push_and_wait(directory, dsn, gateways)  # seen through the new connections
    for instance in instances:
        fresh = wait_for("a new listening connection", lambda i=instance: {
            pid for pid in _policy_backends(dsn, i) if pid not in killed})
        assert fresh.isdisjoint(killed)


def test_a_gateway_does_not_start_without_its_policy_database(pg_fresh_dsn, tmp_path):
    # Unreachable: a closed port.
    env = make_demo_env(tmp_path / "closed", policy={
        "source": "postgresql", "dsn": "host=127.0.0.1 port=1 user=postgres dbname=test"})
    with pytest.raises(AssertionError, match="unreachable") as info:
        start_gateway(env)
    assert "did not start" in str(info.value)
    # Reachable, but nothing published yet: refused too, saying what to do.
    env = make_demo_env(tmp_path / "empty", policy={"source": "postgresql",
                                                    "dsn": pg_fresh_dsn})
    with pytest.raises(AssertionError, match="gateway policy push"):
        start_gateway(env)


def test_push_needs_a_dsn(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "GATEWAY_DSN"}
    result = subprocess.run([sys.executable, "-m", "gateway", "policy", "push",
                             str(REPO / "policies")], capture_output=True, text=True,
                            cwd=tmp_path, env=environment, timeout=120)
    assert result.returncode == 2 and "GATEWAY_DSN" in result.stderr
    assert "Traceback" not in result.stderr


def test_merge_rows_keeps_line_numbers_comments_and_bytes():
    text = b"# header\np, a, m, infer, allow\n\np, b, m, ready, allow\ng, x, a\n"
    rows = rule_rows(text)
    assert rows[0] == ("p", "a", "m", "infer", "allow", None, None)
    assert merge_rows(text, rows) == text
    assert merge_rows(text, list(reversed(rows))) == text  # row order is not content
    edited = [rows[0], rows[2], ("p", "c", "m", "infer", "allow", "", None)]
    assert merge_rows(text, edited) == (b"# header\np, a, m, infer, allow\n\n"
                                        b"# removed in casbin_rule: p, b, m, ready, allow\n"
                                        b"g, x, a\np, c, m, infer, allow, \n")
    assert merge_rows(b"p, a, m, infer, allow", [rows[0], rows[2]]) == \
        b"p, a, m, infer, allow\ng, x, a\n"


def test_rule_rows_refuses_what_casbin_rule_cannot_hold():
    from gateway.policy import PolicyError

    with pytest.raises(PolicyError, match=r"policy.csv:2: .*VARCHAR\(255\)"):
        rule_rows(b"p, a, m, infer, allow\np, a, m, infer, allow, " + b"x" * 256 + b"\n")
    with pytest.raises(PolicyError, match="at most 6 values"):
        rule_rows(b"p, 1, 2, 3, 4, 5, 6, 7\n")


def _health(gw, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(gw.target, channel_credentials(gw.env, "scorer")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def _source_up(gw) -> str:
    import urllib.request

    with urllib.request.urlopen(gw.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return next(line for line in text.splitlines()
                if line.startswith("gateway_policy_source_up{"))


def test_database_lost_while_running_keeps_the_policy_and_comes_back(pg_fresh_dsn, tmp_path):
    from grpc_health.v1 import health_pb2

    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    push(REPO / "policies", pg_fresh_dsn)
    proxy = PgRelay(pg_fresh_dsn)
    through = proxy.dsn
    env = make_demo_env(tmp_path / "gw", policy={"source": "postgresql", "dsn": through,
                                                 "watch_interval": 0.5},
                        models={"reverify_interval": 0.0})
    gw = start_gateway(env)
    try:
        before = live_digest(gw)
        assert _health(gw, "gateway.policy.source") == serving
        assert _source_up(gw).endswith(" 1.0")
        proxy.cut()
        wait_for("the policy source to be reported lost",
                 lambda: _health(gw, "gateway.policy.source") == not_serving)
        assert _source_up(gw) == 'gateway_policy_source_up{source="postgresql"} 0.0'
        assert _health(gw, "") == serving  # the verified policy in force still decides
        assert live_digest(gw) == before
        assert triton_client(gw, "scorer").is_model_ready("demo-mlp")
        assert not may_read_metadata(gw, "auditor", "demo-mlp")
        # Published while this replica cannot see the database: installed once it can.
        push(policy_dir(tmp_path, rule=EXTRA_RULE, case=EXTRA_CASE), pg_fresh_dsn)
        digest = versions(pg_fresh_dsn)[-1][1]
        assert live_digest(gw) == before
        proxy.restore()
        wait_for("the new version after the database came back",
                 lambda: live_digest(gw) == digest)
        wait_for("the source reported back", lambda: _health(gw, "gateway.policy.source")
                 == serving)
        assert may_read_metadata(gw, "auditor", "demo-mlp")
        assert not [r for r in reloads(gw) if not r["accepted"]]  # an outage is no refusal
    finally:
        gw.stop()
        proxy.cut()


def test_a_version_whose_files_do_not_match_its_digest_is_refused(cluster):
    dsn, gateways, _ = cluster
    good = push_and_wait(REPO / "policies", dsn, gateways)
    grant = b"p, role:auditors, demo-mlp, metadata, allow\n"
    with psycopg.connect(dsn) as conn:  # the files of the newest version altered in place
        conn.execute("UPDATE gateway_policy_file SET content = content || %s WHERE path = "
                     "'policy.csv' AND version = (SELECT max(version) FROM "
                     "gateway_policy_version)", (grant,))
    try:
        for gw in gateways:
            refused = wait_for(f"{gw.target} to refuse the altered version", lambda gw=gw: [
                r for r in reloads(gw) if not r["accepted"] and "recorded for it" in
                (r["error"] or "")])
            assert refused[-1]["old_digest"] == good
            assert live_digest(gw) == good
            assert not may_read_metadata(gw, "auditor", "demo-mlp")
    finally:
        push_and_wait(REPO / "policies", dsn, gateways)


def test_policy_source_setting_is_checked(tmp_path):
    from gateway.config import load_config
    from gateway.errors import ConfigError

    config = tmp_path / "gateway.toml"
    config.write_text('[policy]\nsource = "etcd"\n')
    with pytest.raises(ConfigError, match='source must be "files" or "postgresql"'):
        load_config(config)
    config.write_text('[policy]\nsource = "postgresql"\ndsn = "host=db"\n')
    assert load_config(config).policy.dsn == "host=db"


def test_closing_a_watching_source_does_not_wait_out_its_polling_interval(pg_fresh_dsn):
    """close() joins the watcher: with an hour-long polling backstop it must still return
    promptly (a gateway stopping on SIGTERM waited here for the whole interval)."""
    import threading

    from gateway.policy import PolicyStore, open_source

    push(REPO / "policies", pg_fresh_dsn)
    store = PolicyStore.open(open_source("postgresql", REPO / "policies", pg_fresh_dsn))
    store.start_watching(3600.0)
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        wait_for("the watcher to wait for notifications", lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %' "
            "AND state = 'idle' AND application_name LIKE '%listen'").fetchone()[0])
    time.sleep(0.5)  # lets it reach the wait; too short only makes the test weaker, never flaky
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(WAIT)  # a bound on the wait, not a timing assertion
    assert not closer.is_alive(), "close() is still waiting for the watcher"
