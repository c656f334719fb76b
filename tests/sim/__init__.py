"""Deterministic simulation of a respreg cluster: the real sans-IO core under a seeded world.

- :mod:`tests.sim.world` – the discrete-event world: nodes, simulated disks, a faulty network,
  crashes and restarts, and an oracle of what acceptors made durable.
- :mod:`tests.sim.checker` – a checker for the write-once register model over a history.
- :mod:`tests.sim.rebuild` – the rebuild of a node that lost its disk (amnesia), as the server
  runs it, driven through the world.
- :mod:`tests.sim.scenarios` – the scenarios the tests run, one seed at a time.
- :mod:`tests.sim.run` – run one seed from the command line and print its trace.
"""
