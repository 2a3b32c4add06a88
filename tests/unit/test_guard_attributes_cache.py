"""The guard merges a caller's and a model's ABAC attributes once per pair: what policy sees
must still be each call's own (a fresh dict), the current model's, and the real UTC hour."""

from __future__ import annotations

import calendar
import dataclasses
import time

from gateway.server import Guard
from tests.unit.test_guard import _context, guard, world  # noqa: F401  (fixtures)


def _attributes(gw: Guard, context, model: str = "demo-mlp") -> dict[str, object]:
    with gw.call(context, rpc="ModelMetadata", action="metadata", model=model) as call:
        return dict(call._attributes)


def test_attributes_are_fresh_per_call_and_follow_a_reloaded_model(world, guard):  # noqa: F811
    context = _context(world)
    before = int(time.time())
    first = _attributes(guard, context)
    after = int(time.time())
    assert first["caller.id"] == "spiffe://demo.local/svc/scorer"
    assert first["model.name"] == "demo-mlp" and first["model.owner"] == "team-risk"
    assert before <= first["request.time"] <= after
    hours = {time.gmtime(t).tm_hour for t in (before, after)}
    assert first["request.hour"] in hours
    # A call's additions never leak into the next call's attributes.
    with guard.call(context, rpc="ModelMetadata", action="metadata", model="demo-mlp") as call:
        call._attributes["injected"] = True
    assert "injected" not in _attributes(guard, context)
    # A model loaded again (a new object) with other attributes is seen at once.
    identity = guard.verifier.authenticate(context)
    old = guard.models.entry("demo-mlp").model
    new = dataclasses.replace(old, attributes={**old.attributes, "model.owner": "team-new"})
    assert guard.caller_and_model(identity, old)["model.owner"] == "team-risk"
    assert guard.caller_and_model(identity, new)["model.owner"] == "team-new"
    assert guard.caller_and_model(identity, old)["model.owner"] == "team-risk"
    assert guard.caller_and_model(identity, old) is not guard.caller_and_model(identity, old)


def test_request_hour_is_the_utc_hour():
    for stamp in ("2026-12-06 00:00:00", "2026-12-06 23:59:59", "2024-02-29 13:30:00"):
        t = calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
        assert t // 3600 % 24 == time.gmtime(t).tm_hour
