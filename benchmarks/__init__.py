"""Benchmarks of pyro-reactor beside the reference agent; ``benchmarks/run.py`` runs them.

Each ``bench_*.py`` module here is a section: it exposes ``NAME`` (what ``--only`` selects),
``ORDER`` (sections run in ascending order) and ``run(bench) -> list[Row]``. The runner finds
them by name, so adding a section is adding a module. ``harness.py`` holds what sections share:
launching both agents, alternating rounds between them, the wire client and the statistics.
"""
