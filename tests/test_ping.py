"""The ``ping`` action over a real socket."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.helpers import startAgent


class PingTests(TestCase):
    async def test_pingAnswersVersionActionsUptimeAndPid(self) -> None:
        """ping answers pong with the agent's pid, its actions, its version and a non-negative
        uptime."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "ping"})
        self.assertEqual(answer["pong"], True)
        self.assertEqual(answer["pid"], os.getpid())
        self.assertIn("ping", answer["actions"])
        self.assertIsInstance(answer["version"], str)
        self.assertGreaterEqual(answer["uptime_seconds"], 0)
