"""The core's frozen dataclasses spell out their ``__init__`` (see respreg.core.types): each must
take exactly its fields, in order, with the same defaults, set every one of them, and stay
frozen, hashable and comparable as the generated one would."""

from __future__ import annotations

import dataclasses

import pytest

from respreg.core import node, proposer, types

MODULES = (types, node, proposer)
CLASSES = [
    cls
    for module in MODULES
    for cls in vars(module).values()
    if isinstance(cls, type)
    and cls.__module__ == module.__name__
    and dataclasses.is_dataclass(cls)
    and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    and cls is not node.NodeConfig  # built once per node: keeps the generated __init__ (a default factory)
]


def test_the_core_has_frozen_dataclasses() -> None:
    names = {cls.__name__ for cls in CLASSES}
    assert {"Proposal", "AcceptorState", "Accept", "Persist", "Send", "ProposerConfig"} <= names


def _sample(cls: type, name: str, seed: int) -> object:
    """A value for field ``name`` of ``cls`` of its type (compiled __init__s check types; compiled
    classes do not keep their annotations, so this goes by field name), different per seed."""
    ballot = types.Ballot(seed, seed + 1, seed + 2)
    proposal = types.Proposal(b"pid-%d" % seed, b"value-%d" % seed)
    number = 1000 + seed
    by_name: dict[str, object] = {
        "key": b"key-%d" % seed,
        "pid": b"pid-%d" % seed,
        "value": b"value-%d" % seed,
        "ballot": ballot,
        "accepted": ballot,
        "promised": ballot,
        "proposal": proposal,
        "state": types.AcceptorState(ballot, ballot, proposal),
        "chosen": seed % 2 == 1,
        "reason": f"reason-{seed}",
        "kind": list(proposer.Failure)[seed % 2] if cls is proposer.Failed else f"kind-{seed}",
        "to": types.NodeId(number),
        "msg": types.Read(b"key-%d" % seed),
        "reply": types.Accepted(ballot),
        "outcome": proposer.Chosen(proposal),
    }
    if name in by_name:
        return by_name[name]
    if name.endswith("_ms") and cls is not types.Propose:  # (whose deadline_ms is whole ms)
        return number + 0.5
    return number  # the counters and ids: notify, req_id, op_id, seq, version, token


def _distinct_values(cls: type) -> dict[str, object]:
    # A different value for each field: a field set from the wrong argument shows.
    return {f.name: _sample(cls, f.name, i) for i, f in enumerate(dataclasses.fields(cls))}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_takes_the_fields_and_sets_each(cls: type) -> None:
    # Compiled __init__s have no signature to inspect: what they do is checked instead.
    fields = dataclasses.fields(cls)
    values = _distinct_values(cls)
    by_position = cls(*values.values())
    by_name = cls(**values)
    for obj in (by_position, by_name):
        assert {f.name: getattr(obj, f.name) for f in fields} == values
    assert by_position == by_name
    assert hash(by_position) == hash(by_name)
    with pytest.raises(TypeError):
        cls(*values.values(), "one too many")
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(by_name, fields[0].name, None)
        last = fields[-1]
        assert by_name != cls(**dict(values, **{last.name: _sample(cls, last.name, len(fields))}))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_defaults_are_the_fields_defaults(cls: type) -> None:
    fields = dataclasses.fields(cls)
    assert all(f.default_factory is dataclasses.MISSING for f in fields), "needs the generated __init__"
    required = {
        f.name: v
        for f, v in zip(fields, _distinct_values(cls).values(), strict=True)
        if f.default is dataclasses.MISSING
    }
    obj = cls(**required)
    for f in fields:
        assert getattr(obj, f.name) == (required[f.name] if f.name in required else f.default), f.name
    for name in required:
        with pytest.raises(TypeError):
            cls(**{k: v for k, v in required.items() if k != name})


def test_defaults_apply() -> None:
    assert types.AcceptorState() == types.EMPTY_STATE
    assert types.AcceptorState().proposal is None
    assert types.Accept(b"k", types.NO_BALLOT, types.Proposal(b"p", b"v")).notify == 0
    # with_deadline keeps every other field (a field added later must be copied too).
    others = proposer.ProposerConfig(*(1000.5 + i for i in range(len(dataclasses.fields(proposer.ProposerConfig)))))
    for config in (proposer.ProposerConfig(), others):
        assert config.with_deadline(1234.0) == dataclasses.replace(config, deadline_ms=1234.0)
