"""The benchmark runner's own logic: section discovery, statistics and the result table.

Running the benchmarks needs root and the reference agent, so it is not part of the suite; these
tests keep the parts that decide what gets reported honest.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.harness import Bench, BenchError, BenchSkipped, Row, percentile
from benchmarks.run import Section, runSections, sections, table


def _section(name: str, run: Any) -> Section:
    module = ModuleType(f"benchmarks.bench_{name}")
    module.run = run  # type: ignore[attr-defined]
    return Section(name, 50, module)


class StatisticsTests(SynchronousTestCase):
    def test_percentileInterpolates(self) -> None:
        """Percentiles interpolate linearly between samples, as the benchmark tables report them."""
        samples = [4.0, 1.0, 3.0, 2.0]
        self.assertEqual(percentile(samples, 0.0), 1.0)
        self.assertEqual(percentile(samples, 1.0), 4.0)
        self.assertEqual(percentile(samples, 0.5), 2.5)
        self.assertAlmostEqual(percentile(list(map(float, range(11))), 0.9), 9.0)

    def test_ratioAndGoal(self) -> None:
        """A row's ratio is ours over the reference's and it meets its goal only at or under it;
        no reference or goal means no verdict."""
        self.assertEqual(Row("x", "ms", 1.0, 4.0, goal=0.5).ratio, 0.25)
        self.assertIs(Row("x", "ms", 1.0, 4.0, goal=0.5).met, True)
        self.assertIs(Row("x", "ms", 3.0, 4.0, goal=0.5).met, False)
        self.assertIsNone(Row("x", "ms", 3.0, None).ratio)
        self.assertIsNone(Row("x", "ms", 3.0, 4.0).met)


class RunnerTests(SynchronousTestCase):
    def test_everySectionIsFound(self) -> None:
        """Every benchmark section is found once, in order, and has a run function."""
        found = sections()
        names = [section.name for section in found]
        self.assertEqual(len(names), len(set(names)))
        for expected in ("startup", "exec", "write", "concurrent"):
            self.assertIn(expected, names)
        self.assertEqual(found, sorted(found, key=lambda section: (section.order, section.name)))
        for section in found:
            self.assertTrue(callable(section.module.run), section.name)

    def test_tableShowsRatioGoalAndNotes(self) -> None:
        """The printed table shows each ratio, whether its goal was met or missed, and the notes
        under it."""
        rendered = table(
            [
                Row("exec p50", "ms", 3.0, 4.0, goal=1.0, note="500 requests"),
                Row("write", "ms", 50.0, 500.0, goal=0.05),
                Row("ping", "ms", 0.4, None),
            ]
        )
        lines = rendered.splitlines()
        self.assertIn("0.750x", lines[2])
        self.assertTrue(lines[2].endswith("met"))
        self.assertIn("0.100x", lines[3])
        self.assertTrue(lines[3].endswith("MISSED"))
        self.assertIn("- exec p50: 500 requests", lines)

    def test_skippedAndFailedSectionsDoNotStopTheRun(self) -> None:
        """A section that cannot run here (a missing program) is skipped with its reason, one
        that fails is a failure; the sections after either still run and give their rows."""

        def missing(bench: Bench) -> list[Row]:
            raise BenchSkipped("socat is not installed")

        def broken(bench: Bench) -> list[Row]:
            raise BenchError("the agent died")

        def fine(bench: Bench) -> list[Row]:
            return [Row("ping", "ms", 0.4, None)]

        bench = Bench(Path("."), Path(self.mktemp()), Path("/nonexistent"))
        chosen = [_section("relay", missing), _section("exec", broken), _section("ok", fine)]
        with contextlib.redirect_stderr(io.StringIO()):
            outcome = runSections(bench, chosen, 0.0)
        self.assertEqual(outcome.rows, [Row("ping", "ms", 0.4, None)])
        self.assertEqual(outcome.skipped, ["relay: socat is not installed"])
        self.assertEqual(outcome.failures, ["exec: the agent died"])
