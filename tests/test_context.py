"""The audit context: nesting, isolation across threads and tasks, late actors, carrying
into jobs, and how it fills events without overriding them."""

from __future__ import annotations

import asyncio
import functools
import json
import pickle
import random
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address

import pytest

import sealtrail
from sealtrail.context import (
    _NAMED,
    AuditContext,
    ContextError,
    MissingActor,
    NoActorPolicy,
    actor_or_policy,
    apply_context,
    carry,
    context,
    current_context,
    resolve,
    restore,
    wrap,
)
from sealtrail.event import prepare_event

THREADS_INHERIT = bool(getattr(sys.flags, "thread_inherit_context", 0))


def run_async(test: Callable[[], Coroutine[object, object, None]]) -> Callable[[], None]:
    """Run an async test in a fresh event loop (no asyncio plugin needed)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


@pytest.fixture(autouse=True)
def empty_context() -> Iterator[None]:
    assert not current_context(), "a previous test leaked its context"
    yield
    assert not current_context(), "this test leaked its context"


# --------------------------------------------------------------------------------------
# Nesting and restoring


def test_empty_by_default() -> None:
    snapshot = current_context()
    assert snapshot == AuditContext()
    assert not snapshot
    assert snapshot.actor is None and dict(snapshot.extra) == {}


def test_nested_contexts_merge_inner_wins_and_restore() -> None:
    with context(actor="alice", request_id="r1", tenant="acme", session="s1") as outer:
        assert outer is current_context()
        with context(actor="bob", reason="support ticket 7", session="s2", job="j"):
            inner = current_context()
            assert inner.actor == "bob"
            assert inner.request_id == "r1"
            assert inner.tenant == "acme"
            assert inner.reason == "support ticket 7"
            assert dict(inner.extra) == {"session": "s2", "job": "j"}
        assert current_context() == outer
        assert current_context().actor == "alice"
        assert dict(current_context().extra) == {"session": "s1"}
    assert not current_context()


def test_none_leaves_the_enclosing_value() -> None:
    with context(actor="alice", ip="192.0.2.1"), context(actor=None, ip="192.0.2.9"):
        assert current_context().actor == "alice"
        assert current_context().ip == "192.0.2.9"


def test_restored_on_exception() -> None:
    with context(actor="alice"):
        with pytest.raises(KeyError), context(actor="mallory"):
            raise KeyError("boom")
        assert current_context().actor == "alice"
    assert not current_context()


@run_async
async def test_async_with() -> None:
    async with context(actor="alice") as snapshot:
        assert snapshot.actor == "alice"
        await asyncio.sleep(0)
        assert current_context().actor == "alice"
    assert not current_context()


def test_snapshots_are_immutable() -> None:
    actor = {"id": "42", "type": "user"}
    with context(actor=actor, team="red") as snapshot:
        actor["id"] = "forged"  # the caller's dict changing later changes nothing
        assert snapshot.actor == {"id": "42", "type": "user"}
        with pytest.raises(AttributeError):
            snapshot.actor = "x"  # type: ignore[misc]
        with pytest.raises(TypeError):
            snapshot.extra["team"] = "blue"  # type: ignore[index]
        with pytest.raises(TypeError):
            snapshot.actor["id"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"actor": 42}, TypeError),
        ({"actor": ""}, ValueError),
        ({"actor": {1: "x"}}, TypeError),
        ({"ip": 1234}, TypeError),
        ({"request_id": b"r"}, TypeError),
        ({"tenant": ["acme"]}, TypeError),
    ],
)
def test_bad_values_fail_where_the_context_is_set(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        context(**kwargs)  # type: ignore[arg-type]


def test_ip_address_objects_are_accepted() -> None:
    with context(ip=ip_address("2001:db8::1")):
        assert current_context().ip == "2001:db8::1"


def test_one_scope_object_entered_twice_nests_correctly() -> None:
    scope = context(actor="alice")
    with scope, context(actor="bob"), scope:
        assert current_context().actor == "alice"
    assert not current_context()


# --------------------------------------------------------------------------------------
# Decorators


def test_decorates_sync_functions() -> None:
    @context(actor="system:nightly", reason="cleanup")
    def job(x: int) -> tuple[object, object, int]:
        snapshot = current_context()
        return snapshot.actor, snapshot.reason, x * 2

    assert job(21) == ("system:nightly", "cleanup", 42)
    assert job.__name__ == "job"
    assert not current_context()
    with context(actor="alice", tenant="acme"):
        assert job(1)[0] == "system:nightly"
        assert current_context().actor == "alice"


def test_decorator_restores_on_exception() -> None:
    @context(actor="x")
    def fails() -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        fails()


@run_async
async def test_decorates_async_functions_concurrently() -> None:
    @context(reason="sync job")
    async def job(actor: str) -> list[object]:
        seen = []
        with context(actor=actor):
            for _ in range(5):
                await asyncio.sleep(random.random() / 1000)
                seen.append((current_context().actor, current_context().reason))
        return seen

    results = await asyncio.gather(*(job(f"user:{i}") for i in range(50)))
    for i, seen in enumerate(results):
        assert seen == [(f"user:{i}", "sync job")] * 5
    assert not current_context()


def test_refuses_to_decorate_generators() -> None:
    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> object:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        context(actor="x")(gen)
    with pytest.raises(TypeError, match="generator"):
        context(actor="x")(agen)


# --------------------------------------------------------------------------------------
# Threads and tasks


def test_new_threads_start_empty_unless_the_context_is_carried() -> None:
    seen: dict[str, object] = {}

    def plain() -> None:
        seen["plain"] = current_context().actor

    def carried() -> None:
        seen["carried"] = current_context().actor

    with context(actor="alice"):
        threads = [threading.Thread(target=plain), threading.Thread(target=wrap(carried))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert seen["plain"] == ("alice" if THREADS_INHERIT else None)
    assert seen["carried"] == "alice"


def test_threads_do_not_see_each_others_context() -> None:
    errors: list[str] = []
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        with context(actor=f"user:{i}", request_id=f"r{i}"):
            barrier.wait()
            for _ in range(200):
                snapshot = current_context()
                if snapshot.actor != f"user:{i}" or snapshot.request_id != f"r{i}":
                    errors.append(f"{i} saw {snapshot.actor}")
        if current_context():
            errors.append(f"{i} leaked")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_wrap_runs_concurrently_in_a_pool() -> None:
    def who(_: int) -> object:
        return current_context().actor

    with context(actor="alice"):
        task = wrap(who)
    # The same wrapped function, many calls at once: copy_context().run would refuse.
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(task, range(100))) == {"alice"}


@run_async
async def test_many_concurrent_tasks_zero_misattribution() -> None:
    mistakes = 0

    async def request(i: int) -> None:
        nonlocal mistakes
        with context(actor=f"user:{i}", request_id=f"req-{i}"):
            for step in range(10):
                await asyncio.sleep(random.random() / 500)
                if step == 5:
                    # A task spawned inside inherits the context at creation...
                    async def child() -> object:
                        with context(reason="child"):
                            await asyncio.sleep(0)
                            return current_context().actor

                    assert await asyncio.create_task(child()) == f"user:{i}"
                    # ...and what it sets does not leak back.
                    assert current_context().reason is None
                snapshot = current_context()
                if snapshot.actor != f"user:{i}" or snapshot.request_id != f"req-{i}":
                    mistakes += 1

    await asyncio.gather(*(request(i) for i in range(500)))
    assert mistakes == 0
    assert not current_context()


@run_async
async def test_changes_in_a_task_do_not_leak_out() -> None:
    async def sets_context() -> None:
        scope = context(actor="mallory")
        scope.__enter__()  # never exited: the task's copy is simply dropped

    with context(actor="alice"):
        await asyncio.create_task(sets_context())
        assert current_context().actor == "alice"


@run_async
async def test_wrap_for_run_in_executor() -> None:
    loop = asyncio.get_running_loop()
    with context(actor="alice"):
        actor = await loop.run_in_executor(None, wrap(lambda: current_context().actor))
    assert actor == "alice"


@run_async
async def test_wrap_async_function() -> None:
    async def who() -> object:
        return current_context().actor

    with context(actor="alice"):
        wrapped = wrap(who)
    assert await wrapped() == "alice"


# --------------------------------------------------------------------------------------
# Late actors


def test_callables_are_resolved_at_record_time_not_before() -> None:
    user: dict[str, str | None] = {"id": None}
    calls = 0

    def current_user() -> str | None:
        nonlocal calls
        calls += 1
        return user["id"]

    with context(actor=current_user, tenant=lambda: "acme"):
        snapshot = current_context()
        assert snapshot.actor is current_user  # not resolved by taking the snapshot
        assert calls == 0
        assert not snapshot.is_resolved
        assert resolve(snapshot).actor is None  # not authenticated yet
        user["id"] = "alice"  # the framework authenticates later in the request
        resolved = resolve(snapshot)
        assert resolved.actor == "alice"
        assert resolved.tenant == "acme"
        assert resolved.is_resolved
        assert calls == 2
        assert resolve(resolved) is resolved


def test_callable_may_return_a_mapping_or_nothing() -> None:
    with context(actor=lambda: {"id": "42", "type": "user"}, extra_field=lambda: None):
        resolved = resolve(current_context())
    assert resolved.actor == {"id": "42", "type": "user"}
    assert "extra_field" not in resolved.extra
    with context(actor=lambda: ""):
        assert resolve(current_context()).actor is None


def test_a_failing_callable_is_a_clear_sealtrail_error() -> None:
    def broken() -> str:
        raise LookupError("session store down")

    with context(actor=broken):
        with pytest.raises(ContextError, match=r"'actor'.*LookupError: session store down") as info:
            resolve(current_context())
        assert isinstance(info.value, sealtrail.SealtrailError)
        assert isinstance(info.value.__cause__, LookupError)


@pytest.mark.parametrize("bad", [42, ["x"], lambda: "nested callable"])
def test_a_callable_returning_a_bad_value_is_refused(bad: object) -> None:
    with context(actor=lambda: bad), pytest.raises(ContextError, match="actor"):
        resolve(current_context())


def test_a_callable_returning_a_coroutine_is_refused() -> None:
    async def lookup() -> str:
        return "alice"

    with context(actor=lookup), pytest.raises(ContextError, match="awaitable"):
        resolve(current_context())


# --------------------------------------------------------------------------------------
# Carrying into jobs


def test_carry_and_restore_round_trip_through_json_and_pickle() -> None:
    with context(
        actor=lambda: {"id": "42", "type": "user"},
        on_behalf_of="support:7",
        ip="192.0.2.1",
        user_agent="curl/8",
        request_id="r1",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        tenant="acme",
        reason="ticket 7",
        session="s1",
    ):
        carried = carry()
    assert carried.is_resolved
    payload = json.dumps(carried.to_dict())
    assert json.loads(payload) == {
        "actor": {"id": "42", "type": "user"},
        "on_behalf_of": "support:7",
        "ip": "192.0.2.1",
        "user_agent": "curl/8",
        "request_id": "r1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "tenant": "acme",
        "reason": "ticket 7",
        "session": "s1",
    }
    assert AuditContext.from_dict(json.loads(payload)) == carried
    assert pickle.loads(pickle.dumps(carried)) == carried

    # In the worker: exactly the carried context, even inside another one.
    with context(actor="worker-leftover", job="j1"):
        with restore(json.loads(payload)) as restored:
            assert restored == carried
            assert current_context() == carried
            assert "job" not in current_context().extra
        assert current_context().actor == "worker-leftover"


def test_pickling_resolves_callables() -> None:
    with context(actor=lambda: "alice"):
        snapshot = current_context()
    assert pickle.loads(pickle.dumps(snapshot)).actor == "alice"


def test_restore_as_a_decorator() -> None:
    carried = AuditContext.from_dict({"actor": "alice", "request_id": "r1"})

    @restore(carried)
    def job() -> object:
        return current_context().request_id

    assert job() == "r1"


def test_from_dict_checks_like_context() -> None:
    with pytest.raises(TypeError):
        AuditContext.from_dict({"actor": 42})
    with pytest.raises(TypeError):
        AuditContext.from_dict(["actor"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Filling events


def test_apply_context_fills_the_envelope() -> None:
    with context(
        actor={"id": "42", "type": "user"},
        on_behalf_of="support:7",
        ip="192.0.2.1",
        user_agent="curl/8",
        request_id="r1",
        trace_id="t1",
        tenant="acme",
        reason="ticket 7",
        subject="user:42",
        service="billing",
        session="s1",
    ):
        event = apply_context({"action": "user.email.update"})
    assert event == {
        "action": "user.email.update",
        "actor": {"id": "42", "type": "user", "on_behalf_of": "support:7"},
        "source": {
            "ip": "192.0.2.1",
            "user_agent": "curl/8",
            "request_id": "r1",
            "trace_id": "t1",
            "service": "billing",
        },
        "tenant": "acme",
        "reason": "ticket 7",
        "subject": "user:42",
        "data": {"session": "s1"},
    }
    prepared = prepare_event(event)
    assert prepared["actor"] == {"id": "42", "type": "user", "on_behalf_of": "support:7"}


def test_apply_context_never_overrides_the_event() -> None:
    original = {
        "action": "user.role.grant",
        "actor": {"id": "admin"},
        "source": {"ip": "198.51.100.7"},
        "tenant": "explicit",
        "reason": None,
        "data": {"session": "mine"},
    }
    snapshot = AuditContext.from_dict(
        {
            "actor": "alice",
            "on_behalf_of": "bob",
            "ip": "192.0.2.1",
            "request_id": "r1",
            "tenant": "acme",
            "reason": "ctx",
            "session": "s1",
            "other": 1,
        }
    )
    event = apply_context(original, snapshot)
    # The event's own actor stays whole: the context's on_behalf_of belongs to alice.
    assert event["actor"] == {"id": "admin"}
    assert event["source"] == {"ip": "198.51.100.7", "request_id": "r1"}
    assert event["tenant"] == "explicit"
    assert event["reason"] == "ctx"  # None counts as not set
    assert event["data"] == {"session": "mine", "other": 1}
    assert original["source"] == {"ip": "198.51.100.7"}  # input untouched
    assert original["data"] == {"session": "mine"}


def test_apply_context_resolves_callables_and_leaves_invalid_shapes_alone() -> None:
    with context(actor=lambda: "alice", request_id="r1"):
        event = apply_context({"action": "a.b", "source": "not an object"})
    assert event["actor"] == {"id": "alice"}
    assert event["source"] == "not an object"  # prepare_event will name the problem


def test_apply_context_with_an_empty_context() -> None:
    assert apply_context({"action": "a.b"}) == {"action": "a.b"}


def test_no_actor_policies() -> None:
    empty = AuditContext()
    assert actor_or_policy(empty, None) is None
    assert actor_or_policy(empty, NoActorPolicy.system("nightly-cleanup")) == {
        "id": "system:nightly-cleanup",
        "type": "system",
    }
    assert actor_or_policy(empty, NoActorPolicy.anonymous()) == {"type": "anonymous"}
    with pytest.raises(MissingActor, match=r"'user\.delete' has no actor") as info:
        actor_or_policy(empty, NoActorPolicy.refuse(), action="user.delete")
    assert isinstance(info.value, sealtrail.SealtrailError)
    # With an actor, the policy does not matter.
    alice = AuditContext(actor="alice")
    assert actor_or_policy(alice, NoActorPolicy.refuse()) == {"id": "alice"}


def test_policy_applies_in_apply_context() -> None:
    event = apply_context({"action": "job.run"}, policy=NoActorPolicy.system("cron"))
    assert prepare_event(event)["actor"] == {"id": "system:cron", "type": "system"}
    with pytest.raises(MissingActor, match=r"job\.run"):
        apply_context({"action": "job.run"}, policy=NoActorPolicy.refuse())
    # An event with its own actor is never refused.
    assert apply_context({"action": "job.run", "actor": "x"}, policy=NoActorPolicy.refuse())


def test_late_actor_that_never_authenticates_meets_the_policy() -> None:
    with context(actor=lambda: None), pytest.raises(MissingActor):
        apply_context({"action": "a.b"}, policy=NoActorPolicy.refuse())


def test_on_behalf_of_without_an_actor_is_kept() -> None:
    snapshot = AuditContext(on_behalf_of="bob")
    assert actor_or_policy(snapshot, None) == {"type": "anonymous", "on_behalf_of": "bob"}
    assert actor_or_policy(snapshot, NoActorPolicy.system("x")) == {
        "id": "system:x",
        "type": "system",
        "on_behalf_of": "bob",
    }


@pytest.mark.parametrize("name", ["", "two words", "line\nbreak", 7])
def test_system_policy_needs_a_name(name: object) -> None:
    with pytest.raises(ValueError):
        NoActorPolicy.system(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [*_NAMED, "custom_extra"])
def test_every_field_counts_as_set_and_as_unresolved(name: str) -> None:
    assert not AuditContext() and AuditContext().is_resolved
    extra = name not in _NAMED
    given = AuditContext(extra={name: "x"}) if extra else AuditContext(**{name: "x"})
    assert given and given.is_resolved
    late = AuditContext(extra={name: lambda: "x"}) if extra else AuditContext(**{name: lambda: "x"})
    assert late and not late.is_resolved
