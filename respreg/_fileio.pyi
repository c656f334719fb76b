"""Types of respreg._fileio, the group committer's batched file system calls (_fileio.c)."""

PHASE_WRITE: int
PHASE_SYNC_DATA: int
PHASE_LINK: int
PHASE_SYNC_NAMES: int
PHASE_DONE: int
LINK_BY_DESCRIPTOR: int
LINK_BY_PROC_PATH: int

def run_batch(
    fds: list[int],
    datas: list[bytes],
    paths: list[bytes],
    data_fd: int,
    names_fd: int,
    how: int,
    phase: int,
    index: int,
    /,
) -> tuple[int, int, int]: ...
def create_unnamed(directory: str, count: int, /) -> list[int]: ...
def close_all(fds: list[int], /) -> None: ...
