"""A checker for the write-once register model over a real history (values, not proposal ids).

Model: each key is a register that starts empty; the first write to take effect fixes its value
for ever. Every value in a history is written by exactly one write (the workload makes values
unique: ``f"{client}-{seq}"``), so a value names its writer.

A history of one key is linearizable exactly when there is a winner ``w`` (or none, if no
operation ever saw a value) and a moment ``t`` at which ``w`` took effect such that

- ``t`` is after ``w`` was invoked and after every nil GET was invoked (those read before ``t``),
- ``t`` is before every operation that saw a value completed (those took effect after ``t``),
- every operation that saw a value saw ``w``'s value, ``w`` is the only write answered "wrote",
  and no write whose value is ``w``'s was answered "definitely not written" (NOQUORUM, never sent,
  or nil because another call's value is there).

Indeterminate writes (UNCERTAIN, timeout, connection error after sending, other errors, never
completed) may or may not have taken effect, at any time after their invocation. The checks
below are the pairwise form of these conditions, one rule each (see :data:`RULES`).

The final-state check (:func:`check_final`) adds what must hold once the cluster is healed: every
node answers, all agree, and the answer is consistent with the writes' replies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.history import History, Op, Outcome

RULES: dict[str, str] = {
    "multiple-values": "two different values observed for one key",
    "nil-after-value": "a read returned nil although invoked after an operation that saw a value had completed",
    "unwritten-value": "a value observed (or a write refused) that no client wrote",
    "multiple-ok": "more than one write answered that it wrote the register",
    "ok-mismatch": "a write answered +OK but reads return another value",
    "observed-before-write": "an operation saw a value, or a taken register, before the write could have happened",
    "noquorum-observed": "a write answered NOQUORUM (or never sent) but its value appears",
    "refused-write-observed": "a write answered nil (register taken by another call) but its own value appears",
    "duplicate-write-value": "two writes of one key used the same value (the history cannot be checked)",
    "final-unreadable": "after healing, a node did not answer a final read",
    "final-disagree": "after healing, nodes return different answers for one key (in the last round of reads)",
    "final-ok-mismatch": "after healing, a key does not hold the value of the write that answered +OK",
    "final-noquorum-value": "after healing, a key holds the value of a write answered NOQUORUM or never sent",
}


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    key: bytes
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] key {self.key!r}: {self.message}"


def check(history: Iterable[Op]) -> list[Violation]:
    """Every violation of the write-once register model in ``history`` (empty: it is fine)."""
    by_key: dict[bytes, list[Op]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
    out: list[Violation] = []
    for key, ops in by_key.items():
        out += check_key(key, ops)
    return out


def check_key(key: bytes, ops: Sequence[Op]) -> list[Violation]:
    out: list[Violation] = []

    def bad(rule: str, message: str) -> None:
        out.append(Violation(rule, key, message))

    writers: dict[bytes, Op] = {}
    for op in ops:
        if op.is_write and op.value is not None:
            if op.value in writers:
                bad("duplicate-write-value", f"{writers[op.value].describe()} and {op.describe()}")
            writers.setdefault(op.value, op)

    observers = [op for op in ops if op.observed() is not None]
    refused = [op for op in ops if op.refused()]
    nonempty = observers + refused
    empty_reads = [op for op in ops if op.saw_empty()]
    wrote = [op for op in ops if op.wrote()]

    # One value per key.
    values: dict[bytes, Op] = {}
    for op in sorted(observers, key=lambda o: o.end):
        v = op.observed()
        assert v is not None
        values.setdefault(v, op)
    if len(values) > 1:
        listed = "; ".join(f"{v!r} first by {op.describe()}" for v, op in values.items())
        bad("multiple-values", f"{len(values)} different values observed: {listed}")

    if len(wrote) > 1:
        bad("multiple-ok", f"{len(wrote)} writes answered that they wrote: " + "; ".join(w.describe() for w in wrote))

    for w in wrote:
        for op in observers:
            if op is not w and op.observed() != w.value:
                bad("ok-mismatch", f"{w.describe()} answered +OK, but {op.describe()}")
                break

    # Every observed value was written, by a write that may have taken effect, not after it was seen.
    for v, first in values.items():
        writer = writers.get(v)
        if writer is None:
            bad("unwritten-value", f"no client wrote {v!r}, first seen by {first.describe()}")
            continue
        if writer.definitely_failed():
            bad("noquorum-observed", f"{writer.describe()} but {first.describe()}")
        elif writer.refused():
            bad("refused-write-observed", f"{writer.describe()} but {first.describe()}")
        for op in observers:
            if op.observed() == v and op.end < writer.invoke:
                bad("observed-before-write", f"{op.describe()} completed before its write was invoked: "
                    f"{writer.describe()}")  # fmt: skip

    # A register reported taken needs a write that could have taken it, invoked in time.
    if refused and not values:
        candidates = [w for w in ops if w.is_write and (w.indeterminate() or w.wrote())]
        first_refusal = min(refused, key=lambda o: o.end)
        if not candidates:
            bad("unwritten-value", f"register reported taken, but no write could have taken effect: "
                f"{first_refusal.describe()}")  # fmt: skip
        elif min(w.invoke for w in candidates) > first_refusal.end:
            bad("observed-before-write", f"register reported taken before any write that could take it was "
                f"invoked: {first_refusal.describe()}")  # fmt: skip
    elif refused and values:
        for v in values:
            winner = writers.get(v)
            if winner is None:
                continue
            for op in refused:
                if op is not winner and op.end < winner.invoke:
                    bad("observed-before-write", f"{op.describe()} reported the register taken before its "
                        f"value's write was invoked: {winner.describe()}")  # fmt: skip

    # A nil read may not begin after an operation that saw the register non-empty completed.
    if nonempty and empty_reads:
        first_done = min(nonempty, key=lambda o: o.end)
        for e in empty_reads:
            if e.invoke > first_done.end:
                bad("nil-after-value", f"{e.describe()} invoked after {first_done.describe()} completed")

    return out


# ---- final state -------------------------------------------------------------------------------


def check_final(final: Mapping[bytes, Mapping[int, Op]], history: Iterable[Op]) -> list[Violation]:
    """Check the final reads taken after healing: ``final[key][node]`` is the last GET of ``key``
    on ``node``, from the last round of reads (see ``tests.chaos.workload.final_reads``: a key is
    read again on every node while the answers differ, since an indeterminate write may take
    effect during the reads). ``history`` holds the operations of the run (with or without the
    final reads)."""
    by_key: dict[bytes, list[Op]] = {}
    for op in history:
        if op.is_write:
            by_key.setdefault(op.key, []).append(op)
    out: list[Violation] = []
    for key, per_node in final.items():
        answers: dict[int, bytes | None] = {}
        for node, op in sorted(per_node.items()):
            if op.outcome is Outcome.VALUE:
                answers[node] = op.result
            elif op.outcome is Outcome.NIL:
                answers[node] = None
            else:
                out.append(Violation("final-unreadable", key, f"node {node}: {op.describe()}"))
        distinct = set(answers.values())
        if len(distinct) > 1:
            shown = ", ".join(f"n{n}={v!r}" for n, v in sorted(answers.items()))
            out.append(Violation("final-disagree", key, f"nodes answer differently: {shown}"))
        writes = by_key.get(key, [])
        for w in writes:
            if w.wrote():
                for node, v in answers.items():
                    if v != w.value:
                        out.append(Violation("final-ok-mismatch", key, f"node {node} reads {v!r} after {w.describe()}"))
        for node, v in answers.items():
            if v is None:
                continue
            writer = next((w for w in writes if w.value == v), None)
            if writer is None:
                out.append(Violation("unwritten-value", key, f"node {node} finally reads {v!r}, written by no client"))
            elif writer.definitely_failed():
                out.append(
                    Violation("final-noquorum-value", key, f"node {node} finally reads {v!r} of {writer.describe()}")
                )
    return out


def summarize(violations: Sequence[Violation], limit: int = 20) -> str:
    if not violations:
        return "no violations"
    counts: dict[str, int] = {}
    for v in violations:
        counts[v.rule] = counts.get(v.rule, 0) + 1
    lines = [f"{len(violations)} violation(s): " + ", ".join(f"{r} x{n}" for r, n in sorted(counts.items()))]
    lines += [f"  {v}" for v in violations[:limit]]
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Check a history written by ``History.dump`` (one JSON object per line)."""
    p = argparse.ArgumentParser(prog="python -m tests.chaos.checker", description=main.__doc__)
    p.add_argument("history", type=Path)
    args = p.parse_args(argv)
    violations = check(History.load(args.history))
    print(summarize(violations, limit=200))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
