"""What respreg tells clients about its commands: the COMMAND / COMMAND DOCS tables.

Pure data: one :class:`CommandSpec` per command, in the shape redis-server 7 reports, so that
redis-cli's hints and help and redis-py's COMMAND parsing work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resp import Simple, Value


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str = "string"  # "key", "string", "integer", "pure-token", "oneof", "block"
    optional: bool = False
    multiple: bool = False
    token: str | None = None


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    arity: int
    flags: tuple[str, ...]
    first_key: int
    last_key: int
    step: int
    acl: tuple[str, ...]
    group: str
    summary: str
    complexity: str = "O(1)"
    since: str = "1.0.0"
    args: tuple[Arg, ...] = ()

    @property
    def readonly(self) -> bool:
        return "readonly" in self.flags


_KEY = Arg("key", "key")
_VALUE = Arg("value")

SPECS: tuple[CommandSpec, ...] = (
    CommandSpec(
        "setonce",
        3,
        ("write", "denyoom"),
        1,
        1,
        1,
        ("@write", "@string"),
        "string",
        "Write the register at key once: OK if this call's value became its value, nil if it already held one.",
        args=(_KEY, _VALUE),
    ),
    CommandSpec(
        "get",
        2,
        ("readonly", "fast"),
        1,
        1,
        1,
        ("@read", "@string", "@fast"),
        "string",
        "Read the register at key (linearizable); nil until a value is written.",
        args=(_KEY,),
    ),
    CommandSpec(
        "mget",
        -2,
        ("readonly", "fast"),
        1,
        -1,
        1,
        ("@read", "@string", "@fast"),
        "string",
        "Read several registers.",
        "O(N)",
        args=(Arg("key", "key", multiple=True),),
    ),
    CommandSpec(
        "exists",
        -2,
        ("readonly", "fast"),
        1,
        -1,
        1,
        ("@keyspace", "@read", "@fast"),
        "generic",
        "Count how many of the keys hold a value.",
        "O(N)",
        args=(Arg("key", "key", multiple=True),),
    ),
    CommandSpec(
        "set",
        -3,
        ("write", "denyoom"),
        1,
        1,
        1,
        ("@write", "@string", "@slow"),
        "string",
        "Only SET key value NX [GET]: write the register once (as SETONCE).",
        args=(_KEY, _VALUE, Arg("nx", "pure-token", token="NX"), Arg("get", "pure-token", optional=True, token="GET")),
    ),
    CommandSpec(
        "setnx",
        3,
        ("write", "denyoom", "fast"),
        1,
        1,
        1,
        ("@write", "@string", "@fast"),
        "string",
        "Write the register once: 1 if this call wrote it, 0 if it already held a value.",
        args=(_KEY, _VALUE),
    ),
    CommandSpec(
        "ping",
        -1,
        ("fast", "stale"),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Ping the server.",
        args=(Arg("message", optional=True),),
    ),
    CommandSpec(
        "echo",
        2,
        ("fast",),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Return the given string.",
        args=(Arg("message"),),
    ),
    CommandSpec(
        "quit",
        -1,
        ("fast", "noscript", "loading", "stale"),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Close the connection.",
    ),
    CommandSpec(
        "select",
        2,
        ("loading", "stale", "fast"),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Select the logical database (only 0 exists).",
        args=(Arg("index", "integer"),),
    ),
    CommandSpec(
        "hello",
        -1,
        ("noscript", "loading", "stale", "fast", "no_auth"),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Handshake: choose RESP2 or RESP3.",
        args=(Arg("protover", "integer", optional=True),),
    ),
    CommandSpec(
        "client",
        -2,
        ("noscript", "loading", "stale"),
        0,
        0,
        0,
        ("@slow", "@connection"),
        "connection",
        "CLIENT ID | SETNAME | GETNAME | SETINFO | INFO | LIST | NO-EVICT | NO-TOUCH.",
        args=(Arg("subcommand"), Arg("arg", optional=True, multiple=True)),
    ),
    CommandSpec(
        "command",
        -1,
        ("loading", "stale"),
        0,
        0,
        0,
        ("@slow", "@connection"),
        "server",
        "COMMAND [COUNT | DOCS | INFO | LIST]: describe the commands.",
        args=(Arg("subcommand", optional=True), Arg("arg", optional=True, multiple=True)),
    ),
    CommandSpec(
        "info",
        -1,
        ("loading", "stale"),
        0,
        0,
        0,
        ("@slow", "@dangerous"),
        "server",
        "Server information and counters, including a paxos section.",
        args=(Arg("section", optional=True, multiple=True),),
    ),
    CommandSpec(
        "config",
        -2,
        ("loading", "stale"),
        0,
        0,
        0,
        ("@slow", "@admin", "@dangerous"),
        "server",
        "CONFIG GET parameter [parameter ...] (settings come from command-line flags).",
        args=(Arg("subcommand"), Arg("parameter", multiple=True)),
    ),
    CommandSpec(
        "reset",
        1,
        ("noscript", "loading", "stale", "fast", "no_auth"),
        0,
        0,
        0,
        ("@fast", "@connection"),
        "connection",
        "Reset the connection (RESP2, no name).",
    ),
    CommandSpec(
        "dbsize",
        1,
        ("readonly", "fast"),
        0,
        0,
        0,
        ("@keyspace", "@read", "@fast"),
        "server",
        "Not available: a register cluster does not count keys.",
    ),
)

BY_NAME: dict[bytes, CommandSpec] = {s.name.encode(): s for s in SPECS}


def command_info(spec: CommandSpec) -> list[Value]:
    """One entry of COMMAND / COMMAND INFO, as redis-server 7 shapes it."""
    return [
        spec.name,
        spec.arity,
        [Simple(f) for f in spec.flags],
        spec.first_key,
        spec.last_key,
        spec.step,
        [Simple(a) for a in spec.acl],
        [],
        [],
        [],
    ]


def _arg_doc(a: Arg) -> dict[str, Value]:
    doc: dict[str, Value] = {"name": a.name, "type": a.type}
    if a.type == "key":
        doc["key_spec_index"] = 0
    if a.token is not None:
        doc["token"] = a.token
    flags: list[Value] = []
    if a.optional:
        flags.append(Simple("optional"))
    if a.multiple:
        flags.append(Simple("multiple"))
    if flags:
        doc["flags"] = flags
    return doc


def command_docs(spec: CommandSpec) -> dict[str, Value]:
    """One entry of COMMAND DOCS."""
    doc: dict[str, Value] = {
        "summary": spec.summary,
        "since": spec.since,
        "group": spec.group,
        "complexity": spec.complexity,
    }
    if spec.args:
        doc["arguments"] = [_arg_doc(a) for a in spec.args]
    return doc


#: Commands that would change or remove a written value: answered with WRITE_ONCE_ERROR.
MUTATIONS: frozenset[bytes] = frozenset(
    name.encode()
    for name in (
        "del unlink expire pexpire expireat pexpireat persist getset getdel getex append setex psetex mset msetnx "
        "incr decr incrby decrby incrbyfloat setrange rename renamenx flushdb flushall move copy restore "
        "swapdb lpush rpush sadd hset hsetnx zadd xadd setbit bitfield pfadd"
    ).split()
)


def write_once_error(command: str) -> str:
    return (
        f"ERR registers are write-once: '{command}' would change or remove a value, which respreg never does; "
        "write with SETONCE key value (or SET key value NX)"
    )
