"""Automatic capture at the database (DESIGN.md, "Two ways in", I9).

Every INSERT, UPDATE and DELETE on a tracked table becomes one trail event, written to an
outbox table in the application's own database inside the same transaction, then shipped to
the ledger by a relay. The pieces:

* :mod:`sealtrail.capture.change`: the pure core: what a change event looks like, how
  column values and primary keys are written, and the outbox table's shape;
* :mod:`sealtrail.capture.pg`: PostgreSQL triggers, the transaction-local actor context,
  commit ordering and guards;
* :mod:`sealtrail.capture.orm`: SQLAlchemy session capture, where triggers are not available;
* :mod:`sealtrail.capture.relay`: outbox to ledger, at least once, stored exactly once;
* :mod:`sealtrail.capture.revert` and :mod:`sealtrail.capture.history`: undo a change, and
  the state of rows at any time, from the trail.
"""
