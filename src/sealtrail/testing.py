"""Helpers for applications to test their own audit calls.

An application's tests want to assert "this code path records ``user.email.update`` with
the right actor", with no files, no server and no key management. :func:`memory_trail`
gives a real :class:`~sealtrail.trail.Trail`: the same validation, context, processors,
receipts and proofs as production, over an in-memory SQLite store and a fixed test key
(never use it for a real log)::

    from sealtrail.testing import capture

    def test_change_email():
        with capture() as audit:
            change_email(user, "b@example.com", trail=audit.trail)
        audit.assert_recorded("user.email.update", actor={"id": "alice"})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sealtrail.context import NoActorPolicy
from sealtrail.ledger import CheckpointPolicy, Ledger, entry_event
from sealtrail.note import Signer
from sealtrail.store.sqlite import SQLiteStore
from sealtrail.trail import Processor, Trail, default_processors

__all__ = ["TEST_SIGNING_KEY", "Captured", "capture", "memory_trail"]

#: A fixed, public signing key for tests: receipts and checkpoints come out the same on
#: every run. Public means worthless for a real log.
TEST_SIGNING_KEY = (
    "PRIVATE+KEY+sealtrail.test/log+9724da2a+AfHFfSxtD+oxOJBb2ZHgzewoefF8x4jCn1JPVokop2mb"
)


def memory_trail(
    *,
    redact: bool | Processor = True,
    processors: Sequence[Processor] = (),
    no_actor: NoActorPolicy | None = None,
) -> Trail:
    """A real trail over an in-memory store, signed with :data:`TEST_SIGNING_KEY`, with the
    same processors as :func:`sealtrail.connect` (default redaction included)."""
    ledger = Ledger(
        SQLiteStore(Path(":memory:")),
        Signer.from_skey(TEST_SIGNING_KEY),
        policy=CheckpointPolicy(every_events=0, every_seconds=0, on_close=False),
    )
    ledger.store.shareable = False  # another process cannot open ":memory:"
    ledger.initialize()
    return Trail(ledger, processors=default_processors(redact, processors), no_actor=no_actor)


@dataclass
class Captured:
    trail: Trail

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event recorded so far, as stored (without the ledger's own member)."""
        return [entry_event(e.body) for e in self.trail.ledger.store.iter_entries() if e.body]

    def find(self, action: str, **fields: Any) -> list[dict[str, Any]]:
        """Events with this action whose fields contain ``fields`` (nested dicts: subset)."""
        return [e for e in self.events if e["action"] == action and _contains(e, fields)]

    def assert_recorded(self, action: str, **fields: Any) -> dict[str, Any]:
        """The one event with this action and fields; fails listing what was recorded."""
        found = self.find(action, **fields)
        if len(found) != 1:
            recorded = "\n".join(orjson.dumps(e).decode() for e in self.events) or "(nothing)"
            raise AssertionError(
                f"expected one {action!r} event with {fields}, found {len(found)}; "
                f"recorded:\n{recorded}"
            )
        return found[0]

    def assert_nothing_recorded(self) -> None:
        if self.events:
            raise AssertionError(f"expected no audit events, found {len(self.events)}")


@contextmanager
def capture(
    *,
    redact: bool | Processor = True,
    processors: Sequence[Processor] = (),
    no_actor: NoActorPolicy | None = None,
) -> Iterator[Captured]:
    trail = memory_trail(redact=redact, processors=processors, no_actor=no_actor)
    try:
        yield Captured(trail)
    finally:
        trail.close()


def _contains(event: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    for key, want in fields.items():
        have = event.get(key)
        if isinstance(want, Mapping):
            if not isinstance(have, Mapping) or not _contains(have, want):
                return False
        elif have != want:
            return False
    return True
