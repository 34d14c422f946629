"""The host side of jobs: ``AgentClient`` job calls, the attach stream, and the CLI commands."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from pyro_reactor.client import AgentClient
from pyro_reactor.client.errors import AgentError
from tests.helpers import RunningAgent, reactor, startAgent
from tests.test_cli import cli
from tests.test_jobs import jobsOf, waitFor


class JobClientTests(TestCase):
    """AgentClient's job calls against a real agent."""

    timeout = 120

    async def setUpAgent(self) -> tuple[RunningAgent, AgentClient]:
        agent = await startAgent(self)
        registry = jobsOf(agent)

        async def settle() -> None:
            for job in list(registry.jobs.values()):
                if job.machine.state() == "running":
                    job.machine.signal(9)
            await waitFor(
                lambda: all(j.machine.state() != "running" for j in registry.jobs.values())
            )

        self.addCleanup(settle)
        client = AgentClient(reactor, f"tcp:host=127.0.0.1:port={agent.port}")
        return agent, client

    async def test_startAttachAndFeed(self) -> None:
        """attachJob(start=...) starts and follows a job; events come by ``async for``;
        stdin written through the attachment reaches the job; ``done`` has the exit."""
        _, client = await self.setUpAgent()
        attachment = await client.attachJob(
            start={"command": "cat; echo end", "stdin": True, "jobId": "c"}
        )
        assert attachment.header is not None
        self.assertEqual(attachment.header["job_id"], "c")
        attachment.write("one\n")
        attachment.write(b"two\n")
        attachment.closeStdin()
        events: list[dict[str, Any]] = [event async for event in attachment]
        self.assertEqual(
            "".join(e["data"] for e in events if e["event"] == "output"), "one\ntwo\nend\n"
        )
        exit_ = await attachment.done
        assert exit_ is not None
        self.assertEqual(exit_["exit_code"], 0)

    async def test_pollingCalls(self) -> None:
        """startJob, readJob, writeJob, signalJob, statusJob, listJobs, removeJob."""
        agent, client = await self.setUpAgent()
        started = await client.startJob("read x; echo got $x; sleep 60", jobId="p", stdin=True)
        self.assertEqual(started["job_id"], "p")
        await client.writeJob("p", "it\n", closeStdin=True)
        read = await client.readJob("p", waitMs=20000)
        self.assertEqual(read["stdout"], "got it\n")
        status = await client.statusJob("p")
        self.assertEqual(status["stdin"], "closed")
        self.assertEqual(await client.signalJob("p", "KILL"), {"job_id": "p", "signal": "KILL"})
        await waitFor(lambda: jobsOf(agent).get("p").machine.state() == "exited")
        jobs = await client.listJobs()
        self.assertEqual([job["job_id"] for job in jobs], ["p"])
        self.assertEqual(await client.removeJob("p"), {"job_id": "p", "removed": True})
        with self.assertRaises(AgentError):
            await client.statusJob("p")
        with self.assertRaises(AgentError):
            await client.attachJob("p")

    async def test_cliRunJobsAttachKill(self) -> None:
        """``run`` streams and exits with the job's code; ``--detach`` prints the id; ``jobs``
        lists; ``kill`` signals; ``attach`` replays to the exit (128 + signal)."""
        agent, _ = await self.setUpAgent()
        where = f"tcp:host=127.0.0.1:port={agent.port}"
        ran = await cli("--connect", where, "run", "--", "echo out; echo err >&2; exit 5")
        self.assertEqual((ran.code, ran.stdout, ran.stderr), (5, "out\n", "err\n"))
        ran = await cli(
            "--connect", where, "run", "--stdin", "--", "tr", "a-z", "A-Z", stdin="abc\n"
        )
        self.assertEqual((ran.code, ran.stdout), (0, "ABC\n"))
        ran = await cli("--connect", where, "run", "-d", "--job-id", "bg", "--", "sleep 60")
        self.assertEqual((ran.code, ran.stdout), (0, "bg\n"))
        ran = await cli("--connect", where, "jobs")
        self.assertIn("bg: running", ran.stdout)
        ran = await cli("--connect", where, "kill", "bg", "KILL")
        self.assertEqual(ran.code, 0)
        ran = await cli("--connect", where, "attach", "bg")
        self.assertEqual(ran.code, 128 + 9)
        ran = await cli("--connect", where, "--json", "jobs")
        self.assertEqual(
            sorted(json.loads(line)["job_id"] for line in ran.stdout.splitlines())[0], "bg"
        )

    async def test_execSeveralWordsAreOneArgv(self) -> None:
        """``exec -- sh -c 'echo hi'`` runs that argv (quoted), as docker exec would."""
        agent, _ = await self.setUpAgent()
        where = f"tcp:host=127.0.0.1:port={agent.port}"
        ran = await cli("--connect", where, "exec", "--", "sh", "-c", "echo hi")
        self.assertEqual((ran.code, ran.stdout), (0, "hi\n"))
        ran = await cli("--connect", where, "exec", "--", "echo a; echo b")
        self.assertEqual(ran.stdout, "a\nb\n")
