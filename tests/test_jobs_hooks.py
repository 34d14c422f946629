"""What the jobs capability offers the others: ``stats`` counts and usage, ``quiesce`` freezing.

The snapshot and stats capabilities reach the jobs through the registries on the context
(``context.hooks``); these tests drive them over the wire with a real job.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.helpers import startAgent


class JobHooksTests(TestCase):
    """A running job is counted by ``stats``, shows its usage there, and is frozen by
    ``quiesce`` with ``freeze_jobs`` where jobs have cgroups."""

    timeout = 60

    async def test_statsAndQuiesceSeeTheJob(self) -> None:
        """stats counts the running job and lists it with its usage; quiesce with freeze_jobs
        freezes it (when it has a cgroup) and thaw thaws it; once removed, it is gone from
        both."""
        agent = await startAgent(self)
        started = await agent.call(
            {"action": "start_job", "command": "exec sleep 60", "job_id": "hooked"}
        )
        self.assertEqual(started["state"], "running", started)
        removal = {"action": "remove_job", "job_id": "hooked", "force": True}
        self.addCleanup(agent.call, removal)
        stats = await agent.call({"action": "stats"})
        self.assertEqual(stats["counts"]["jobs"], 1)
        [entry] = stats["jobs"]
        self.assertEqual((entry["job_id"], entry["state"]), ("hooked", "running"))
        self.assertEqual(entry["usage"] is not None, started["cgroup"])
        frozen = await agent.call({"action": "quiesce", "freeze_jobs": True})
        self.assertEqual(frozen["jobs_frozen"], 1 if started["cgroup"] else 0, frozen)
        thawed = await agent.call({"action": "thaw"})
        self.assertEqual(thawed["jobs_thawed"], 1 if started["cgroup"] else 0, thawed)
        await agent.call(removal)
        stats = await agent.call({"action": "stats"})
        self.assertEqual(stats["counts"]["jobs"], 0)
        self.assertNotIn("jobs", stats)
