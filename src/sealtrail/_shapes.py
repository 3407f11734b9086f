"""The common shape of an event envelope, as msgspec types, for the compiled fast path of
:func:`sealtrail.event.encode_shaped`.

These types accept only a narrower envelope than v1: the known fields with their plain
types, no unknown members anywhere, scalar change values, integers in the I-JSON range.
Valid events outside this shape (``actor`` as a bare string, ``time`` as a ``datetime``,
extra members in ``target``, non-scalar change values...) take the precise path. What the
types cannot express (UUID, time and address normal forms, an actor with an id or a type,
no empty change) the fast path checks after conversion with the precise path's functions.
``outcome`` and ``schema`` default as on the precise path.

``ledger`` is filled by the ledger (a client's ``ledger`` member is refused by the precise
path).
"""

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

NonEmpty = Annotated[str, Meta(min_length=1)]
SafeInt = Annotated[int, Meta(ge=-(2**53 - 1), le=2**53 - 1)]
Scalar = str | SafeInt | bool | None
# Free-form values (``data``) as deep as the fast path takes them: the event is level 1,
# ``data`` level 2, so containers reach level 5 (MAX_DEPTH); deeper ones take the precise
# path, as do floats, non-string keys and other types.
Json1 = Scalar | dict[str, Scalar] | list[Scalar]
Json2 = Scalar | dict[str, Json1] | list[Json1]
Json3 = Scalar | dict[str, Json2] | list[Json2]
MAX_DEPTH = 5


class Actor(Struct, forbid_unknown_fields=True, gc=False):
    id: NonEmpty | UnsetType = UNSET
    type: Literal["user", "service", "system", "anonymous"] | UnsetType = UNSET
    on_behalf_of: NonEmpty | UnsetType = UNSET


class Source(Struct, forbid_unknown_fields=True, gc=False):
    ip: str | UnsetType = UNSET
    user_agent: str | UnsetType = UNSET
    request_id: str | UnsetType = UNSET
    trace_id: str | UnsetType = UNSET
    service: str | UnsetType = UNSET
    host: str | UnsetType = UNSET


class Target(Struct, forbid_unknown_fields=True, gc=False):
    type: NonEmpty
    id: NonEmpty | UnsetType = UNSET


class Change(Struct, forbid_unknown_fields=True, gc=False):
    old: Scalar | UnsetType = UNSET
    new: Scalar | UnsetType = UNSET


class LedgerMember(Struct, gc=False):
    received: str
    seq: int


class Envelope(Struct, forbid_unknown_fields=True, gc=False):
    action: str
    id: str | UnsetType = UNSET
    time: str | UnsetType = UNSET
    outcome: Literal["success", "failure", "denied", "error"] = "success"
    actor: Actor | UnsetType = UNSET
    source: Source | UnsetType = UNSET
    target: Target | UnsetType = UNSET
    changes: dict[NonEmpty, Change] | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    tenant: NonEmpty | UnsetType = UNSET
    subject: NonEmpty | UnsetType = UNSET
    schema: Literal[1] = 1
    ledger: LedgerMember | UnsetType = UNSET
    data: dict[str, Json3] | UnsetType = UNSET
