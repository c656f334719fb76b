"""respreg: write-once registers replicated with single-decree Paxos, spoken to over RESP."""

__version__ = "0.1.0"
