"""How long a node takes to read its chosen log back at start, per million keys.

    .venv/bin/python benchmarks/chosen_log_load.py [--keys 1000000]

Writes a chosen log of --keys entries shaped like the scale benchmark's (22-byte keys, 18-byte
proposal ids, 24-byte values) into a temp dir, then times what ``NodeServer`` does with it at
start: ``ChosenLog.load`` (read and check the blocks) and ``ChosenCache.extend`` (fill the
cache), and reports the cache's size in bytes as the server's bound counts it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from respreg.chosenlog import LOG_NAME, ChosenLog, write_log
from respreg.config import ServerConfig
from respreg.core.chosen import ChosenCache, pack


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    args = p.parse_args()
    cfg = ServerConfig(node_id=1, port=1, peer_port=2, data_dir=Path("."), peers=())
    with tempfile.TemporaryDirectory() as tmp:
        pid = b"\x00\x01" + b"\x07" * 16
        write_log(tmp, [(b"scale:key:%012d" % i, pack(pid, b"scale-value-%012d" % i)) for i in range(args.keys)])
        size = (Path(tmp) / LOG_NAME).stat().st_size
        cache = ChosenCache(cfg.chosen_cache_keys, cfg.chosen_cache_bytes)
        clog = ChosenLog(tmp, cfg.max_value_bytes + cfg.proto_max_bulk_len)
        t0 = time.perf_counter()
        filling = 0.0
        for batch in clog.load():
            t1 = time.perf_counter()
            cache.extend(batch)
            filling += time.perf_counter() - t1
        total = time.perf_counter() - t0
        clog.close()
    print(
        f"{args.keys:,} keys, log of {size / 2**20:.1f} MiB: read back in {total:.2f} s "
        f"({total - filling:.2f} s reading and checking blocks, {filling:.2f} s filling the cache); "
        f"cache holds {len(cache):,} entries, {cache.size_bytes / 2**20:.0f} MiB as counted against "
        f"chosen_cache_bytes ({cfg.chosen_cache_bytes // 2**20} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
