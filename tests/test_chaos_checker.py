"""The chaos checker on hand-made histories: ones that must pass, and one failing history per rule.

Times are small numbers (seconds); ``w(...)``/``r(...)`` build one operation each.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos.checker import RULES, Violation, check, check_final
from tests.chaos.history import History, Op, OpKind, Outcome

K = b"k"


def w(value: str, invoke: float, complete: float | None, outcome: Outcome, *, kind: OpKind = "setonce",
      result: str | None = None, sent: bool = True, key: bytes = K, node: int = 1) -> Op:  # fmt: skip
    """A write of ``value``."""
    return Op(
        client=f"c-{value}",
        node=node,
        kind=kind,
        key=key,
        value=value.encode(),
        invoke=invoke,
        complete=complete,
        outcome=outcome,
        result=None if result is None else result.encode(),
        sent=sent,
    )


def r(invoke: float, complete: float | None, result: str | None, *, outcome: Outcome | None = None,
      key: bytes = K, node: int = 1, client: str = "reader") -> Op:  # fmt: skip
    """A GET that returned ``result`` (None: nil), or failed with ``outcome``."""
    if outcome is None:
        outcome = Outcome.NIL if result is None else Outcome.VALUE
    return Op(client, node, "get", key, None, invoke, complete, outcome, None if result is None else result.encode())


def rules(ops: list[Op]) -> set[str]:
    return {v.rule for v in check(History.of(ops))}


def final_of(per_node: dict[int, str | None | Outcome], key: bytes = K) -> dict[bytes, dict[int, Op]]:
    out: dict[int, Op] = {}
    for node, v in per_node.items():
        if isinstance(v, Outcome):
            out[node] = r(100, 101, None, outcome=v, key=key, node=node, client="final")
        else:
            out[node] = r(100, 101, v, key=key, node=node, client="final")
    return {key: out}


# ---- histories that must pass ----------------------------------------------------------------------

PASSING: dict[str, list[Op]] = {
    "first writer wins, later ones answered nil, reads agree": [
        w("a", 0, 1, Outcome.OK),
        w("b", 0.5, 1.5, Outcome.NIL),
        w("c", 2, 3, Outcome.VALUE, kind="set-nx-get", result="a"),
        r(2, 3, "a"),
        r(4, 5, "a"),
    ],
    "SET NX GET answered nil: it wrote": [
        w("a", 0, 1, Outcome.NIL, kind="set-nx-get"),
        w("b", 2, 3, Outcome.NIL),
        r(2, 3, "a"),
    ],
    "nil read concurrent with the winning write": [
        w("a", 0, 2, Outcome.OK),
        r(1, 3, None),
        r(0.5, 1.5, "a"),
    ],
    "nil read invoked before an observation completed": [
        w("a", 0, 10, Outcome.UNCERTAIN),
        r(1, 5, "a"),
        r(4, 6, None),
    ],
    "uncertain write that took effect": [
        w("a", 0, 1, Outcome.UNCERTAIN),
        w("b", 0.5, 1.5, Outcome.NIL),
        r(2, 3, "a"),
    ],
    "uncertain write that did not take effect": [
        w("a", 0, 1, Outcome.UNCERTAIN),
        w("b", 2, 3, Outcome.OK),
        r(4, 5, "b"),
    ],
    "timed-out write taking effect long after its client gave up": [
        w("a", 0, 1, Outcome.TIMEOUT),
        r(2, 3, None),
        r(5, 6, "a"),
    ],
    "connection error after sending: the write may have happened": [
        w("a", 0, 1, Outcome.CONNECTION_ERROR),
        w("b", 2, 3, Outcome.NIL),
    ],
    "a write that never completed, observed later": [
        w("a", 0, None, Outcome.PENDING),
        r(3, 4, "a"),
    ],
    "NOQUORUM write, another write wins": [
        w("a", 0, 1, Outcome.NOQUORUM),
        w("b", 2, 3, Outcome.OK),
        r(4, 5, "b"),
    ],
    "every write NOQUORUM or never sent, reads nil": [
        w("a", 0, 1, Outcome.NOQUORUM),
        w("b", 0, 1, Outcome.CONNECTION_ERROR, sent=False),
        r(2, 3, None),
        r(0, 4, None, outcome=Outcome.NOQUORUM),
    ],
    "refused write explained by an uncertain one": [
        w("a", 0, 5, Outcome.UNCERTAIN),
        w("b", 1, 2, Outcome.NIL),
    ],
    "failed reads carry no information": [
        w("a", 0, 1, Outcome.OK),
        r(2, 3, None, outcome=Outcome.NOQUORUM),
        r(2, 3, None, outcome=Outcome.TIMEOUT),
        r(2, 3, None, outcome=Outcome.CONNECTION_ERROR),
    ],
    "keys are independent": [
        w("a", 0, 1, Outcome.OK, key=b"x"),
        w("b", 0, 1, Outcome.OK, key=b"y"),
        r(2, 3, "a", key=b"x"),
        r(2, 3, None, key=b"z"),
    ],
}


@pytest.mark.parametrize("name", list(PASSING))
def test_history_passes(name: str) -> None:
    assert check(History.of(PASSING[name])) == []


def test_final_state_passes_when_nodes_agree() -> None:
    ops = [w("a", 0, 1, Outcome.UNCERTAIN), w("b", 0, 1, Outcome.NOQUORUM)]
    assert check_final(final_of({1: "a", 2: "a", 3: "a"}), ops) == []
    assert check_final(final_of({1: None, 2: None, 3: None}), ops) == []  # the uncertain one did not happen
    ok = [w("a", 0, 1, Outcome.OK)]
    assert check_final(final_of({1: "a", 2: "a", 3: "a"}), ok) == []
    # Only NOQUORUM writes: nil, or (with another write around) that write's value.
    nq = [w("a", 0, 1, Outcome.NOQUORUM), w("b", 0, 1, Outcome.CONNECTION_ERROR, sent=False)]
    assert check_final(final_of({1: None, 2: None, 3: None}), nq) == []
    assert check_final(final_of({1: "c", 2: "c"}), [*nq, w("c", 0, 1, Outcome.TIMEOUT)]) == []


# ---- histories that must fail, one per rule --------------------------------------------------------

FAILING: dict[str, list[Op]] = {
    "multiple-values": [
        w("a", 0, 1, Outcome.UNCERTAIN),
        w("b", 0, 1, Outcome.UNCERTAIN),
        r(2, 3, "a"),
        r(4, 5, "b"),
    ],
    "nil-after-value": [
        w("a", 0, 1, Outcome.OK),
        r(2, 3, None),
    ],
    "unwritten-value": [
        r(0, 1, "ghost"),
    ],
    "multiple-ok": [
        w("a", 0, 1, Outcome.OK),
        w("b", 0, 1, Outcome.OK),
    ],
    "ok-mismatch": [
        w("a", 0, 1, Outcome.OK),
        w("b", 0, 1, Outcome.UNCERTAIN),
        r(2, 3, "b"),
    ],
    "observed-before-write": [
        r(0, 1, "a"),
        w("a", 2, 3, Outcome.UNCERTAIN),
    ],
    "noquorum-observed": [
        w("a", 0, 1, Outcome.NOQUORUM),
        r(2, 3, "a"),
    ],
    "refused-write-observed": [
        w("a", 0, 1, Outcome.NIL),
        w("b", 0, 1, Outcome.UNCERTAIN),
        r(2, 3, "a"),
    ],
    "duplicate-write-value": [
        w("a", 0, 1, Outcome.OK),
        w("a", 2, 3, Outcome.NIL),
    ],
}

#: More failing histories, each for the rule named first.
MORE_FAILING: list[tuple[str, list[Op]]] = [
    # A read of a value no write could have produced, as a SET NX GET answer.
    ("unwritten-value", [w("a", 0, 1, Outcome.VALUE, kind="set-nx-get", result="zzz")]),
    # Register reported taken, though the only other write never left its client.
    ("unwritten-value", [w("a", 0, 1, Outcome.CONNECTION_ERROR, sent=False), w("b", 2, 3, Outcome.NIL)]),
    # Register reported taken before the only write that could take it was invoked.
    ("observed-before-write", [w("b", 0, 1, Outcome.NIL), w("a", 2, 3, Outcome.UNCERTAIN)]),
    # A refusal completed before the (known) winner was invoked.
    ("observed-before-write", [w("b", 0, 1, Outcome.NIL), w("a", 2, 3, Outcome.OK)]),
    # Nil after a refusal: the register was already known to be taken.
    ("nil-after-value", [w("a", 0, 5, Outcome.UNCERTAIN), w("b", 1, 2, Outcome.NIL), r(3, 4, None)]),
    # A never-sent write's value appears.
    ("noquorum-observed", [w("a", 0, 1, Outcome.CONNECTION_ERROR, sent=False), r(2, 3, "a")]),
    # SET NX GET claims another call wrote this call's own value.
    ("refused-write-observed", [w("a", 0, 1, Outcome.VALUE, kind="set-nx-get", result="a")]),
    # Two SET NX GET both answered nil (both claim to have written).
    ("multiple-ok", [w("a", 0, 1, Outcome.NIL, kind="set-nx-get"), w("b", 0, 1, Outcome.NIL, kind="set-nx-get")]),
]


def test_every_rule_has_a_failing_history() -> None:
    history_rules = set(FAILING) | {name for name, _ in MORE_FAILING}
    final_rules = {"final-unreadable", "final-disagree", "final-ok-mismatch", "final-noquorum-value"}
    assert history_rules | final_rules == set(RULES)


@pytest.mark.parametrize("rule", list(FAILING))
def test_history_fails(rule: str) -> None:
    found = check(History.of(FAILING[rule]))
    assert rule in {v.rule for v in found}, found
    assert all(isinstance(v, Violation) and str(v) for v in found)


@pytest.mark.parametrize("case", range(len(MORE_FAILING)))
def test_more_histories_fail(case: int) -> None:
    rule, ops = MORE_FAILING[case]
    assert rule in rules(ops), check(History.of(ops))


def test_final_unreadable() -> None:
    found = check_final(final_of({1: "a", 2: Outcome.NOQUORUM}), [w("a", 0, 1, Outcome.OK)])
    assert {v.rule for v in found} == {"final-unreadable"}


def test_final_disagree() -> None:
    ops = [w("a", 0, 1, Outcome.UNCERTAIN)]
    assert {v.rule for v in check_final(final_of({1: "a", 2: None, 3: "a"}), ops)} == {"final-disagree"}


def test_final_ok_mismatch() -> None:
    ops = [w("a", 0, 1, Outcome.OK), w("b", 0, 1, Outcome.UNCERTAIN)]
    assert "final-ok-mismatch" in {v.rule for v in check_final(final_of({1: "b", 2: "b"}), ops)}
    assert "final-ok-mismatch" in {v.rule for v in check_final(final_of({1: None, 2: None}), ops)}


def test_final_noquorum_value() -> None:
    ops = [w("a", 0, 1, Outcome.NOQUORUM), w("b", 0, 1, Outcome.CONNECTION_ERROR, sent=False)]
    assert {v.rule for v in check_final(final_of({1: "a", 2: "a"}), ops)} == {"final-noquorum-value"}
    assert {v.rule for v in check_final(final_of({1: "b", 2: "b"}), ops)} == {"final-noquorum-value"}
    assert {v.rule for v in check_final(final_of({1: "zz", 2: "zz"}), ops)} == {"unwritten-value"}


def test_final_reads_in_the_history_are_checked_too() -> None:
    ops = [w("a", 0, 1, Outcome.OK), r(100, 101, None, client="final")]
    assert "nil-after-value" in rules(ops)


def test_history_round_trips_through_json(tmp_path: Path) -> None:
    ops = [*FAILING["multiple-values"], w("\xff\x00", 0, None, Outcome.PENDING, key=b"\x00\xfe")]
    h = History.of(ops)
    path = tmp_path / "h.jsonl"
    h.dump(path)
    back = History.load(path)
    assert [o.to_json() for o in back] == [o.to_json() for o in h]
    assert {v.rule for v in check(back)} == {v.rule for v in check(h)}


# ---- generated linearizable histories must pass -----------------------------------------------------


def linearizable_history(seed: int) -> list[Op]:
    """A random history of one key produced by a real write-once register.

    Every operation gets a linearization point inside its interval (an indeterminate write's
    point may lie after its completion, or it may never take effect); the register is applied
    in point order, and replies follow from it, with random failures the contract allows."""
    rng = random.Random(seed)
    ops: list[tuple[float, Op, bool]] = []  # (point, op, takes effect)
    for i in range(rng.randint(1, 12)):
        invoke = rng.uniform(0, 10)
        complete = invoke + rng.uniform(0.01, 3)
        kind: OpKind = rng.choice(["setonce", "set-nx-get", "get", "get"])
        value = None if kind == "get" else f"v{i}".encode()
        fate = rng.random()
        op = Op(f"c{i}", 1, kind, K, value, invoke, complete)
        if kind != "get" and fate < 0.15:
            op.outcome = rng.choice([Outcome.NOQUORUM, Outcome.CONNECTION_ERROR])
            op.sent = op.outcome is not Outcome.CONNECTION_ERROR
            ops.append((invoke, op, False))
        elif kind != "get" and fate < 0.35:
            # Indeterminate: may take effect any time after invocation, or never.
            op.outcome = rng.choice([Outcome.UNCERTAIN, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR, Outcome.PENDING])
            if op.outcome is Outcome.PENDING:
                op.complete = None
            ops.append((invoke + rng.uniform(0, 6), op, rng.random() < 0.5))
        else:
            ops.append((rng.uniform(invoke, complete), op, True))
    register: bytes | None = None
    for _, op, effective in sorted(ops, key=lambda t: t[0]):
        if op.kind == "get":
            if op.outcome is Outcome.PENDING:
                if rng.random() < 0.1:
                    op.outcome = Outcome.NOQUORUM
                else:
                    op.outcome = Outcome.NIL if register is None else Outcome.VALUE
                    op.result = register
            continue
        if not effective:
            continue
        determinate = op.outcome is Outcome.PENDING and op.complete is not None
        if register is None:
            register = op.value
            if determinate:
                op.outcome = Outcome.OK if op.kind == "setonce" else Outcome.NIL
        elif determinate:
            op.outcome = Outcome.NIL if op.kind == "setonce" else Outcome.VALUE
            op.result = None if op.kind == "setonce" else register
    return [op for _, op, _ in ops]


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_generated_linearizable_histories_pass(seed: int) -> None:
    ops = linearizable_history(seed)
    assert check(History.of(ops)) == [], "\n".join(o.describe() for o in ops)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_generated_histories_with_a_second_ok_fail(seed: int) -> None:
    ops = linearizable_history(seed)
    ops += [w("extra-1", 20, 21, Outcome.OK), w("extra-2", 22, 23, Outcome.OK)]
    assert "multiple-ok" in rules(ops)
