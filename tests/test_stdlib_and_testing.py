"""The AUDIT logging level and handler, and the helpers applications test with."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from sealtrail import InvalidEvent, SealtrailError
from sealtrail.context import NoActorPolicy, context
from sealtrail.receipt import verify_receipt
from sealtrail.stdlib import AUDIT, AuditHandler, audit
from sealtrail.testing import Captured, capture


@pytest.fixture
def captured() -> Iterator[Captured]:
    with capture() as c:
        yield c


@pytest.fixture
def logger(captured: Captured) -> Iterator[logging.Logger]:
    log = logging.getLogger(f"sealtrail.test.{id(captured)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = AuditHandler(captured.trail)
    log.addHandler(handler)
    yield log
    log.removeHandler(handler)


def test_audit_level_has_a_name() -> None:
    assert logging.getLevelName(AUDIT) == "AUDIT"
    assert AUDIT > logging.CRITICAL
    # Not dropped by the usual production threshold (a logger inheriting root's WARNING).
    assert logging.getLogger("sealtrail.test.unconfigured").isEnabledFor(AUDIT)


def test_audit_helper_refuses_a_logger_that_drops_audit(captured: Captured) -> None:
    log = logging.getLogger("sealtrail.test.muted")
    log.setLevel(AUDIT + 1)
    with pytest.raises(SealtrailError, match="drops AUDIT"):
        audit(log, "user.login")


def test_audit_records_become_events_and_others_do_not(
    logger: logging.Logger, captured: Captured
) -> None:
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(other)
    with context(actor="alice", request_id="r-9"):
        logger.info("ordinary log line")
        logger.log(AUDIT, "user.email.update", extra={"target": {"type": "user", "id": "42"}})
        audit(logger, "user.logout", outcome="success")
    event = captured.assert_recorded("user.email.update", actor={"id": "alice"})
    assert event["target"] == {"type": "user", "id": "42"}
    assert event["source"] == {"request_id": "r-9"}
    captured.assert_recorded("user.logout")
    assert len(captured.events) == 2
    assert len(seen) == 3  # the app's own handler still sees every record


def test_audit_handler_fails_closed(logger: logging.Logger, captured: Captured) -> None:
    with pytest.raises(InvalidEvent):
        logger.log(AUDIT, "Not An Action")
    with pytest.raises(SealtrailError, match="extra="):
        logger.log(AUDIT, "user.%s", "login")
    captured.assert_nothing_recorded()


def test_audit_handler_best_effort_counts(
    captured: Captured, capsys: pytest.CaptureFixture[str]
) -> None:
    log = logging.getLogger("sealtrail.test.best_effort")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = AuditHandler(captured.trail, fail_closed=False)
    log.addHandler(handler)
    try:
        log.log(AUDIT, "Not An Action")
        assert handler.failures == 1
    finally:
        log.removeHandler(handler)
    assert "Not An Action" in capsys.readouterr().err  # reported through handleError
    captured.assert_nothing_recorded()


def test_capture_gives_real_receipts(captured: Captured) -> None:
    with context(actor="bob"):
        result = captured.trail.record("doc.read", target={"type": "doc", "id": "7"})
    receipt = captured.trail.ledger.prove(result.id)
    body = captured.trail.ledger.get(result.id).body
    assert body is not None
    verify_receipt(receipt, body, captured.trail.ledger.verifier)


def test_assertions_say_what_was_recorded(captured: Captured) -> None:
    captured.trail.record("doc.read", actor="bob")
    with pytest.raises(AssertionError, match=r"doc\.read"):
        captured.assert_recorded("doc.delete")
    with pytest.raises(AssertionError):
        captured.assert_nothing_recorded()
    assert captured.find("doc.read", actor={"id": "bob"})
    assert not captured.find("doc.read", actor={"id": "carol"})


def test_capture_with_a_no_actor_policy() -> None:
    with capture(no_actor=NoActorPolicy.system("tests")) as c:
        c.trail.record("job.run")
        c.assert_recorded("job.run", actor={"id": "system:tests", "type": "system"})


def test_captured_events_can_be_read_while_threads_record() -> None:
    """An application's test may read what was recorded while its worker threads still
    record: the read shares the in-memory store's one connection with the appends, and
    must see a consistent prefix (every event whole, in order, none twice)."""
    import threading

    errors: list[BaseException] = []
    with capture() as captured:

        def work(k: int) -> None:
            try:
                for i in range(300):
                    captured.trail.record("doc.edit", actor=f"user:{k}", data={"i": i})
            except BaseException as exc:  # reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        seen = 0
        while any(w.is_alive() for w in workers):
            events = captured.events
            ids = [e["id"] for e in events]
            assert len(ids) == len(set(ids)) and len(ids) >= seen
            seen = len(ids)
        for w in workers:
            w.join()
        assert not errors, errors[0]
        assert len(captured.events) == 1200
