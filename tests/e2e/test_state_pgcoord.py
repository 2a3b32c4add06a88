"""The PostgreSQL coordinator: members in processes of their own, a real PostgreSQL, and the
models' desired state across two real gateway replicas.

Members run ``tests/support/pgcoord_member.py`` (a handler that records what it applied in a file);
waits are bounded polls of an effect (a file's lines, a ModelReady answer), never sleeps.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psycopg
import pytest

from gateway.db import DatabaseUnavailable
from gateway.devenv import REPO, DemoEnv, make_replicas, start_gateway
from gateway.state import Applied, PgCoordinator
from tests.conftest import channel_credentials, triton_client
from tests.support.relay import PgRelay
from tests.support.waiting import WAIT, wait_for

#: Bound on every wait (generous: the machine is shared).


class Member:
    """A coordinator member process; ``applied()`` is what its handler has applied."""

    def __init__(self, dsn: str, name: str, root: Path) -> None:
        self.name = name
        self.log = root / f"{name}.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.pgcoord_member", dsn, name, str(self.log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once subscribed (EOF if it failed)
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"member {name} did not start: {self.proc.stderr.read()}")

    def applied(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def members(pg_fresh_dsn, tmp_path):
    started: list[Member] = []

    def start(name: str, dsn: str = "") -> Member:
        member = Member(dsn or pg_fresh_dsn, name, tmp_path)
        started.append(member)
        return member

    yield start
    for member in started:
        if member.proc.poll() is None:
            member.proc.kill()
        member.proc.wait()


@pytest.fixture
def caller(pg_fresh_dsn):
    """A coordinator that only publishes (subscribed to nothing, so never waited for)."""
    coordinator = PgCoordinator(pg_fresh_dsn, "caller")
    yield coordinator
    coordinator.close()


def test_apply_everywhere_reaches_both_members_and_names_a_refusal(members, caller):
    a, b = members("a"), members("b")
    answers = caller.apply_everywhere("models", "m/1", {"op": "load"}, timeout=WAIT)
    assert answers == [Applied("a", True, ""), Applied("b", True, "")]
    assert a.applied() == b.applied() == [{"key": "m/1", "payload": {"op": "load"}}]
    answers = caller.apply_everywhere("models", "m/1", {"op": "load", "fail": "b"},
                                      timeout=WAIT)
    assert answers == [Applied("a", True, ""), Applied("b", False, "refused by b")]
    assert len(b.applied()) == 2  # it ran the handler, which refused


def test_a_member_that_is_gone_is_named_after_its_heartbeat_lapses(members, caller):
    a, b = members("a"), members("b")
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    # Still live by its last heartbeat when the change is stored: waited for until it lapses
    # (5 s), then named, well before the timeout.
    answers = caller.apply_everywhere("models", "m/1", {"op": "load"}, timeout=120)
    assert answers[0] == Applied("a", True, "")
    assert answers[1].member == "b" and not answers[1].ok
    assert answers[1].detail.startswith("stopped answering: no heartbeat for"), answers[1]
    assert len(a.applied()) == 1


def test_a_name_live_in_another_process_is_refused_and_a_dead_ones_is_taken_over(
        members, pg_fresh_dsn, caller):
    from gateway.errors import ConfigError

    a = members("a")
    twin = PgCoordinator(pg_fresh_dsn, "a")
    try:
        with pytest.raises(ConfigError, match="'a' is in use by another live process"):
            twin.subscribe("models", lambda key, payload: None)
    finally:
        twin.close()
    assert caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT) == \
        [Applied("a", True, "")]  # the twin's failed attempt took nothing from "a"
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    again = members("a")  # its predecessor's heartbeat stopped: taken over
    assert again.applied()[-1] == {"key": "m/1", "payload": {"op": "load"}}
    assert caller.apply_everywhere("models", "m/2", {"op": "load"}, WAIT) == \
        [Applied("a", True, "")]


def test_a_member_that_closed_is_not_waited_for(members, caller):
    members("a").stop()  # a clean stop removes the member
    b = members("b")
    assert caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT) == \
        [Applied("b", True, "")]
    assert len(b.applied()) == 1


def test_a_late_joiner_converges_on_the_newest_state_of_every_key(members, caller):
    members("a")
    caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT)
    caller.apply_everywhere("models", "m/2", {"op": "load"}, WAIT)
    caller.apply_everywhere("models", "m/1", {"op": "unload"}, WAIT)
    caller.apply_everywhere("policy", "p", {"op": "other topic"}, WAIT)
    late = members("late")  # "ready" only after it applied the stored state
    assert sorted((e["key"], e["payload"]["op"]) for e in late.applied()) == \
        [("m/1", "unload"), ("m/2", "load")]
    # And it follows later changes like the others.
    assert caller.apply_everywhere("models", "m/3", {"op": "load"}, WAIT) == \
        [Applied("a", True, ""), Applied("late", True, "")]


def test_a_change_written_without_a_notification_is_applied_by_polling(members,
                                                                      pg_fresh_dsn, caller):
    a = members("a")
    with psycopg.connect(pg_fresh_dsn) as conn:  # behind the coordinator: no NOTIFY
        conn.execute("INSERT INTO gateway_state_desired (topic, key, version, payload, "
                     "updated_by) VALUES ('models', 'm/9', nextval('gateway_state_version'), "
                     "'{\"op\": \"load\"}', 'test')")
    wait_for("the polling backstop", lambda: a.applied() == [
        {"key": "m/9", "payload": {"op": "load"}}])


def test_a_handler_that_raises_is_answered_not_fatal(pg_fresh_dsn, caller):
    def broken(key, payload):
        raise RuntimeError("boom")

    member = PgCoordinator(pg_fresh_dsn, "broken")
    try:
        member.subscribe("models", broken)
        answers = caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT)
        assert answers == [Applied("broken", False, "failed (RuntimeError); the member's log "
                                   "has the details")]
        # Not a JSON object (written behind the coordinator): refused by the member, no crash.
        with psycopg.connect(pg_fresh_dsn) as conn:
            conn.execute("UPDATE gateway_state_desired SET payload = '[1]', "
                         "version = nextval('gateway_state_version')")
        answers = caller.apply_everywhere("models", "m/2", {"op": "load"}, WAIT)
        assert answers[0].detail.startswith("failed (RuntimeError)")
        with psycopg.connect(pg_fresh_dsn) as conn:
            ack = conn.execute("SELECT ok, detail FROM gateway_state_ack WHERE key = 'm/1'")
            assert ack.fetchone() == (False, "the desired state of models/m/1 is not a JSON "
                                      "object; not applied")
    finally:
        member.close()


def test_database_unreachable_fails_closed_and_members_resync_when_it_is_back(
        members, pg_fresh_dsn, caller):
    proxy = PgRelay(pg_fresh_dsn)
    through = proxy.dsn
    try:
        a = members("a", through)
        cut_caller = PgCoordinator(through, "cut-caller")
        try:
            assert cut_caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT) == \
                [Applied("a", True, "")]
            proxy.cut()
            with pytest.raises(DatabaseUnavailable, match="unreachable"):
                cut_caller.apply_everywhere("models", "m/1", {"op": "unload"}, WAIT)
            assert DatabaseUnavailable.status == grpc.StatusCode.UNAVAILABLE
            # Meanwhile, another replica (reaching the database) changes the desired state;
            # "a" is cut off: named once its heartbeat lapses (or left out, if it already had).
            answers = caller.apply_everywhere("models", "m/2", {"op": "load"}, WAIT)
            assert [(x.member, x.ok) for x in answers] in ([], [("a", False)])
            assert all(x.detail.startswith("stopped answering") for x in answers)
            assert a.proc.poll() is None  # the member keeps running on what it has
            assert [e["key"] for e in a.applied()] == ["m/1"]
            proxy.restore()
            wait_for("the member to resync", lambda: [e["key"] for e in a.applied()] ==
                     ["m/1", "m/2"])
            # Without a new process or connection setup by the caller: the pool recovers.
            assert cut_caller.apply_everywhere("models", "m/3", {"op": "load"}, WAIT) == \
                [Applied("a", True, "")]
        finally:
            cut_caller.close()
    finally:
        proxy.cut()


def test_terminated_connections_are_replaced(members, pg_fresh_dsn, caller):
    a = members("a")
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        pids = [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'gateway-state a%'")]
        assert pids  # its pool and its listener
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert caller.apply_everywhere("models", "m/1", {"op": "load"}, WAIT) == \
        [Applied("a", True, "")]
    assert a.applied() == [{"key": "m/1", "payload": {"op": "load"}}]


def test_an_unreachable_database_refuses_to_construct():
    with pytest.raises(DatabaseUnavailable, match="unreachable"):
        PgCoordinator("host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2", "x")


# --- the models' desired state across two gateway replicas -----------------------------------


def test_the_models_handler_applies_only_well_formed_changes(tmp_path):
    """A payload comes from a database others can write: checked before anything is read."""
    import onnxruntime as ort

    from gateway.models import LOADED, UNLOADED, ModelRepository, model_change, model_key
    from gateway.models.demo import build_demo_repository

    build_demo_repository(tmp_path / "models")
    (tmp_path / "secret" / "1").mkdir(parents=True)
    repo = ModelRepository(tmp_path / "models", session_options=ort.SessionOptions,
                           verify=None)
    key = model_key("demo-mlp", "1")
    assert repo.apply_change(key, model_change("load", "demo-mlp", "1")) is None
    assert repo.entry("demo-mlp", "1").state == LOADED
    assert repo.apply_change(key, model_change("unload", "demo-mlp", "1")) is None
    assert repo.entry("demo-mlp", "1").state == UNLOADED
    for bad_key, payload, error in (
            (key, {"op": "load", "name": "demo-types", "version": "1"}, "malformed"),
            (key, {"op": "load", "name": "demo-mlp"}, "malformed"),
            ("../secret/1", {"op": "load", "name": "../secret", "version": "1"},
             "invalid model name"),
            (key, {"op": "delete", "name": "demo-mlp", "version": "1"}, "unknown model change")):
        assert error in (repo.apply_change(bad_key, payload) or ""), payload
    assert repo.entry("demo-types", "1") is None and repo.entry("../secret", "1") is None
    assert repo.entry("demo-mlp", "1").state == UNLOADED
    missing = repo.apply_change(model_key("absent", "1"), model_change("load", "absent", "1"))
    assert missing is not None and missing.startswith("refused: ")
    with pytest.raises(ValueError):
        model_change("delete", "demo-mlp", "1")


def _models(gw) -> tuple:
    from gateway._proto.gateway.v1 import admin_pb2_grpc as pb_grpc

    channel = grpc.secure_channel(gw.target, channel_credentials(gw.env, "admin"))
    return pb_grpc.ModelAdminStub(channel), channel


def _ready(gw, model: str) -> bool:
    return triton_client(gw, "scorer").is_model_ready(model)


def _own_models(env: DemoEnv) -> DemoEnv:
    """``env`` with a copy of the model repository of its own (add_replica shares one)."""
    own = env.root / f"models-{env.config.stem}"
    shutil.copytree(env.models, own)
    text = env.config.read_text()
    assert 'repository = "models"' in text
    env.config.write_text(text.replace('repository = "models"', f'repository = "{own.name}"'))
    return DemoEnv(root=env.root, config=env.config, certs=env.certs, models=own,
                   policies=env.policies, audit=env.audit)


def test_load_and_unload_on_one_replica_apply_on_both(pg_fresh_dsn, tmp_path):
    from gateway._proto.gateway.v1 import admin_pb2 as pb

    envs = make_replicas(tmp_path / "gw", state={"backend": "postgresql", "dsn": pg_fresh_dsn},
                         models={"reverify_interval": 0.0})
    envs[1] = _own_models(envs[1])
    gateways = [start_gateway(e) for e in envs]
    instances = [e.config.read_text().split('instance_id = "')[1].split('"')[0] for e in envs]
    try:
        a, b = gateways
        assert _ready(a, "demo-types") and _ready(b, "demo-types")
        stub, channel = _models(a)
        status, call = stub.UnloadModel.with_call(pb.UnloadModelRequest(name="demo-types",
                                                                        version="1"))
        assert status.state == "UNLOADED"
        assert not _ready(a, "demo-types") and not _ready(b, "demo-types")
        assert _ready(b, "demo-mlp")  # the others keep serving
        replicas = sorted(v for k, v in call.trailing_metadata() if k == "gateway-replica")
        assert replicas == sorted(f"{i}: ok" for i in instances)
        channel.close()

        stub, channel = _models(b)  # loaded from the other replica
        assert stub.LoadModel(pb.LoadModelRequest(name="demo-types", version="1")).state \
            == "LOADED"
        assert _ready(a, "demo-types") and _ready(b, "demo-types")

        # b's copy tampered with: the load is refused there, applied on a, and the reply
        # names b and why (the changed file).
        model = envs[1].models / "demo-types" / "1" / "model.onnx"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0x01
        model.write_bytes(bytes(data))
        stub_a, channel_a = _models(a)
        with pytest.raises(grpc.RpcError) as refused:
            stub_a.LoadModel(pb.LoadModelRequest(name="demo-types", version="1"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details()
        assert f"not loaded by 1 of 2 replica(s): {instances[1]}: refused:" in details
        assert "model.onnx" in details and instances[0] not in details
        assert dict(refused.value.trailing_metadata())["gateway-replica"]  # every answer
        assert _ready(a, "demo-types") and not _ready(b, "demo-types")
        data[-1] ^= 0x01
        model.write_bytes(bytes(data))
        channel.close()

        # A replica that restarts converges: unloaded while it was down, unloaded after.
        b.stop()
        assert stub_a.UnloadModel(pb.UnloadModelRequest(name="demo-types", version="1")).state \
            == "UNLOADED"
        channel_a.close()
        gateways[1] = b = start_gateway(envs[1])
        assert not _ready(b, "demo-types") and _ready(b, "demo-mlp")
        _assert_decision_records_name_the_replicas(envs[0], instances)
    finally:
        for gw in gateways:
            gw.stop()


def _assert_decision_records_name_the_replicas(env: DemoEnv, instances: list[str]) -> None:
    from gateway.audit._store import read_records
    from tests.conftest import assert_records_match_schema

    # Durable before each reply: readable while the replica runs.
    records = [json.loads(r) for _, _, recs, _ in read_records(env.audit) for r in recs]
    admin = [r for r in records if r["kind"] == "decision"
             and r["rpc"] in ("LoadModel", "UnloadModel")]
    assert [r["rpc"] for r in admin] == ["UnloadModel", "LoadModel", "UnloadModel"]
    refused = admin[1]
    assert refused["status"] == "FAILED_PRECONDITION"
    assert [(x["member"], x["ok"]) for x in refused["replicas"]] == \
        sorted([(instances[0], True), (instances[1], False)])
    assert_records_match_schema(admin)


def test_a_replica_does_not_start_without_its_state_database(tmp_path):
    from gateway.devenv import make_demo_env

    env = make_demo_env(tmp_path / "gw", state={
        "backend": "postgresql", "dsn": "host=127.0.0.1 port=1 user=postgres dbname=test"})
    with pytest.raises(AssertionError, match="unreachable"):
        start_gateway(env)


def test_state_database_lost_fails_model_changes_closed_and_keeps_serving(pg_fresh_dsn,
                                                                         tmp_path):
    from gateway._proto.gateway.v1 import admin_pb2 as pb
    from gateway.devenv import make_demo_env

    proxy = PgRelay(pg_fresh_dsn)
    through = proxy.dsn
    env = make_demo_env(tmp_path / "gw", state={"backend": "postgresql", "dsn": through},
                        models={"reverify_interval": 0.0})
    gw = start_gateway(env)
    stub, channel = _models(gw)
    try:
        proxy.cut()
        with pytest.raises(grpc.RpcError) as lost:
            stub.UnloadModel(pb.UnloadModelRequest(name="demo-types", version="1"))
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in lost.value.details()
        assert _ready(gw, "demo-types")  # what is loaded keeps serving
        proxy.restore()
        assert wait_for("the state database back", lambda: _unload_answer(stub, pb)) == \
            "UNLOADED"
        assert not _ready(gw, "demo-types")
    finally:
        channel.close()
        gw.stop()
        proxy.cut()


def _unload_answer(stub, pb) -> str:
    try:
        return stub.UnloadModel(pb.UnloadModelRequest(name="demo-types", version="1")).state
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return ""


def test_the_readme_replica_configuration_is_a_valid_configuration(tmp_path):
    import re

    from gateway.config import load_config

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running several replicas"):]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    (tmp_path / "gateway.toml").write_text(block.group(1))
    config = load_config(tmp_path / "gateway.toml")
    assert (config.policy.source, config.state.backend) == ("postgresql", "postgresql")
    assert config.state.dsn == config.policy.dsn and config.server.instance_id == "gw-a"
