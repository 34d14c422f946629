"""Run pyro-reactor beside the reference agent and print a table of ours / reference ratios.

Usage (from the repository root, as root: the reference needs ``unshare``)::

    .venv/bin/python benchmarks/run.py [--only NAME]... [--rounds N] [--quick] [--json FILE]

Every ``benchmarks/bench_*.py`` module is a section (``--list`` shows them). Both agents listen
on loopback only, with fresh temporary directories, and every agent started is killed at the
end, also on Ctrl-C or SIGTERM. The reference is the guest agent of the pinned pyro-mcp
wheel (``tests/pyro_mcp_wheel.py``; ``--reference AGENT.py`` to use another copy), started by
``tests/reference_launcher.py`` with this interpreter so both agents use the same Python.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import Bench, BenchError, BenchSkipped, Row  # noqa: E402
from tests.pyro_mcp_wheel import WheelUnavailable, referenceAgentScript  # noqa: E402


@dataclass(frozen=True)
class Section:
    name: str
    order: int
    module: ModuleType


def sections() -> list[Section]:
    """Every ``bench_*`` module of this package, in ``ORDER``."""
    import benchmarks

    found = []
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if not info.name.startswith("bench_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        name = getattr(module, "NAME", info.name.removeprefix("bench_"))
        found.append(Section(name, getattr(module, "ORDER", 50), module))
    return sorted(found, key=lambda section: (section.order, section.name))


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 2 if value < 100 else 0
    return f"{value:.{digits}f} {unit}"


def table(rows: list[Row]) -> str:
    header = ("metric", "ours", "reference", "ours/ref", "goal", "")
    lines = [header]
    for row in rows:
        ratio = row.ratio
        met = row.met
        lines.append(
            (
                row.metric,
                _number(row.ours, row.unit),
                _number(row.reference, row.unit),
                "-" if ratio is None else f"{ratio:.3f}x",
                "-" if row.goal is None else f"<= {row.goal:g}x",
                "" if met is None else ("met" if met else "MISSED"),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    rendered.insert(1, "  ".join("-" * width for width in widths).rstrip())
    notes = [f"- {row.metric}: {row.note}" for row in rows if row.note]
    return "\n".join(rendered + (["", *notes] if notes else []))


@dataclass
class Outcome:
    """What a run of sections gave: their rows, and the sections skipped or failed (with why)."""

    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def runSections(bench: Bench, chosen: list[Section], started: float) -> Outcome:
    """Run each section in turn. One that fails or cannot run here does not stop the others."""
    outcome = Outcome()
    for section in chosen:
        print(f"[{time.monotonic() - started:6.1f} s] {section.name} ...", file=sys.stderr)
        try:
            outcome.rows.extend(section.module.run(bench))
        except BenchSkipped as reason:
            outcome.skipped.append(f"{section.name}: {reason}")
            print(f"  skipped: {reason}", file=sys.stderr)
        except BenchError as error:
            outcome.failures.append(f"{section.name}: {error}")
            print(f"  failed: {error}", file=sys.stderr)
        except Exception:
            outcome.failures.append(f"{section.name}: crashed")
            traceback.print_exc()
    return outcome


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    available = sections()
    names = [section.name for section in available]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", action="append", choices=names, help="run only this section")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds of each")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument(
        "--reference", type=Path, help="the reference's pyro_guest_agent.py (default: the wheel's)"
    )
    options = parser.parse_args(argv)
    if options.list:
        for section in available:
            print(f"{section.name:12} {section.module.__name__}")
        return 0
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    if options.reference is None:
        try:
            options.reference = referenceAgentScript()
        except WheelUnavailable as problem:
            parser.error(f"the pyro-mcp wheel is unavailable: {problem}")
    if not options.reference.is_file():
        parser.error(f"no reference agent at {options.reference}")
    if not (REPO / ".venv" / "bin" / "twistd").exists():
        parser.error("no .venv/bin/twistd: run `make setup` first")
    chosen = [s for s in available if not options.only or s.name in options.only]

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyro-bench-") as workdir:
        bench = Bench(
            repo=REPO,
            workdir=Path(workdir),
            referenceScript=options.reference.resolve(),
            rounds=options.rounds,
            quick=options.quick,
        )
        try:
            outcome = runSections(bench, chosen, started)
        finally:
            bench.close()
    rows = outcome.rows
    print()
    print(table(rows))
    for note in bench.notes:
        print(f"- note: {note}")
    for skipped in outcome.skipped:
        print(f"- skipped {skipped}")
    for failure in outcome.failures:
        print(f"- FAILED {failure}")
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.1f} s, {options.rounds} rounds")
    if options.json:
        options.json.write_text(
            json.dumps(
                [asdict(row) | {"ratio": row.ratio, "met": row.met} for row in rows], indent=2
            )
        )
    return 1 if outcome.failures else 0


def runAlone(run: Callable[[Bench], list[Row]], name: str) -> int:
    """Run one section whose rows are ours only, on its own (``python benchmarks/bench_X.py
    [--quick]``), without the reference agent; print its table."""
    parser = argparse.ArgumentParser(description=f"{name} benchmark, standalone")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"pyro-bench-{name}-") as workdir:
        bench = Bench(REPO, Path(workdir), Path("/nonexistent"), quick=options.quick)
        try:
            rows = run(bench)
        except BenchSkipped as reason:
            print(f"skipped: {reason}")
            return 1
        finally:
            bench.close()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
