"""A checker for the write-once register model over a history of client operations.

A write-once register starts empty; the first SETONCE that takes effect fixes its value for
ever. A SETONCE answers +OK when its own proposal (pid) became the value, nil when another one
did (it then returns that proposal). A GET returns the value, or nil while the register is empty.

A history is linearizable for one key exactly when: every operation that observed a value
observed the same proposal, some client wrote it, at most one write answered +OK, and there is a
moment ``t`` (the winning write taking effect) with

- ``t`` after the winning write was invoked and after every nil GET was invoked, and
- ``t`` before every operation that observed the value completed.

So the checks are pairwise: no nil GET invoked after an operation that observed the value had
completed, no observation completed before its writer was invoked. Indeterminate operations
(UNCERTAIN, node crashed, still pending) may or may not have taken effect, at any later time;
NOQUORUM promises that a write did *not* take effect.

With an :class:`~tests.sim.world.Oracle` (what the acceptors made durable), the history is also
checked against what was truly chosen: the value clients saw is the chosen one, and it was chosen
before any operation returned it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from respreg.core.proposer import Chosen, Empty, Failed, Failure
from respreg.core.types import Proposal

from .world import ChosenRecord, OpRecord


def check_history(
    history: Sequence[OpRecord],
    chosen: Mapping[bytes, Sequence[ChosenRecord]] | None = None,
) -> list[str]:
    """Return the violations of the write-once register model (empty: the history is fine)."""
    violations: list[str] = []
    by_key: dict[bytes, list[OpRecord]] = {}
    for rec in history:
        by_key.setdefault(rec.key, []).append(rec)
    for key, ops in by_key.items():
        violations += _check_key(key, ops, None if chosen is None else chosen.get(key, ()))
    if chosen is not None:
        for key, recs in chosen.items():
            if key not in by_key:
                violations.append(f"key {key!r}: chosen {_p(recs[0].proposal)} but no client ever touched it")
    return violations


def _p(p: Proposal) -> str:
    return f"pid={p.pid!r} value={p.value!r}"


def _check_key(key: bytes, ops: list[OpRecord], chosen: Sequence[ChosenRecord] | None) -> list[str]:
    out: list[str] = []
    observers: list[tuple[OpRecord, Proposal]] = []
    empty_reads: list[OpRecord] = []
    ok_writes: list[OpRecord] = []
    noquorum_writes: list[OpRecord] = []
    writes: dict[bytes, list[OpRecord]] = {}
    for rec in ops:
        if rec.proposal is not None:
            writes.setdefault(rec.proposal.pid, []).append(rec)
        if rec.crashed or rec.outcome is None or rec.complete is None:
            continue
        o = rec.outcome
        if isinstance(o, Chosen):
            observers.append((rec, o.proposal))
            if rec.proposal is not None and o.proposal.pid == rec.proposal.pid:
                ok_writes.append(rec)
                if o.proposal != rec.proposal:
                    out.append(
                        f"key {key!r}: +OK write returned a different proposal {_p(o.proposal)}: {rec.describe()}"
                    )
        elif isinstance(o, Empty):
            if rec.proposal is not None:
                out.append(f"key {key!r}: a write answered as if it were a read (empty): {rec.describe()}")
            else:
                empty_reads.append(rec)
        elif isinstance(o, Failed) and o.kind is Failure.NOQUORUM and rec.proposal is not None:
            noquorum_writes.append(rec)

    # One value per key.
    values: dict[Proposal, OpRecord] = {}
    for rec, p in observers:
        values.setdefault(p, rec)
    if len(values) > 1:
        seen = "; ".join(f"{_p(p)} (first by {r.describe()})" for p, r in values.items())
        out.append(f"key {key!r}: {len(values)} different values observed or acknowledged: {seen}")

    # Every value was written by some client, and not before that write began.
    for p, first in values.items():
        wrote = [w for w in writes.get(p.pid, ()) if w.proposal == p]
        if not wrote:
            out.append(f"key {key!r}: {_p(p)} returned but no client wrote it: {first.describe()}")
            continue
        writer_invoked = min(w.invoke for w in wrote)
        for rec, q in observers:
            if q == p and rec.complete is not None and rec.complete < writer_invoked:
                out.append(
                    f"key {key!r}: {_p(p)} returned before its write was invoked (t={writer_invoked:.3f}): "
                    f"{rec.describe()}"
                )

    if len(ok_writes) > 1:
        out.append(f"key {key!r}: {len(ok_writes)} writes answered +OK: " + "; ".join(w.describe() for w in ok_writes))

    # A nil read may not begin after an operation that observed the value completed.
    if observers and empty_reads:
        first_rec = min((rec for rec, _ in observers), key=lambda r: r.complete or 0.0)
        assert first_rec.complete is not None
        for e in empty_reads:
            if e.invoke > first_rec.complete:
                out.append(
                    f"key {key!r}: read returned nil although invoked after {first_rec.describe()} completed: "
                    f"{e.describe()}"
                )

    # NOQUORUM means the write did not take effect.
    observed_pids = {p.pid for p in values}
    chosen_pids = {c.proposal.pid for c in chosen} if chosen else set()
    for w in noquorum_writes:
        assert w.proposal is not None
        if w.proposal.pid in observed_pids:
            out.append(f"key {key!r}: a NOQUORUM write's value was observed: {w.describe()}")
        if w.proposal.pid in chosen_pids:
            out.append(f"key {key!r}: a NOQUORUM write's value was chosen: {w.describe()}")

    if chosen is not None:
        out += _check_oracle(key, observers, empty_reads, writes, chosen)
    return out


def _check_oracle(
    key: bytes,
    observers: Iterable[tuple[OpRecord, Proposal]],
    empty_reads: Iterable[OpRecord],
    writes: Mapping[bytes, Sequence[OpRecord]],
    chosen: Sequence[ChosenRecord],
) -> list[str]:
    out: list[str] = []
    distinct = {c.proposal for c in chosen}
    if len(distinct) > 1:
        out.append(f"key {key!r}: acceptors chose {len(distinct)} proposals: " + ", ".join(_p(p) for p in distinct))
    first = chosen[0] if chosen else None
    if first is not None and not any(w.proposal == first.proposal for w in writes.get(first.proposal.pid, ())):
        out.append(f"key {key!r}: chosen {_p(first.proposal)} was never written by a client")
    for rec, p in observers:
        if first is None:
            out.append(f"key {key!r}: {_p(p)} returned but acceptors never chose anything: {rec.describe()}")
            continue
        if p != first.proposal:
            out.append(f"key {key!r}: returned {_p(p)} but acceptors chose {_p(first.proposal)}: {rec.describe()}")
        elif rec.complete is not None and rec.complete < first.time:
            out.append(f"key {key!r}: returned before it was chosen (t={first.time:.3f}): {rec.describe()}")
    if first is not None:
        for e in empty_reads:
            if e.invoke > first.time:
                out.append(
                    f"key {key!r}: read returned nil although {_p(first.proposal)} was chosen at "
                    f"t={first.time:.3f}, before it was invoked: {e.describe()}"
                )
    return out


def check_completion(history: Sequence[OpRecord]) -> list[str]:
    """Every operation ended, with an answer or by the crash of its node."""
    return [f"never completed: {rec.describe()}" for rec in history if not rec.done]
