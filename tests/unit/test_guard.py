"""The guard on its own: what a call that fails inside it answers, and what it records.

Real parts around it: a real audit log on disk, a real compiled policy, real ONNX models and
real certificates checked by the real verifier. Only the gRPC servicer context is a stand-in
(:class:`_Context`): it records what the guard tells the transport, which is what is checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest

from gateway.audit import AuditLog, AuditSettings, ensure_keys
from gateway.errors import InvalidRequest
from gateway.identity import IdentityVerifier
from gateway.identity.pki import init_dev_pki
from gateway.models import ModelRepository
from gateway.models.demo import build_demo_repository
from gateway.monitor import Monitor
from gateway.policy import PolicyStore
from gateway.server import RECEIPT_INDEX, RECEIPT_LEAF, Guard

ROOT = Path(__file__).resolve().parents[2]

#: The shipped policy, plus: scorers may read the metadata of any model except demo-types.
#: So "metadata on demo-types" is denied by policy while "metadata on a model that does not
#: exist" passes policy and is refused as unknown: the two refusals the caller must not tell
#: apart.
_EXTRA_RULES = """
p, role:scorers, *, metadata, allow
p, role:scorers, demo-types, metadata, deny
"""


class _Aborted(Exception):
    """What grpc's ``context.abort`` does: end the handler by raising."""


class _Context:
    """A servicer context presenting one client certificate, recording what it is told."""

    def __init__(self, pem: bytes) -> None:
        self._pem = pem
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: dict[str, str] = {}

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]}

    def set_trailing_metadata(self, metadata) -> None:
        self.trailers.update(metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("guard")
    pki = init_dev_pki(root / "certs")
    build_demo_repository(root / "models")
    policies = root / "policies"
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "model.conf", policies / "model.conf")
    text = (ROOT / "policies" / "policy.csv").read_text(encoding="utf-8")
    (policies / "policy.csv").write_text(text + _EXTRA_RULES, encoding="utf-8")
    models = ModelRepository(root / "models", session_options=_options, verify=None)
    models.load_all()
    return {"root": root, "pki": pki, "models": models,
            "policy": PolicyStore.load(policies)}


@pytest.fixture
def guard(world, tmp_path):
    settings = AuditSettings(directory=tmp_path / "log", signing_key=tmp_path / "k" / "log.skey",
                             payload_key=tmp_path / "k" / "payload.key", name="guard.test/audit")
    ensure_keys(settings)
    audit = AuditLog.open(settings, instance_id="guard-test")
    yield Guard(verifier=IdentityVerifier(["demo.local"]), policy=world["policy"],
                models=world["models"], audit=audit, monitor=Monitor())
    audit.close()


def _context(world, name: str = "scorer") -> _Context:
    return _Context(Path(world["pki"]["clients"][name]).read_bytes())


def _aborted(guard: Guard, context: _Context, *, model: str = "demo-mlp",
             raises: Exception | None = None) -> bool:
    """Run a ModelMetadata call that the guard must end by aborting it (the handler raises
    ``raises``); return whether the handler ran."""
    ran = False
    try:
        with guard.call(context, rpc="ModelMetadata", action="metadata", model=model):
            ran = True
            if raises is not None:
                raise raises
    except Exception as err:  # the guard's own marker, raised from the context's abort
        assert isinstance(err.__cause__, _Aborted), repr(err)
    else:
        pytest.fail("the guard let the call end without aborting it")
    return ran


def _records(guard: Guard) -> list[dict]:
    """Every record in the guard's log, decoded (JSON lines under the chain fields)."""
    return [json.loads(entry) for entry in guard.audit.entries(0, guard.audit.size)]


def _decisions(guard: Guard) -> list[dict]:
    return [r for r in _records(guard) if r.get("kind") == "decision"]


def test_an_allowed_call_is_recorded_and_answers_with_its_receipt(world, guard):
    context = _context(world)
    with guard.call(context, rpc="ModelMetadata", action="metadata", model="demo-mlp") as call:
        assert call.model().name == "demo-mlp"
    assert context.code is None
    [record] = _decisions(guard)
    assert (record["decision"], record["status"], record["rpc"]) == ("allow", "OK", "ModelMetadata")
    assert int(context.trailers[RECEIPT_INDEX]) == guard.audit.size - 1
    assert len(bytes.fromhex(context.trailers[RECEIPT_LEAF])) == 32


def test_a_call_the_log_cannot_record_fails_unavailable_and_is_not_served(world, guard):
    guard.audit.close()  # the log can no longer make a record durable
    context = _context(world)
    assert _aborted(guard, context)  # the handler may run; its answer must not leave
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "not served" in context.details
    assert RECEIPT_INDEX not in context.trailers


def test_an_internal_error_answers_internal_without_details_and_is_recorded(world, guard):
    context = _context(world)
    assert _aborted(guard, context, raises=RuntimeError("secret detail of a bug"))
    assert context.code == grpc.StatusCode.INTERNAL
    assert "secret" not in context.details
    [record] = _decisions(guard)
    assert (record["decision"], record["status"]) == ("allow", "INTERNAL")
    assert int(context.trailers[RECEIPT_INDEX]) == guard.audit.size - 1


def test_a_gateway_error_answers_its_own_status_and_is_recorded(world, guard):
    context = _context(world)
    assert _aborted(guard, context, raises=InvalidRequest("input 'x' has the wrong shape"))
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT,
                                               "input 'x' has the wrong shape")
    [record] = _decisions(guard)
    assert record["status"] == "INVALID_ARGUMENT"


def test_a_denied_model_and_an_unknown_model_look_the_same_to_the_caller(world, guard):
    def refused(model: str) -> tuple[_Context, bool]:
        context = _context(world)
        return context, _aborted(guard, context, model=model)

    denied, ran_denied = refused("demo-types")
    unknown, ran_unknown = refused("no-such-model")
    assert not ran_denied and not ran_unknown
    assert denied.code == unknown.code == grpc.StatusCode.PERMISSION_DENIED
    assert denied.details.replace("demo-types", "M") == \
        unknown.details.replace("no-such-model", "M")
    assert denied.trailers.keys() == unknown.trailers.keys() == {RECEIPT_INDEX, RECEIPT_LEAF}
    # Only the record, for the operator, says which it was.
    first, second = _decisions(guard)
    assert (first["reason"], second["reason"]) == ("policy", "unknown-model")
    assert first["status"] == second["status"] == "PERMISSION_DENIED"


def test_a_caller_outside_the_trust_domains_is_refused_unauthenticated_and_recorded(world,
                                                                                    guard):
    guard_elsewhere = Guard(verifier=IdentityVerifier(["elsewhere.example"]),
                            policy=guard.policy, models=guard.models, audit=guard.audit,
                            monitor=guard.monitor)
    context = _context(world)
    assert not _aborted(guard_elsewhere, context), "an unauthenticated caller reached the handler"
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    [record] = _decisions(guard)
    assert (record["decision"], record["reason"]) == ("deny", "unauthenticated")
    assert record["caller"]["id"] is None and len(record["caller"]["cert_sha256"]) == 64
