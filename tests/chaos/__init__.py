"""Fault-injection ("chaos") suite for respreg: real processes, real sockets, a history checker.

- :mod:`tests.chaos.history`  – what every client operation did and when
- :mod:`tests.chaos.checker`  – the write-once register model over a whole history
- :mod:`tests.chaos.cluster`  – a cluster on loopback aliases (127.0.0.X), optionally behind the proxy
- :mod:`tests.chaos.proxy`    – a TCP proxy between peers that can drop, delay, reset and cut links
- :mod:`tests.chaos.nemesis`  – the faults: kill, pause, restart, nftables partitions and loss, proxy faults
- :mod:`tests.chaos.workload` – concurrent redis-py clients recording the history
- :mod:`tests.chaos.run`      – ``python -m tests.chaos.run``: a seeded run and its summary
"""
