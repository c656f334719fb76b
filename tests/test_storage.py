"""Tests for respreg.storage: per-key files, group commit and node metadata (real files)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respreg import storage
from respreg.core.types import NO_BALLOT, AcceptorState, Ballot, Proposal
from respreg.storage import (
    JOINING,
    LAYOUT_MARKER,
    SPARE_DIR_NAME,
    VOTING,
    CorruptStateError,
    DataDirError,
    GroupCommitter,
    KeyFiles,
    NodeMeta,
    decode_state,
    encode_state,
    load_peer_identities,
    open_node,
    resolve_sync_mode,
    save_peer_identities,
    write_meta,
)

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
BALLOTS = st.builds(Ballot, I64, I64, I64)
PROPOSALS = st.none() | st.builds(Proposal, st.binary(max_size=64), st.binary(max_size=256))
STATES = st.builds(AcceptorState, BALLOTS, BALLOTS, PROPOSALS)

SAMPLE = AcceptorState(
    promised=Ballot(7, 2, 3),
    accepted=Ballot(5, 1, 1),
    proposal=Proposal(pid=b"p-1", value=b"hello"),
)


def _sync_modes() -> list[str]:
    try:
        resolve_sync_mode("syncfs")
    except ValueError:
        return ["fsync"]
    return ["fsync", "syncfs"]


@pytest.fixture(params=["fsync", "syncfs"])
def sync(request: pytest.FixtureRequest) -> str:
    """Each way of making a batch durable (KeyFiles(sync=...)); syncfs where the machine has it."""
    mode = str(request.param)
    if mode not in _sync_modes():
        pytest.skip("this machine cannot use syncfs mode (it needs Linux 5.8 or later)")
    return mode


@pytest.fixture(params=["c", "python"])
def fileio(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who makes a staged batch's file system calls: respreg._fileio, in one call from the
    committer's thread ("c"), or storage.py one by one ("python", as where it was not built)."""
    if request.param == "python":
        monkeypatch.setattr(storage, "_fileio", None)
    elif not storage.batched_io():
        pytest.skip("respreg._fileio is not built here (no C compiler when the package was installed)")
    return str(request.param)


@pytest.fixture
def files(tmp_path: Path, sync: str) -> Iterator[KeyFiles]:
    kf = KeyFiles(tmp_path / "keys", sync=sync)
    yield kf
    kf.close()


def state_for(i: int) -> AcceptorState:
    proposal = Proposal(pid=b"pid%d" % i, value=b"v" * (i % 17)) if i % 3 else None
    return AcceptorState(Ballot(i, i % 5, 1), Ballot(i - 1, i % 5, 1), proposal)


# ---- encoding --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(key=st.binary(max_size=100), state=STATES)
def test_encode_decode_round_trip(key: bytes, state: AcceptorState) -> None:
    data = encode_state(key, state)
    assert decode_state(data, key, "mem") == state


def test_encode_rejects_ballot_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_state(b"k", AcceptorState(promised=Ballot(2**63, 0, 0)))


def test_decode_bad_flag_is_corrupt() -> None:
    body = struct.pack(">I", 1) + b"k" + struct.pack(">qqqqqq", *NO_BALLOT, *NO_BALLOT) + b"\x02"
    data = struct.pack(">4sBII", b"RREG", 1, len(body), zlib.crc32(body)) + body
    with pytest.raises(CorruptStateError, match="flag"):
        decode_state(data, b"k", "mem")


def test_decode_body_overrun_is_corrupt() -> None:
    body = struct.pack(">I", 1000) + b"k"  # key length larger than the body
    data = struct.pack(">4sBII", b"RREG", 1, len(body), zlib.crc32(body)) + body
    with pytest.raises(CorruptStateError, match="body ends"):
        decode_state(data, b"k", "mem")


# ---- KeyFiles --------------------------------------------------------------------------------


def test_round_trip_binary_keys_and_big_values(files: KeyFiles) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    items: list[tuple[bytes, AcceptorState]] = [
        (b"", AcceptorState()),
        (b"\x00", SAMPLE),
        (b"a\nb", AcceptorState(promised=Ballot(1, 1, 1))),
        (b"../../etc/passwd", SAMPLE),
        (b"/", AcceptorState(Ballot(3, 0, 2), Ballot(3, 0, 2), Proposal(b"", b""))),
        (b"\xff" * 5000, SAMPLE),
        (b"big", AcceptorState(Ballot(9, 9, 9), Ballot(9, 9, 9), Proposal(b"id", big))),
    ]
    files.write_many(items)
    for key, state in items:
        assert files.load(key) == state
    reopened = KeyFiles(files.root)
    try:
        for key, state in items:
            assert reopened.load(key) == state
    finally:
        reopened.close()


@pytest.mark.parametrize("file_size", [65535, 65536, 65537, 3 * 65536])
def test_files_around_the_single_read_size_load_whole(files: KeyFiles, file_size: int) -> None:
    empty = len(encode_state(b"k", AcceptorState(Ballot(1, 1, 1), Ballot(1, 1, 1), Proposal(b"p", b""))))
    state = AcceptorState(Ballot(1, 1, 1), Ballot(1, 1, 1), Proposal(b"p", b"v" * (file_size - empty)))
    files.write_many([(b"k", state)])
    assert files.path_for(b"k").stat().st_size == file_size
    assert files.load(b"k") == state


def test_load_leaves_the_access_time_alone(files: KeyFiles) -> None:
    """A read must not dirty the key file's inode (a later sync would write it back)."""
    files.write_many([(b"k", SAMPLE)])
    path = files.path_for(b"k")
    st = os.stat(path)
    old_atime_ns = st.st_mtime_ns - 3600 * 10**9  # older than the data: relatime would update it
    os.utime(path, ns=(old_atime_ns, st.st_mtime_ns))
    assert files.load(b"k") == SAMPLE
    assert os.stat(path).st_atime_ns == old_atime_ns


def test_load_without_the_right_to_skip_access_times_still_reads(
    files: KeyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_NOATIME is refused (EPERM) on files of another user; the store then reads without it."""
    noatime = getattr(os, "O_NOATIME", 0)
    if not noatime:
        pytest.skip("this system has no O_NOATIME")
    files.write_many([(b"k", SAMPLE)])
    real_open = os.open
    refused: list[int] = []

    def open_as_another_user(path: str, flags: int, *args: int) -> int:
        if flags & noatime:
            refused.append(flags)
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_another_user)
    assert files.load(b"k") == SAMPLE
    assert files.load(b"k") == SAMPLE
    assert len(refused) == 1  # asked once, then never again


def test_load_missing_returns_none_and_creates_nothing(files: KeyFiles) -> None:
    assert files.load(b"never") is None
    spare_dir = files.root / SPARE_DIR_NAME
    kept = [p for p in files.root.rglob("*") if not p.is_dir() and p.name != LAYOUT_MARKER and p.parent != spare_dir]
    assert kept == []


def test_overwrite_and_duplicate_keys_last_wins(files: KeyFiles) -> None:
    files.write_many([(b"k", state_for(1))])
    files.write_many([(b"k", state_for(2)), (b"j", state_for(3)), (b"k", state_for(4))])
    assert files.load(b"k") == state_for(4)
    assert files.load(b"j") == state_for(3)


def test_fan_out_layout(files: KeyFiles) -> None:
    path = files.path_for(b"some key")
    rel = path.relative_to(files.root)
    assert len(rel.parts) == 2
    top, name = rel.parts
    assert len(name) == 32 and all(c in "0123456789abcdef" for c in name)
    assert top == name[0:2]
    # All 256 directories exist from the start: a write never creates one.
    expected = [f"{i:02x}" for i in range(256)] + [LAYOUT_MARKER]  # no spare files without spares=...
    assert sorted(p.name for p in files.root.iterdir()) == sorted(expected)
    files.write_many([(b"some key", SAMPLE)])
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [name]
    assert files.path_for(b"some key") == path  # stable


def test_old_two_level_layout_is_moved_up_before_anything_is_read(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    states = {b"old-%d" % i: state_for(i) for i in range(50)}
    for key, state in states.items():
        name = hashlib.blake2b(key, digest_size=16).hexdigest()
        leaf = root / name[0:2] / name[2:4]
        leaf.mkdir(parents=True, exist_ok=True)
        (leaf / name).write_bytes(encode_state(key, state))
        (leaf / f".{name}.0123.tmp").write_bytes(b"an unfinished write")
    kf = KeyFiles(root)
    try:
        assert (root / LAYOUT_MARKER).is_file()
        for key, state in states.items():
            assert kf.load(key) == state
        assert all(len(p.relative_to(root).parts) == 2 for p in root.rglob("*") if p.is_file() and p.parent != root)
        assert not any(p.name.endswith(".tmp") for p in root.rglob("*"))
        assert sorted(k for _, k, _ in kf.scan("", 1000)) == sorted(states)
    finally:
        kf.close()


def test_start_up_does_not_look_at_the_key_files_once_the_layout_is_marked(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    KeyFiles(root).close()
    # A stray second-level directory is not looked for again: opening a store with a million
    # keys costs what opening an empty one costs.
    (root / "ab" / "cd").mkdir()
    KeyFiles(root).close()
    assert (root / "ab" / "cd").is_dir()


def test_write_many_1000_then_fresh_reload(tmp_path: Path, sync: str) -> None:
    root = tmp_path / "keys"
    kf = KeyFiles(root, workers=8, sync=sync)
    items = [(b"key-%d" % i, state_for(i)) for i in range(1000)]
    try:
        kf.write_many(items)
        assert kf.syncfs_batches == (1 if sync == "syncfs" else 0)
    finally:
        kf.close()
    fresh = KeyFiles(root)
    try:
        for key, state in items:
            assert fresh.load(key) == state
    finally:
        fresh.close()
    assert not list(root.rglob("*.tmp"))
    key_files = [p for p in root.rglob("*") if p.is_file() and p.parent not in (root, root / SPARE_DIR_NAME)]
    assert len(key_files) == 1000


def _write_one(files: KeyFiles, key: bytes, state: AcceptorState) -> Path:
    files.write_many([(key, state)])
    return files.path_for(key)


def test_truncated_file_is_corrupt(files: KeyFiles) -> None:
    path = _write_one(files, b"k", SAMPLE)
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptStateError, match=str(path)):
            files.load(b"k")


def test_every_flipped_byte_is_corrupt(files: KeyFiles) -> None:
    path = _write_one(files, b"key", SAMPLE)
    data = path.read_bytes()
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[pos] ^= mask
            path.write_bytes(bytes(damaged))
            with pytest.raises(CorruptStateError):
                files.load(b"key")
    path.write_bytes(data)
    assert files.load(b"key") == SAMPLE


def test_trailing_garbage_is_corrupt(files: KeyFiles) -> None:
    path = _write_one(files, b"k", SAMPLE)
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(CorruptStateError, match="trailing"):
        files.load(b"k")


def test_wrong_key_inside_is_corrupt(files: KeyFiles) -> None:
    other = _write_one(files, b"other", SAMPLE)
    target = files.path_for(b"mine")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(other.read_bytes())
    with pytest.raises(CorruptStateError, match="key"):
        files.load(b"mine")


def test_empty_file_is_corrupt(files: KeyFiles) -> None:
    path = _write_one(files, b"k", SAMPLE)
    path.write_bytes(b"")
    with pytest.raises(CorruptStateError):
        files.load(b"k")


def test_leftover_temp_files_are_ignored(files: KeyFiles) -> None:
    path = _write_one(files, b"k", SAMPLE)
    stale = path.with_name(f".{path.name}.deadbeef.tmp")
    stale.write_bytes(encode_state(b"k", state_for(99)))
    garbage = path.with_name(f".{path.name}.cafe.tmp")
    garbage.write_bytes(b"half-written")
    assert files.load(b"k") == SAMPLE

    lonely = files.path_for(b"never written")
    lonely.parent.mkdir(parents=True, exist_ok=True)
    lonely.with_name(f".{lonely.name}.0123.tmp").write_bytes(encode_state(b"never written", SAMPLE))
    assert files.load(b"never written") is None

    files.write_many([(b"k", state_for(5))])  # writing past leftovers still works
    assert files.load(b"k") == state_for(5)


def _block_path_with_directory(files: KeyFiles, key: bytes) -> Path:
    """Make ``key``'s file path a non-empty directory so the rename onto it fails (even as root)."""
    path = files.path_for(key)
    (path / "occupied").mkdir(parents=True)
    return path


def test_write_many_failure_raises_and_cleans_temp_files(files: KeyFiles) -> None:
    _block_path_with_directory(files, b"bad")
    items = [(b"good-%d" % i, state_for(i)) for i in range(20)] + [(b"bad", SAMPLE)]
    with pytest.raises(OSError):
        files.write_many(items)
    assert not list(files.root.rglob("*.tmp"))
    with pytest.raises(OSError):
        files.write_many([(b"bad", SAMPLE)])  # single-item (inline) path too
    assert not list(files.root.rglob("*.tmp"))


# ---- GroupCommitter --------------------------------------------------------------------------


class GatedKeyFiles(KeyFiles):
    """Real KeyFiles that records each batch and can hold a batch until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.batches: list[list[tuple[bytes, AcceptorState]]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def write_many(self, items: Sequence[tuple[bytes, AcceptorState]]) -> None:
        self.batches.append(list(items))
        self.started.set()
        self.gate.wait()
        super().write_many(items)


Outcome = list[BaseException | None]


def test_group_commit_coalesces_same_key(tmp_path: Path) -> None:
    kf = GatedKeyFiles(tmp_path / "keys")

    async def main() -> None:
        gc = GroupCommitter(kf, asyncio.get_running_loop())
        outcomes: Outcome = []
        gc.submit(b"k", state_for(1), outcomes.append)
        gc.submit(b"k", state_for(2), outcomes.append)
        assert gc.pending() == 1
        await gc.close()
        assert outcomes == [None, None]
        assert gc.batches == 1 and gc.writes == 1 and gc.fsync_errors == 0
        assert gc.coalesced == 1
        assert gc.pending() == 0

    try:
        asyncio.run(main())
        assert kf.batches == [[(b"k", state_for(2))]]
        assert kf.load(b"k") == state_for(2)
    finally:
        kf.close()


def test_group_commit_second_batch_for_submits_during_a_batch(tmp_path: Path) -> None:
    kf = GatedKeyFiles(tmp_path / "keys")
    kf.gate.clear()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gc = GroupCommitter(kf, loop)
        outcomes: dict[str, BaseException | None] = {}

        def cb(name: str) -> Callable[[BaseException | None], None]:
            return lambda err: outcomes.__setitem__(name, err)

        gc.submit(b"a", state_for(1), cb("a1"))
        await loop.run_in_executor(None, kf.started.wait)  # batch 1 is inside write_many
        gc.submit(b"a", state_for(2), cb("a2"))  # must not join the running batch
        gc.submit(b"b", state_for(3), cb("b"))
        assert gc.pending() == 3
        kf.gate.set()
        await gc.close()
        assert outcomes == {"a1": None, "a2": None, "b": None}
        assert gc.batches == 2 and gc.writes == 3

    try:
        asyncio.run(main())
        assert kf.batches == [
            [(b"a", state_for(1))],
            [(b"a", state_for(2)), (b"b", state_for(3))],
        ]
        assert kf.load(b"a") == state_for(2)
        assert kf.load(b"b") == state_for(3)
    finally:
        kf.close()


def test_group_commit_respects_max_batch(tmp_path: Path) -> None:
    kf = GatedKeyFiles(tmp_path / "keys")

    async def main() -> None:
        gc = GroupCommitter(kf, asyncio.get_running_loop(), max_batch=2)
        outcomes: Outcome = []
        for i in range(5):
            gc.submit(b"k%d" % i, state_for(i), outcomes.append)
        await gc.close()
        assert outcomes == [None] * 5
        assert gc.batches == 3 and gc.writes == 5

    try:
        asyncio.run(main())
        assert [len(b) for b in kf.batches] == [2, 2, 1]
    finally:
        kf.close()


def test_group_commit_passes_oserror_to_every_callback(tmp_path: Path) -> None:
    kf = KeyFiles(tmp_path / "keys")
    _block_path_with_directory(kf, b"bad")

    async def main() -> None:
        gc = GroupCommitter(kf, asyncio.get_running_loop())
        outcomes: Outcome = []
        gc.submit(b"ok", SAMPLE, outcomes.append)
        gc.submit(b"bad", SAMPLE, outcomes.append)
        gc.submit(b"bad", state_for(2), outcomes.append)
        await gc.close()
        assert len(outcomes) == 3
        assert all(isinstance(err, OSError) for err in outcomes)
        assert gc.fsync_errors == 1 and gc.writes == 0 and gc.batches == 1

    async def recovers() -> None:
        gc = GroupCommitter(kf, asyncio.get_running_loop())
        outcomes: Outcome = []
        gc.submit(b"ok", state_for(7), outcomes.append)
        await gc.close()
        assert outcomes == [None]
        with pytest.raises(RuntimeError):
            gc.submit(b"ok", state_for(8), outcomes.append)

    try:
        asyncio.run(main())
        assert not list(kf.root.rglob("*.tmp"))
        asyncio.run(recovers())
        assert kf.load(b"ok") == state_for(7)
    finally:
        kf.close()


def test_group_commit_failing_callback_does_not_block_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kf = KeyFiles(tmp_path / "keys")

    def boom(err: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    async def main() -> None:
        gc = GroupCommitter(kf, asyncio.get_running_loop())
        outcomes: Outcome = []
        gc.submit(b"k", SAMPLE, boom)
        gc.submit(b"k", SAMPLE, outcomes.append)
        await gc.close()
        assert outcomes == [None]

    try:
        with caplog.at_level(logging.ERROR, logger="respreg.storage"):
            asyncio.run(main())
        assert "callback failed" in caplog.text
    finally:
        kf.close()


def _needs_syncfs() -> None:
    if "syncfs" not in _sync_modes():
        pytest.skip("this machine cannot use syncfs mode (it needs Linux 5.8 or later)")


def _commit_all(files: KeyFiles, items: Sequence[tuple[bytes, AcceptorState]]) -> Outcome:
    """Submit every item to a new GroupCommitter on a new loop; return each callback's outcome."""
    outcomes: Outcome = []

    async def main() -> None:
        gc = GroupCommitter(files, asyncio.get_running_loop())
        for key, state in items:
            gc.submit(key, state, outcomes.append)
        await gc.close()

    asyncio.run(main())
    assert len(outcomes) == len(items)
    return outcomes


def test_group_commit_in_syncfs_mode_writes_on_the_loop_and_only_syncs_in_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large batch in syncfs mode: the files are written and renamed by the loop's thread; the
    commit thread makes only the two syncs (a thread making hundreds of system calls per batch
    would wait for the interpreter lock after each of them behind a busy loop)."""
    _needs_syncfs()
    real_syncfs, real_replace, real_write = storage._syncfs, os.replace, os.write
    assert real_syncfs is not None
    threads: dict[str, set[str]] = {"syncfs": set(), "replace": set(), "write": set()}

    def record(what: str) -> None:
        threads[what].add(threading.current_thread().name)

    def syncfs(fd: int) -> None:
        record("syncfs")
        real_syncfs(fd)

    def replace(src: str, dst: str) -> None:
        record("replace")
        real_replace(src, dst)

    def write(fd: int, data: bytes) -> int:
        record("write")
        return real_write(fd, data)

    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=8)
    items = [(b"staged-%d" % i, state_for(i)) for i in range(40)]
    try:
        monkeypatch.setattr(storage, "_syncfs", syncfs)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "write", write)
        assert _commit_all(files, items) == [None] * len(items)
        monkeypatch.undo()
        loop_thread = threading.current_thread().name
        assert threads["write"] == {loop_thread} and threads["replace"] == {loop_thread}, threads
        assert len(threads["syncfs"]) == 1 and next(iter(threads["syncfs"])).startswith("respreg-commit"), threads
        assert files.syncfs_batches == 1
    finally:
        monkeypatch.undo()
        files.close()
    reopened = KeyFiles(files.root)
    try:
        assert all(reopened.load(key) == state for key, state in items)
        assert not list(reopened.root.rglob("*.tmp"))
    finally:
        reopened.close()


@pytest.mark.parametrize("failing", ["data", "names"])
def test_group_commit_in_syncfs_mode_reports_a_failed_sync_to_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A failed first sync (the data) is a plain OSError and changes no visible file; a failed
    second sync (the renames) is a DurabilityError. Either way every write of the batch hears it,
    no temp file is left, and the next batch is written normally."""
    _needs_syncfs()
    real_syncfs = storage._syncfs
    assert real_syncfs is not None
    calls: list[int] = []

    def syncfs(fd: int) -> None:
        calls.append(fd)
        if len(calls) == (1 if failing == "data" else 2):
            raise OSError(errno.EIO, "syncfs: Input/output error")
        real_syncfs(fd)

    files = KeyFiles(tmp_path / "keys", sync="syncfs")
    items = [(b"doomed-%d" % i, state_for(i)) for i in range(6)]
    try:
        monkeypatch.setattr(storage, "_syncfs", syncfs)
        outcomes = _commit_all(files, items)
        monkeypatch.undo()
        assert all(isinstance(err, OSError) for err in outcomes), outcomes
        durability = [isinstance(err, storage.DurabilityError) for err in outcomes]
        assert durability == [failing == "names"] * len(items)
        visible = [files.load(key) for key, _ in items]
        assert visible == ([None] * len(items) if failing == "data" else [state for _, state in items])
        assert not list(files.root.rglob("*.tmp"))
        later = [(b"later-%d" % i, state_for(i)) for i in range(5)]
        assert _commit_all(files, later) == [None] * len(later)
        assert all(files.load(key) == state for key, state in later)
    finally:
        monkeypatch.undo()
        files.close()


@pytest.mark.parametrize("spares", ["no-spares", "unnamed"])
@pytest.mark.parametrize("blocked_first", [True, False])
def test_group_commit_in_syncfs_mode_reports_a_failed_rename(
    tmp_path: Path, blocked_first: bool, spares: str, fileio: str
) -> None:
    """A rename (or, for an unnamed spare, a link) that fails before any other of its batch is a
    plain OSError (nothing visible changed); after one, a DurabilityError. The files not renamed
    are removed, and unnamed spares go back to the stock."""
    _needs_syncfs()
    if spares == "unnamed":
        files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=16, **SPARE_KINDS["unnamed"])
        _needs_unnamed(files)
        _wait_spares(files, 16)
    else:
        files = KeyFiles(tmp_path / "keys", sync="syncfs")
    _block_path_with_directory(files, b"blocked")
    fds_before = _open_fds()
    good = [(b"fine-%d" % i, state_for(i)) for i in range(5)]
    items = [(b"blocked", SAMPLE), *good] if blocked_first else [*good, (b"blocked", SAMPLE)]
    try:
        outcomes = _commit_all(files, items)
        assert all(isinstance(err, OSError) for err in outcomes), outcomes
        assert all(isinstance(err, storage.DurabilityError) != blocked_first for err in outcomes), outcomes
        assert [files.load(key) for key, _ in good] == ([None] * 5 if blocked_first else [s for _, s in good])
        assert not list(files.root.rglob("*.tmp"))
        if spares == "unnamed":
            # The six taken are closed; ten are left (over half the stock: no refill yet).
            assert files.spares_ready() == 10
            assert _open_fds() == fds_before - 6
            # A sixteenth of the stock is named (for small batches), untouched by this one.
            assert len(list((files.root / SPARE_DIR_NAME).iterdir())) == 1
    finally:
        files.close()


@pytest.mark.parametrize("linker", ["descriptor", "proc-path"])
def test_an_unnamed_spare_replaces_an_existing_key_file(
    tmp_path: Path, linker: str, monkeypatch: pytest.MonkeyPatch, fileio: str
) -> None:
    """A key that has a file already: the unnamed spare gets a temp name beside it and is
    renamed over it, in staged batches and in the small ones that fsync each file (once the
    named spares are used up), with either way of naming an unnamed file (the one the kernel
    allows is probed for)."""
    _needs_syncfs()
    if len(storage._LINKERS) == 2:
        monkeypatch.setattr(
            storage, "_LINKERS", storage._LINKERS[:1] if linker == "descriptor" else storage._LINKERS[1:]
        )
    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=32, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    try:
        keys = [b"again:%d" % i for i in range(6)]
        for round_ in range(3):
            items = [(key, state_for(10 * round_ + i)) for i, key in enumerate(keys)]
            files.write_many(items)
            files.write_many(items[:1])  # a batch of one: fsync in both modes
            assert [files.load(key) for key in keys] == [state for _, state in items]
            assert all(os.stat(files.path_for(key)).st_nlink == 1 for key in keys)
            assert not list(files.root.rglob("*.tmp"))
    finally:
        files.close()
    reopened = KeyFiles(files.root)
    try:
        assert [reopened.load(key) for key in keys] == [state for _, state in items]
    finally:
        reopened.close()


def test_a_small_batch_with_no_named_spare_left_names_an_unnamed_one_beside_its_key(tmp_path: Path) -> None:
    """Batches of fewer than four states fsync each file: they take named spares, and once none
    is left an unnamed one, which gets a temp name beside its key before its fsync and rename."""
    _needs_syncfs()
    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=16, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    try:
        _wait_spares(files, 16)  # fifteen unnamed, one named
        assert files._spares is not None
        taken = files._spares.take()  # the named one (neither stock is low after it: no refill)
        assert taken is not None and taken[0].endswith(".spare")
        os.close(taken[1])
        fds_before = _open_fds()
        files.write_many([(b"small", SAMPLE)])
        assert files.load(b"small") == SAMPLE
        assert os.stat(files.path_for(b"small")).st_nlink == 1
        assert not list(files.root.rglob("*.tmp"))
        assert files.spares_ready() == 14 and _open_fds() == fds_before - 1
    finally:
        files.close()


def _stage_beyond_the_stock(files: KeyFiles, items: list[tuple[bytes, AcceptorState]]) -> None:
    batch = files.stage(items)
    try:
        # Eight kept: seven unnamed and one named (a sixteenth, at least one).
        unnamed = [fd for _, tmp, fd in batch.files if not tmp]
        assert len(unnamed) == 7 and all(fd >= 0 for fd in unnamed)
        # The rest: named spares (the thread makes more of them meanwhile), then temp files.
        named = [tmp for _, tmp, _ in batch.files if tmp.endswith(".spare")]
        assert len(named) >= 1 and len(named) + len([t for _, t, _ in batch.files if t.endswith(".tmp")]) == 13
        batch.sync_data()
        batch.publish()
        batch.sync_names()
    finally:
        batch.close()


def _direct_beyond_the_stock(files: KeyFiles, items: list[tuple[bytes, AcceptorState]]) -> None:
    direct = files.stage_direct(items)
    assert direct is not None
    try:
        # The seven unnamed spares taken (the named one is kept for small batches); nothing
        # written or named yet: the thread's one call does that, and makes the other thirteen.
        assert direct.borrowed == 7 and direct.fds.count(-1) == 13
        assert all(files.load(key) is None for key, _ in items)
        assert len(list((files.root / SPARE_DIR_NAME).iterdir())) == 1
        direct.commit()
    finally:
        direct.close()
    assert direct.borrowed == 0 and files._spares is not None and files._spares._out == 0


def test_a_batch_larger_than_the_stock_of_unnamed_spares(tmp_path: Path, fileio: str) -> None:
    """A staged batch takes the unnamed spares ready. Written from the loop ("python"), its other
    states go to named spares and temp files; with respreg._fileio ("c"), the loop only takes
    the spares, and the committer's thread makes unnamed files for the rest, writes, syncs and
    names them all in one call, which closes every descriptor. Either way the spares go back."""
    _needs_syncfs()
    before = _open_fds()
    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=8, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    try:
        _wait_spares(files, 8)
        items = [(b"many:%d" % i, state_for(i)) for i in range(20)]
        if fileio == "c":
            _direct_beyond_the_stock(files, items)
        else:
            assert files.stage_direct(items) is None
            _stage_beyond_the_stock(files, items)
        assert [files.load(key) for key, _ in items] == [state for _, state in items]
        assert all(os.stat(files.path_for(key)).st_nlink == 1 for key, _ in items)
        assert not list(files.root.rglob("*.tmp"))
        _wait_spares(files, 8)
        assert _open_fds() == before + 8  # the batch's descriptors are closed; the stock is held
    finally:
        files.close()
    assert _open_fds() == before


def test_a_direct_batch_makes_its_missing_files_a_bounded_number_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files no spare was ready for are made in calls of at most UNNAMED_PER_BATCH_CALL
    (respreg._fileio refuses larger counts): any batch size works."""
    _needs_syncfs()
    if not storage.batched_io():
        pytest.skip("respreg._fileio is not built here (no C compiler when the package was installed)")
    monkeypatch.setattr(storage, "UNNAMED_PER_BATCH_CALL", 3)
    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=8, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    try:
        _wait_spares(files, 8)
        items = [(b"bounded:%d" % i, state_for(i)) for i in range(20)]
        _direct_beyond_the_stock(files, items)  # thirteen made, in five calls
        assert [files.load(key) for key, _ in items] == [state for _, state in items]
    finally:
        files.close()


def test_a_direct_batch_that_fails_before_any_name_leaves_no_file_and_no_descriptor(tmp_path: Path) -> None:
    """respreg._fileio's errors: a key whose path cannot be linked (a directory there) first in
    its batch is a plain OSError, nothing of the batch is visible, and close releases every
    descriptor, including those commit made itself."""
    _needs_syncfs()
    if not storage.batched_io():
        pytest.skip("respreg._fileio is not built here (no C compiler when the package was installed)")
    files = KeyFiles(tmp_path / "keys", sync="syncfs", spares=4, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    _block_path_with_directory(files, b"blocked")
    try:
        _wait_spares(files, 4)
        fds_before = _open_fds()
        items = [(b"blocked", SAMPLE), *[(b"after:%d" % i, state_for(i)) for i in range(6)]]
        direct = files.stage_direct(items)
        assert direct is not None and direct.borrowed == 3
        with pytest.raises(OSError) as raised:
            try:
                direct.commit()
            finally:
                direct.close()
        assert not isinstance(raised.value, storage.DurabilityError)
        assert raised.value.errno in (errno.EEXIST, errno.EISDIR, errno.EPERM), raised.value
        assert all(files.load(key) is None for key, _ in items[1:])
        assert not list(files.root.rglob("*.tmp"))
        _wait_spares(files, 4)  # the three spares taken are closed and made again
        assert _open_fds() == fds_before  # and none of the four made by commit is left open
    finally:
        files.close()


_CRASH_MID_BATCH = """
import os, sys, time
from respreg.core.types import AcceptorState, Ballot, Proposal
from respreg.storage import KeyFiles
files = KeyFiles(sys.argv[1], sync=sys.argv[2], spares=16, hold_spares_open=True)
for _ in range(500):
    if files.spares_ready() >= 16:
        break
    time.sleep(0.01)
state = AcceptorState(Ballot(1, 1, 1), Ballot(1, 1, 1), Proposal(b"p", b"v"))
batch = files.stage([(b"lost:%d" % i, state) for i in range(6)])
batch.sync_data()  # the data is durable, and no file has a name yet
print(files.spare_kind(), flush=True)
os._exit(0)  # no close, no publish: a crash
"""


def test_a_crash_before_unnamed_spares_are_named_leaves_nothing_behind(tmp_path: Path) -> None:
    _needs_syncfs()
    root = tmp_path / "keys"
    run = subprocess.run(
        [sys.executable, "-c", _CRASH_MID_BATCH, str(root), "syncfs"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    if run.stdout.strip() != "unnamed":
        pytest.skip("this kernel or file system offers no O_TMPFILE file that linkat can name")
    left = [p for p in root.rglob("*") if p.is_file() and p.name != storage.LAYOUT_MARKER]
    # No key file, no temp file: the kernel freed the unnamed files; only the one named spare
    # (a sixteenth of the stock) is left, for the next process.
    assert [p.parent.name for p in left] == [SPARE_DIR_NAME]
    files = KeyFiles(root)
    try:
        assert [files.load(b"lost:%d" % i) for i in range(6)] == [None] * 6
    finally:
        files.close()


# ---- node metadata ---------------------------------------------------------------------------


def test_open_node_creates_and_increments_incarnation(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    identities = set()
    first = 0
    for step in (0, 1, 2):
        info = open_node(data_dir, 4)
        identities.add(info.identity)
        first = first or info.incarnation
        try:
            assert info.status == JOINING  # a new directory does not vote until confirmed
            assert info.incarnation == first + step
            assert info.node_id == 4
            assert info.data_dir == data_dir
            assert info.keys_dir == data_dir / "keys"
        finally:
            info.close()
    meta = NodeMeta.decode((data_dir / "node.meta").read_bytes())
    assert len(identities) == 1 and len(meta.identity) == 16
    assert meta == NodeMeta(node_id=4, incarnation=first + 2, identity=meta.identity, status=JOINING)


def test_a_new_directory_never_restarts_the_incarnation_count(tmp_path: Path) -> None:
    """A wiped node id must not repeat the ballots (round, node, incarnation) of its old life."""
    seen = set()
    for i in range(20):
        info = open_node(tmp_path / f"d{i}", 1)
        seen.add(info.incarnation)
        assert 1 <= info.incarnation < 2**62
        info.close()
    assert len(seen) == 20


def test_node_status_and_peer_identities_persist(tmp_path: Path) -> None:
    info = open_node(tmp_path, 2)
    write_meta(tmp_path, NodeMeta(2, info.incarnation, info.identity, VOTING))
    info.close()
    again = open_node(tmp_path, 2)
    assert (again.status, again.identity, again.incarnation) == (VOTING, info.identity, info.incarnation + 1)
    again.close()
    assert load_peer_identities(tmp_path) == {}
    save_peer_identities(tmp_path, {1: b"a" * 16, 3: b"b" * 16})
    assert load_peer_identities(tmp_path) == {1: b"a" * 16, 3: b"b" * 16}
    path = tmp_path / "peers.meta"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataDirError, match="corrupt"):
        load_peer_identities(tmp_path)


def test_version_1_node_meta_is_read_and_keeps_voting(tmp_path: Path) -> None:
    head = struct.pack(">4sBqq", b"RNOD", 1, 5, 7)
    (tmp_path / "node.meta").write_bytes(head + struct.pack(">I", zlib.crc32(head)))
    info = open_node(tmp_path, 5)
    assert (info.incarnation, info.status, len(info.identity)) == (8, VOTING, 16)
    info.close()


def test_open_node_refuses_other_node_id(tmp_path: Path) -> None:
    first = open_node(tmp_path, 1)
    first.close()
    with pytest.raises(DataDirError, match="belongs to node 1"):
        open_node(tmp_path, 2)
    with open_node(tmp_path, 1) as info:  # the refused open released the lock
        assert info.incarnation == first.incarnation + 1


def test_open_node_refuses_concurrent_open(tmp_path: Path) -> None:
    info = open_node(tmp_path, 1)
    try:
        with pytest.raises(DataDirError, match="in use by another process"):
            open_node(tmp_path, 1)
    finally:
        info.close()
    with open_node(tmp_path, 1) as again:
        assert again.incarnation == info.incarnation + 1  # the refused open did not bump it


def test_open_node_refuses_corrupt_meta(tmp_path: Path) -> None:
    first = open_node(tmp_path, 1)
    first.close()
    meta_path = tmp_path / "node.meta"
    good = meta_path.read_bytes()
    damaged = [b"", good[:-1], good + b"x", b"junk" * 10]
    for pos in range(len(good)):
        flipped = bytearray(good)
        flipped[pos] ^= 0x40
        damaged.append(bytes(flipped))
    for data in damaged:
        meta_path.write_bytes(data)
        with pytest.raises(DataDirError, match="corrupt") as info:
            open_node(tmp_path, 1)
        assert "\n" not in str(info.value)
        assert meta_path.read_bytes() == data  # never silently reset
    meta_path.write_bytes(good)
    with open_node(tmp_path, 1) as node:
        assert node.incarnation == first.incarnation + 1


def test_open_node_refuses_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(DataDirError, match="not a directory"):
        open_node(path, 1)
    with pytest.raises(DataDirError):
        open_node(path / "below", 1)


def test_lock_file_is_kept_and_meta_has_no_temp_leftovers(tmp_path: Path) -> None:
    with open_node(tmp_path, 3) as info:
        assert info.lock.held
        assert (tmp_path / "LOCK").exists()
    assert not info.lock.held
    assert sorted(os.listdir(tmp_path)) == ["LOCK", "node.meta"]


def test_scan_pages_every_state_in_file_name_order(tmp_path: Path) -> None:
    files = KeyFiles(tmp_path / "keys", workers=2)
    try:
        states = {b"k%d" % i: AcceptorState(Ballot(i, 1, 1), NO_BALLOT, None) for i in range(300)}
        files.write_many(list(states.items()))
        seen: list[str] = []
        got: dict[bytes, AcceptorState] = {}
        cursor = ""
        for _ in range(100):
            page = files.scan(cursor, 64)
            if not page:
                break
            seen += [name for name, _, _ in page]
            got.update({key: state for _, key, state in page})
            cursor = page[-1][0]
        assert got == states
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == 300
        path = files.path_for(b"k7")
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(CorruptStateError):
            files.scan("", 1000)  # a dump never skips a state it cannot read
    finally:
        files.close()


def _wait_spares(files: KeyFiles, at_least: int) -> None:
    for _ in range(500):  # a bound against hangs only
        if files.spares_ready() >= at_least:
            return
        time.sleep(0.01)
    raise AssertionError(f"only {files.spares_ready()} spare files became ready")


def _needs_unnamed(files: KeyFiles) -> None:
    if files.spare_kind() != "unnamed":
        files.close()
        pytest.skip("this kernel or file system offers no O_TMPFILE file that linkat can name")


class SpareArgs(TypedDict, total=False):
    hold_spares_open: bool
    unnamed_spares: bool


#: KeyFiles arguments of each kind of spare file.
SPARE_KINDS: dict[str, SpareArgs] = {
    "names": {"hold_spares_open": False},
    "held-open": {"hold_spares_open": True, "unnamed_spares": False},
    "unnamed": {"hold_spares_open": True, "unnamed_spares": True},
}


@pytest.mark.parametrize("kind", list(SPARE_KINDS))
def test_writes_take_spare_files_and_store_the_same_states(tmp_path: Path, sync: str, kind: str, fileio: str) -> None:
    # 32 kept: taking 10 leaves more than half, so no refill runs during the batch (a refill
    # could hand out a spare created after the listing below).
    files = KeyFiles(tmp_path / "keys", spares=32, sync=sync, **SPARE_KINDS[kind])
    if kind == "unnamed" and sync == "syncfs":
        _needs_unnamed(files)
    else:
        # Unnamed spares serve only batches synced with syncfs: in fsync mode they are held.
        assert files.spare_kind() == ("named" if kind == "names" else "held")
    try:
        _wait_spares(files, 32)
        spare_dir = files.root / SPARE_DIR_NAME
        before = {p.name for p in spare_dir.iterdir()}
        fds_before = _open_fds()
        items = [(b"spare:%d" % i, SAMPLE) for i in range(10)]
        files.write_many(items)
        if kind == "unnamed" and sync == "syncfs":
            # A staged batch: ten of the held unnamed descriptors were written, linked onto
            # their keys and closed; the two named spares (a sixteenth of the stock) are left.
            assert len(before) == 2 and before == {p.name for p in spare_dir.iterdir()}
            assert files.spares_ready() == 22
            assert _open_fds() == fds_before - 10
        else:
            used = before - {p.name for p in spare_dir.iterdir()}
            assert len(used) == 10, "each write took a spare instead of creating a temp file"
        for key, state in items:
            assert files.load(key) == state
            assert os.stat(files.path_for(key)).st_nlink == 1
        assert not list(files.root.rglob("*.tmp"))
    finally:
        files.close()
    reopened = KeyFiles(files.root)
    try:
        assert all(reopened.load(key) == state for key, state in items)
    finally:
        reopened.close()


def test_only_a_store_opened_with_spares_touches_the_spare_files(tmp_path: Path) -> None:
    """A tool or test that opens a running node's store must not take the node's spare files:
    two writers in one spare would write into one file."""
    root = tmp_path / "keys"
    owner = KeyFiles(root, spares=8)
    try:
        _wait_spares(owner, 8)
        spare_dir = root / SPARE_DIR_NAME
        before = sorted(p.name for p in spare_dir.iterdir())
        other = KeyFiles(root)
        try:
            other.write_many([(b"from-a-tool", SAMPLE)])
            assert other.spares_ready() == 0
        finally:
            other.close()
        assert sorted(p.name for p in spare_dir.iterdir()) == before
        assert owner.load(b"from-a-tool") == SAMPLE
    finally:
        owner.close()


@pytest.mark.parametrize("kind", list(SPARE_KINDS))
def test_spares_left_by_an_earlier_process_are_reused_not_piled_up(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "keys"
    args = SPARE_KINDS[kind]
    if kind == "unnamed":
        _needs_syncfs()
    sync = "syncfs" if kind == "unnamed" else "fsync"
    for _ in range(4):
        again = KeyFiles(root, spares=16, sync=sync, **args)
        if kind == "unnamed":
            _needs_unnamed(again)
        _wait_spares(again, 16)
        again.close()
    # Named spares are left behind, to be reused; unnamed ones vanish with their process (of
    # those sixteen, one is named: a sixteenth of the stock).
    assert len(list((root / SPARE_DIR_NAME).iterdir())) == (1 if kind == "unnamed" else 16)
    # The ones left behind are handed out by name, and written through like any other.
    last = KeyFiles(root, spares=16, sync=sync, **args)
    try:
        items = [(b"reused:%d" % i, state_for(i)) for i in range(4)]
        last.write_many(items)
        assert all(last.load(key) == state for key, state in items)
    finally:
        last.close()
    assert len(list((root / SPARE_DIR_NAME).iterdir())) <= (1 if kind == "unnamed" else 16)


def test_named_spares_left_behind_are_used_up_by_a_store_with_unnamed_spares(tmp_path: Path) -> None:
    _needs_syncfs()
    root = tmp_path / "keys"
    earlier = KeyFiles(root, spares=16, **SPARE_KINDS["held-open"])
    _wait_spares(earlier, 16)
    earlier.close()
    files = KeyFiles(root, sync="syncfs", spares=16, **SPARE_KINDS["unnamed"])
    _needs_unnamed(files)
    try:
        _wait_spares(files, 31)  # the sixteen names left, and fifteen unnamed spares
        items = [(b"after:%d" % i, state_for(i)) for i in range(4)]
        for item in items:
            files.write_many([item])  # small batches take named spares first
        assert len(list((root / SPARE_DIR_NAME).iterdir())) == 12
        assert [files.load(key) for key, _ in items] == [state for _, state in items]
        assert all(os.stat(files.path_for(key)).st_nlink == 1 for key, _ in items)
    finally:
        files.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count descriptors")
def test_spares_held_open_are_closed_with_the_store(tmp_path: Path) -> None:
    before = _open_fds()
    files = KeyFiles(tmp_path / "keys", spares=16, hold_spares_open=True)
    try:
        _wait_spares(files, 16)
        assert _open_fds() >= before + 16, "each spare made by this store is held open"
        files.write_many([(b"held:%d" % i, state_for(i)) for i in range(5)])
        assert all(files.load(b"held:%d" % i) == state_for(i) for i in range(5))
    finally:
        files.close()
    assert _open_fds() == before


def test_a_spare_name_that_is_a_second_link_to_a_key_file_is_never_written_through(tmp_path: Path) -> None:
    """What a crash could leave on a file system that lost the spare directory's half of a
    rename: the spare's name still pointing at the inode that became a key file."""
    root = tmp_path / "keys"
    files = KeyFiles(root)
    files.write_many([(b"victim", SAMPLE)])
    files.close()
    spare_dir = root / SPARE_DIR_NAME
    spare_dir.mkdir()
    os.link(files.path_for(b"victim"), spare_dir / "left-behind.spare")
    again = KeyFiles(root, spares=1)  # reuses what is in the spare directory: that one name
    try:
        other = AcceptorState(Ballot(9, 9, 9), Ballot(9, 9, 9), Proposal(b"x", b"other"))
        again.write_many([(b"newcomer", other)])
        assert again.load(b"victim") == SAMPLE
        assert again.load(b"newcomer") == other
        assert not (spare_dir / "left-behind.spare").exists()
    finally:
        again.close()


# ---- sync modes ------------------------------------------------------------------------------


def test_sync_modes_resolve_and_reject_unknown_names() -> None:
    assert resolve_sync_mode("fsync") == "fsync"
    assert resolve_sync_mode("auto") in ("fsync", "syncfs")
    assert resolve_sync_mode("auto") == _sync_modes()[-1]
    with pytest.raises(ValueError, match="sync mode must be one of"):
        resolve_sync_mode("sometimes")


def test_syncfs_mode_syncs_the_file_system_twice_per_batch_and_fsyncs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "syncfs" not in _sync_modes():
        pytest.skip("this machine cannot use syncfs mode (it needs Linux 5.8 or later)")
    calls: list[str] = []
    real_syncfs, real_fsync = storage._syncfs, os.fsync
    assert real_syncfs is not None

    def counting_syncfs(fd: int) -> None:
        calls.append("syncfs " + os.readlink(f"/proc/self/fd/{fd}"))
        real_syncfs(fd)

    def counting_fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    files = KeyFiles(tmp_path / "keys", sync="syncfs")
    try:
        monkeypatch.setattr(storage, "_syncfs", counting_syncfs)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        batch = [(b"batch-%d" % i, state_for(i)) for i in range(storage.SYNCFS_MIN_BATCH)]
        files.write_many(batch)
        # First the data, through one of the batch's own files; then the renames, through keys/.
        assert len(calls) == 2 and calls[0].startswith("syncfs " + str(files.root)), calls
        assert calls[1] == "syncfs " + str(files.root), calls
        calls.clear()
        files.write_many(batch[:1] + [(b"small", SAMPLE)])  # a small batch fsyncs file and directory
        assert calls and set(calls) == {"fsync"}, calls
    finally:
        monkeypatch.undo()
        files.close()
    reopened = KeyFiles(files.root)
    try:
        assert reopened.load(b"small") == SAMPLE
        assert all(reopened.load(key) == state for key, state in batch)
    finally:
        reopened.close()


# ---- the name index (KeyFiles(index=True)) ----------------------------------------------------


def _counting_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every os.open from here on (the store's own calls included)."""
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    return opened


def test_the_name_index_answers_never_written_keys_without_opening_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "keys"
    earlier = KeyFiles(root)
    old = [(b"old:%d" % i, state_for(i)) for i in range(300)]
    earlier.write_many(old)
    earlier.close()
    files = KeyFiles(root, index=True)
    try:
        assert files.known is not None and files.known.wait(30), files.known and files.known.failed
        opened = _counting_opens(monkeypatch)
        assert all(files.load(key) == state for key, state in old), "files listed at start are read"
        assert len(opened) == len(old)
        opened.clear()
        assert [files.load(b"fresh:%d" % i) for i in range(1000)] == [None] * 1000
        # 300 names set at most 900 of 16,777,216 bits: a false "may exist" is all but impossible.
        assert opened == [], "a key never written needs no open"
        files.write_many([(b"fresh:7", SAMPLE)])
        assert files.load(b"fresh:7") == SAMPLE, "a key written since the listing is read from its file"
    finally:
        files.close()


def test_a_fresh_key_loaded_then_written_has_its_name_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    files = KeyFiles(tmp_path / "keys", index=True, sync=sync)
    try:
        assert files.known is not None and files.known.wait(30)
        hashed: list[bytes] = []
        real_file_name = storage._file_name

        def counting_file_name(key: bytes) -> str:
            hashed.append(key)
            return real_file_name(key)

        monkeypatch.setattr(storage, "_file_name", counting_file_name)
        items = [(b"once:%d" % i, state_for(i)) for i in range(6)]
        assert [files.load(key) for key, _ in items] == [None] * 6
        files.write_many(items)
        assert hashed == [key for key, _ in items]
        # Keys loaded without state and never written (reads of missing keys) are kept boundedly.
        for i in range(storage.FRESH_NAMES_KEPT + 100):
            assert files.load(b"never:%d" % i) is None
        assert len(files._fresh_names) <= storage.FRESH_NAMES_KEPT
        hashed.clear()
        files.write_many([(b"never:3", SAMPLE)])  # its name was dropped with the rest: hashed again
        assert hashed == [b"never:3"]
        monkeypatch.undo()
        assert [files.load(key) for key, _ in items] == [state for _, state in items]
        assert files.load(b"never:3") == SAMPLE
    finally:
        files.close()


def test_keys_written_while_the_names_are_listed_are_never_reported_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing runs in a thread while the node already serves: a file created after its
    directory was listed must still be found once the index is in use."""
    root = tmp_path / "keys"
    before = KeyFiles(root)
    before.write_many([(b"before", SAMPLE)])
    before.close()
    started = threading.Event()
    release = threading.Event()
    real_listdir = os.listdir

    def held_listdir(path: str) -> list[str]:
        if threading.current_thread().name == "respreg-names" and not release.is_set():
            started.set()
            assert release.wait(30), "the test never let the listing go on"
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", held_listdir)
    files = KeyFiles(root, index=True)
    try:
        assert started.wait(30)
        assert files.known is not None and not files.known.complete
        assert files.load(b"before") == SAMPLE, "until the listing is done, every load opens its file"
        during = [(b"during:%d" % i, state_for(i)) for i in range(50)]
        files.write_many(during)
        release.set()
        assert files.known.wait(30)
        assert files.load(b"before") == SAMPLE
        assert all(files.load(key) == state for key, state in during)
        assert files.load(b"never") is None
    finally:
        release.set()
        files.close()


def test_a_listing_started_later_still_knows_the_keys_written_before_it(tmp_path: Path) -> None:
    """The node starts the listing once its chosen log is read back, and writes before that."""
    root = tmp_path / "keys"
    earlier = KeyFiles(root)
    earlier.write_many([(b"earlier", SAMPLE)])
    earlier.close()
    files = KeyFiles(root, index=True, list_later=True)
    try:
        assert files.known is not None and not files.known.wait(0.1), "nothing is listed before start()"
        files.write_many([(b"before-the-listing", state_for(3))])
        files.known.start()
        files.known.start()  # once only
        assert files.known.wait(30)
        assert files.load(b"earlier") == SAMPLE
        assert files.load(b"before-the-listing") == state_for(3)
        assert files.load(b"never") is None
    finally:
        files.close()


def test_a_listing_that_fails_leaves_the_index_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory that cannot be listed must not leave a partial index in use: the names it
    holds would be missing, and their keys reported absent."""
    root = tmp_path / "keys"
    earlier = KeyFiles(root)
    earlier.write_many([(b"listed-or-not", SAMPLE)])
    earlier.close()
    real_listdir = os.listdir

    def failing_listdir(path: str) -> list[str]:
        if threading.current_thread().name == "respreg-names" and str(path) != str(root):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", failing_listdir)
    with caplog.at_level(logging.WARNING, logger="respreg.keyindex"):
        files = KeyFiles(root, index=True)
        try:
            assert files.known is not None and not files.known.wait(30)
            assert files.known.failed is not None and "Permission denied" in files.known.failed
            assert files.load(b"listed-or-not") == SAMPLE
            assert files.load(b"never") is None
        finally:
            files.close()
    assert any("every load opens its file" in r.getMessage() for r in caplog.records)


def test_a_store_without_the_index_opens_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tools and tests open a store without the index: another process may create its files."""
    files = KeyFiles(tmp_path / "keys")
    try:
        assert files.known is None
        opened = _counting_opens(monkeypatch)
        assert files.load(b"absent") is None
        assert opened == [str(files.path_for(b"absent"))]
    finally:
        files.close()
