"""Node configuration: one frozen dataclass, parsed from command-line flags by ``respreg.cli``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A bad setting; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class PeerAddress:
    node_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ServerConfig:
    node_id: int
    port: int
    peer_port: int
    data_dir: Path
    peers: tuple[PeerAddress, ...]
    bind: str = "127.0.0.1"
    cluster_secret: str = ""
    #: A client request gets an answer (value or error) within this time.
    deadline_ms: float = 3000.0
    #: One Paxos phase waits this long for missing answers before retrying with a higher ballot.
    attempt_timeout_ms: float = 500.0
    #: A peer link with requests unanswered for this long is declared down and reconnected.
    peer_timeout_ms: float = 1000.0
    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 1024 * 1024
    #: Longest bulk string the client parser accepts; larger is a protocol error (as in Redis).
    proto_max_bulk_len: int = 8 * 1024 * 1024
    maxclients: int = 10000
    #: Commands of one connection that may wait on Paxos at once before its reading pauses.
    max_inflight_per_client: int = 1024
    #: Client writes a node runs at once; more wait to start, in arrival order, for at most half
    #: their deadline (docs/design.md, "Overload").
    max_writes_in_flight: int = 1024
    state_cache_keys: int = 50_000
    chosen_cache_keys: int = 2_000_000
    #: Bounds the memory of chosen values kept for local reads (entries counted with their
    #: overhead, see respreg.core.chosen.CHOSEN_ENTRY_OVERHEAD).
    chosen_cache_bytes: int = 200 * 1024 * 1024
    fsync_threads: int = 8
    #: How a batch of acceptor states is made durable: "fsync", "syncfs" or "auto"
    #: (respreg.storage.resolve_sync_mode; docs/design.md, "Group commit").
    sync_mode: str = "auto"
    #: Owners write their keys in one round trip at the reserved round 0 (docs/design.md).
    fast_writes: bool = True

    def peer(self, node_id: int) -> PeerAddress:
        for p in self.peers:
            if p.node_id == node_id:
                return p
        raise KeyError(node_id)

    def validate(self) -> None:
        ids = [p.node_id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError("--peers lists a node id twice")
        if self.node_id not in ids:
            raise ConfigError(f"--peers must list this node (id {self.node_id}) too")
        if len(ids) % 2 == 0:
            raise ConfigError(f"the cluster needs an odd number of nodes, --peers lists {len(ids)}")
        for name in ("port", "peer_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} {value} is not a TCP port")
        if self.max_value_bytes > self.proto_max_bulk_len or self.max_key_bytes > self.proto_max_bulk_len:
            raise ConfigError("--max-value-bytes and --max-key-bytes must not exceed --proto-max-bulk-len")
        from .storage import resolve_sync_mode

        try:
            resolve_sync_mode(self.sync_mode)
        except ValueError as exc:
            raise ConfigError(f"--sync {self.sync_mode}: {exc}") from None
        if self.max_writes_in_flight < 1:
            raise ConfigError("--max-writes-in-flight must be at least 1")
        if self.deadline_ms <= 0 or self.attempt_timeout_ms <= 0 or self.peer_timeout_ms <= 0:
            raise ConfigError("timeouts must be positive")


def parse_peers(text: str) -> tuple[PeerAddress, ...]:
    """Parse ``1=127.0.0.1:17000,2=127.0.0.1:17001,...``."""
    peers: list[PeerAddress] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        ident, sep, addr = item.partition("=")
        host, colon, port = addr.rpartition(":")
        if not sep or not colon or not host:
            raise ConfigError(f"bad --peers entry {item!r}: expected id=host:port")
        try:
            node_id = int(ident)
            port_no = int(port)
        except ValueError:
            raise ConfigError(f"bad --peers entry {item!r}: id and port must be numbers") from None
        if node_id < 1 or node_id > 65535:
            raise ConfigError(f"bad --peers entry {item!r}: node ids are 1..65535")
        if not 0 < port_no <= 65535:
            raise ConfigError(f"bad --peers entry {item!r}: {port_no} is not a TCP port")
        peers.append(PeerAddress(node_id, host.strip("[]"), port_no))
    if not peers:
        raise ConfigError("--peers is empty")
    return tuple(peers)
