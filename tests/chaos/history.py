"""The history of a chaos run: every client operation, its node, its times and its outcome.

Times are ``time.monotonic()`` seconds taken in the client process: ``invoke`` just before the
request is written to the socket, ``complete`` just after the reply (or the error) arrived. An
operation's effect, if any, happened somewhere in ``[invoke, complete]``.

Outcomes (what the client saw):

========================  =====================================================================
``ok``                    SETONCE answered +OK: this call's value became the register's value
``nil``                   SETONCE: the register already held a value (another call's);
                          SET NX GET: this call wrote (Redis 7 semantics); GET: nothing written
``value``                 GET or SET NX GET returned a value (``result``)
``noquorum``              -NOQUORUM: for a write, its value is definitely not written
``uncertain``             -UNCERTAIN: the value may or may not be written
``timeout``               no reply within the client's socket timeout (may or may not have happened)
``connection-error``      the connection failed; ``sent`` tells whether the request may have left
``other-error``           any other error or an unexpected reply (``error`` has the text)
``pending``               never completed (the client gave up waiting for it)
========================  =====================================================================
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OpKind = Literal["setonce", "set-nx-get", "get"]
OP_KINDS: tuple[OpKind, ...] = ("setonce", "set-nx-get", "get")


class Outcome(enum.Enum):
    OK = "ok"
    NIL = "nil"
    VALUE = "value"
    NOQUORUM = "noquorum"
    UNCERTAIN = "uncertain"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection-error"
    OTHER_ERROR = "other-error"
    PENDING = "pending"


#: Outcomes after which a write may or may not have taken effect.
INDETERMINATE = frozenset(
    {Outcome.UNCERTAIN, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR, Outcome.OTHER_ERROR, Outcome.PENDING}
)


@dataclass(slots=True)
class Op:
    """One client operation. ``value`` is what a write writes (unique per write in a history)."""

    client: str
    node: int
    kind: OpKind
    key: bytes
    value: bytes | None
    invoke: float
    complete: float | None = None
    outcome: Outcome = Outcome.PENDING
    result: bytes | None = None
    error: str = ""
    #: False when the request certainly never left the client (the connection could not be made).
    sent: bool = True
    index: int = -1

    @property
    def is_write(self) -> bool:
        return self.kind != "get"

    @property
    def end(self) -> float:
        """Completion time; an operation that never completed may take effect at any later time."""
        return float("inf") if self.complete is None else self.complete

    def wrote(self) -> bool:
        """This write was answered as the one that wrote the register (+OK, or nil to SET NX GET)."""
        if self.kind == "setonce":
            return self.outcome is Outcome.OK
        if self.kind == "set-nx-get":
            return self.outcome is Outcome.NIL
        return False

    def refused(self) -> bool:
        """This write was answered: the register already holds another call's value."""
        if self.kind == "setonce":
            return self.outcome is Outcome.NIL
        if self.kind == "set-nx-get":
            return self.outcome is Outcome.VALUE
        return False

    def observed(self) -> bytes | None:
        """The value this operation proves the register holds, if any."""
        if self.wrote():
            return self.value
        if self.outcome is Outcome.VALUE:
            return self.result
        return None

    def saw_nonempty(self) -> bool:
        """The register held some value when this operation took effect."""
        return self.observed() is not None or self.refused()

    def saw_empty(self) -> bool:
        """A read that answered nil: nothing was written when it took effect."""
        return self.kind == "get" and self.outcome is Outcome.NIL

    def not_written(self) -> bool:
        """A write whose own value is certainly not the register's value, by the reply contract."""
        if not self.is_write:
            return False
        if self.outcome is Outcome.NOQUORUM or (self.outcome is Outcome.CONNECTION_ERROR and not self.sent):
            return True
        return self.refused()

    def definitely_failed(self) -> bool:
        """NOQUORUM, or never sent: the request had no effect at all."""
        return self.outcome is Outcome.NOQUORUM or (self.outcome is Outcome.CONNECTION_ERROR and not self.sent)

    def indeterminate(self) -> bool:
        """A write that may or may not have taken effect."""
        return self.is_write and self.outcome in INDETERMINATE and not self.definitely_failed()

    def describe(self) -> str:
        end = "..." if self.complete is None else f"{self.complete:.3f}"
        what = f"{self.kind} {self.key!r}" + (f" {self.value!r}" if self.value is not None else "")
        got = self.outcome.value
        if self.outcome is Outcome.VALUE:
            got += f" {self.result!r}"
        elif self.error:
            got += f" ({self.error[:120]})"
        if self.outcome is Outcome.CONNECTION_ERROR and not self.sent:
            got += " [not sent]"
        return f"#{self.index} {self.client}@n{self.node} [{self.invoke:.3f}, {end}] {what} -> {got}"

    # serialisation: bytes as latin-1 text, which round-trips every byte value

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "client": self.client,
            "node": self.node,
            "kind": self.kind,
            "key": self.key.decode("latin-1"),
            "value": None if self.value is None else self.value.decode("latin-1"),
            "invoke": self.invoke,
            "complete": self.complete,
            "outcome": self.outcome.value,
            "result": None if self.result is None else self.result.decode("latin-1"),
            "error": self.error,
            "sent": self.sent,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Op:
        def b(x: object) -> bytes | None:
            return None if x is None else str(x).encode("latin-1")

        kind = str(d["kind"])
        if kind not in OP_KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        key = b(d["key"])
        assert key is not None
        complete = d.get("complete")
        index = d.get("index", -1)
        node = d["node"]
        invoke = d["invoke"]
        assert isinstance(index, int) and isinstance(node, int) and isinstance(invoke, (int, float))
        return cls(
            client=str(d["client"]),
            node=node,
            kind=kind,
            key=key,
            value=b(d.get("value")),
            invoke=float(invoke),
            complete=None if complete is None else float(complete),  # type: ignore[arg-type]
            outcome=Outcome(d["outcome"]),
            result=b(d.get("result")),
            error=str(d.get("error", "")),
            sent=bool(d.get("sent", True)),
            index=index,
        )


@dataclass
class History:
    """A thread-safe, append-only list of operations."""

    ops: list[Op] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def invoke(
        self, client: str, node: int, kind: OpKind, key: bytes, value: bytes | None, now: float
    ) -> Op:
        op = Op(client, node, kind, key, value, now)
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    @staticmethod
    def complete(
        op: Op,
        outcome: Outcome,
        now: float,
        result: bytes | None = None,
        error: str = "",
        sent: bool = True,
    ) -> None:
        # Fields are written before ``complete``: a concurrent reader that sees a completion
        # time also sees the outcome (the GIL orders these stores).
        op.outcome = outcome
        op.result = result
        op.error = error
        op.sent = sent
        op.complete = now

    def add(self, op: Op) -> Op:
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.snapshot())

    def dump(self, path: Path) -> None:
        with path.open("w") as f:
            for op in self.snapshot():
                f.write(json.dumps(op.to_json()) + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        h = cls()
        with path.open() as f:
            for line in f:
                if line.strip():
                    h.ops.append(Op.from_json(json.loads(line)))
        return h

    @classmethod
    def of(cls, ops: Iterable[Op]) -> History:
        h = cls()
        for op in ops:
            h.add(op)
        return h
