"""The application API: connect, record (sync, async, batch) with context and processors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import orjson
import pytest

import sealtrail
from sealtrail import InvalidEvent, SealtrailError
from sealtrail.context import MissingActor, NoActorPolicy, context
from sealtrail.home import init_ledger
from sealtrail.trail import Trail, connect


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    init_ledger(h, origin="trail.test/log").close()
    return h


def stored(trail: Trail, eid: str) -> dict[str, object]:
    body = trail.ledger.get(eid).body
    assert body is not None
    return dict(orjson.loads(body))


def test_record_with_context_returns_a_durable_receipt(home: Path) -> None:
    with connect(home) as trail:
        with context(actor="alice", ip="203.0.113.9", request_id="r-1", tenant="acme"):
            receipt = trail.record(
                "user.email.update",
                target={"type": "user", "id": "42"},
                changes={"email": {"old": "a@example.com", "new": "b@example.com"}},
                reason="user request",
            )
        event = stored(trail, receipt.id)
    assert event["actor"] == {"id": "alice"}
    assert event["source"] == {"ip": "203.0.113.9", "request_id": "r-1"}
    assert event["tenant"] == "acme" and event["reason"] == "user request"
    assert receipt.seq == 0


def test_explicit_fields_win_over_context(home: Path) -> None:
    with connect(home) as trail, context(actor="alice", tenant="acme"):
        receipt = trail.record("role.grant", actor={"id": "admin:1", "type": "user"}, tenant="t2")
        event = stored(trail, receipt.id)
    assert event["actor"] == {"id": "admin:1", "type": "user"} and event["tenant"] == "t2"


def test_no_actor_policies(home: Path) -> None:
    with connect(home, no_actor=NoActorPolicy.refuse()) as trail:
        with pytest.raises(MissingActor):
            trail.record("job.run")
        assert trail.ledger.size() == 0
    with connect(home, no_actor=NoActorPolicy.system("nightly")) as trail:
        event = stored(trail, trail.record("job.run").id)
    assert event["actor"] == {"id": "system:nightly", "type": "system"}


def test_processors_run_before_storage(home: Path) -> None:
    def drop_password(event: dict[str, object]) -> dict[str, object]:
        data = dict(event.get("data") or {})  # type: ignore[call-overload]
        data.pop("password", None)
        return {**event, "data": data}

    with connect(home, processors=[drop_password]) as trail:
        receipt = trail.record("user.login", actor="bob", data={"password": "hunter2", "mfa": True})
        assert b"hunter2" not in (trail.ledger.get(receipt.id).body or b"")


def test_batch_is_all_or_nothing(home: Path) -> None:
    with connect(home) as trail, context(actor="carol"):
        results = trail.record_many([{"action": "doc.read"}, {"action": "doc.update"}])
        assert [r.seq for r in results] == [0, 1]
        with pytest.raises(InvalidEvent):
            trail.record_many([{"action": "doc.read"}, {"action": "NOT VALID"}])
        assert trail.ledger.size() == 2


def test_async_and_threads_keep_their_own_actors(home: Path) -> None:
    with connect(home) as trail:

        async def one(i: int) -> str:
            with context(actor=f"user:{i}"):
                await asyncio.sleep(0)
                return (await trail.arecord("doc.read", data={"i": i})).id

        async def main() -> list[str]:
            return await asyncio.gather(*(one(i) for i in range(40)))

        ids = asyncio.run(main())

        def worker(i: int) -> None:
            with context(actor=f"thread:{i}"):
                trail.record("doc.read", data={"i": i})

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for eid in ids:
            event = stored(trail, eid)
            assert event["actor"] == {"id": f"user:{event['data']['i']}"}  # type: ignore[index]
        for entry in trail.ledger.store.iter_entries():
            event = orjson.loads(entry.body or b"{}")
            if str(event["actor"]["id"]).startswith("thread:"):
                assert event["actor"]["id"] == f"thread:{event['data']['i']}"
        assert trail.ledger.size() == 48


def test_connect_targets(home: Path, tmp_path: Path) -> None:
    with connect(f"sqlite:///{home / 'trail.db'}", home=home) as trail:
        trail.record("a.b", actor="x")
    with pytest.raises(SealtrailError, match="not available"):
        connect("https://audit.example:8443")
    with pytest.raises(SealtrailError):
        connect(tmp_path / "nothing-here")


def test_the_event_is_validated(home: Path) -> None:
    with connect(home) as trail, pytest.raises(InvalidEvent):
        trail.record("a.b", actor="x", data={"n": 1.5})
    assert sealtrail.SealtrailError is SealtrailError


def test_default_redaction_keeps_secrets_out_of_storage(home: Path) -> None:
    with connect(home) as trail, context(actor="alice"):
        receipt = trail.record(
            "user.password.update",
            changes={"password": {"old": "hunter2", "new": "correct horse battery"}},
            data={
                "api_key": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
                "note": "card 4111 1111 1111 1111",
            },
        )
        body = trail.ledger.get(receipt.id).body or b""
        event = orjson.loads(body)
    for secret in (b"hunter2", b"correct horse", b"sk_live_4eC39", b"4111 1111 1111 1111"):
        assert secret not in body
    assert "changes.password.old" in event["redacted"]["fields"]
    assert "password" in event["changes"]  # that it changed is still recorded
    with connect(home, redact=False) as trail:
        plain = trail.record("a.b", actor="x", data={"api_key": "visible"})
        assert b"visible" in (trail.ledger.get(plain.id).body or b"")


def test_authorization_decisions_are_recorded_with_the_context(home: Path) -> None:
    with connect(home) as trail:

        @trail.authz(
            policy="docs-rbac",
            permission="doc.edit",
            resource=lambda user, doc: {"type": "doc", "id": doc},
        )
        def can_edit(user: str, doc: str) -> bool:
            if doc == "boom":
                raise RuntimeError("policy engine down")
            return user == "alice"

        with context(actor="alice", request_id="r-1"):
            assert can_edit("alice", "d1") is True
        with context(actor="mallory"):
            assert can_edit("mallory", "d1") is False
            with pytest.raises(RuntimeError):
                can_edit("mallory", "boom")
        events = [orjson.loads(e.body or b"") for e in trail.ledger.store.iter_entries()]
    assert [(e["actor"]["id"], e["outcome"], e["data"]["decision"]) for e in events] == [
        ("alice", "success", "allow"),
        ("mallory", "denied", "deny"),
        ("mallory", "error", "error"),
    ]
    assert all(e["action"] == "authz.decision" for e in events)
    assert events[0]["target"] == {"type": "doc", "id": "d1"}
    assert events[0]["data"]["policy"] == "docs-rbac"
    assert events[0]["source"] == {"request_id": "r-1"}


def test_async_authorization_check(home: Path) -> None:
    with connect(home) as trail:

        @trail.authz(policy="p", permission="admin.panel")
        async def is_admin(user: str) -> bool:
            await asyncio.sleep(0)
            return user == "root"

        async def main() -> tuple[bool, bool]:
            with context(actor="root"):
                a = await is_admin("root")
            with context(actor="eve"):
                b = await is_admin("eve")
            return a, b

        assert asyncio.run(main()) == (True, False)
        outcomes = [
            orjson.loads(e.body or b"")["outcome"] for e in trail.ledger.store.iter_entries()
        ]
    assert outcomes == ["success", "denied"]


def test_a_decision_that_cannot_be_recorded_fails_closed(home: Path) -> None:
    with connect(home, no_actor=NoActorPolicy.refuse()) as trail:

        @trail.authz(policy="p", permission="x.y")
        def allow_all() -> bool:
            return True

        with pytest.raises(MissingActor):
            allow_all()  # no actor: the decision is not recorded, so no answer either
