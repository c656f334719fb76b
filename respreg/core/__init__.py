"""The pure, deterministic Paxos core: no asyncio, sockets, files, clocks or randomness inside."""
