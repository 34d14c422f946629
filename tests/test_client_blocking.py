"""The blocking facade, used as a script uses it: in its own process, with no reactor in sight."""

from __future__ import annotations

import json
import os
import sys
import textwrap

from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pyro_reactor.client import BlockingClient
from tests.client_helpers import requireActions, startAgentEverywhere, startBridge
from tests.helpers import reactor

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, pathlib
    from pyro_reactor.client import AgentError, BlockingClient

    agent = BlockingClient(sys.argv[1], timeout=10)
    report = {"ready": agent.waitUntilReady(timeout=10).agent}
    report["exit_code"] = agent.execute("echo from a script; exit 5").exitCode
    local = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    local.write_text("blocking upload\\n")
    report["uploaded"] = agent.upload(local, "/workspace/in").entryCount
    report["read"] = agent.readWorkspaceFile("/workspace/in/note.txt").text
    try:
        agent.readWorkspaceFile("/workspace/missing")
    except AgentError as error:
        report["error"] = error.message
    print(json.dumps(report))
    """
)


class BlockingScriptTests(TestCase):
    async def test_scriptThroughTheFirecrackerBridge(self) -> None:
        """A plain blocking script drives exec, an upload and a file read through the
        Firecracker-style bridge."""
        agent = await startAgentEverywhere(self)
        await requireActions(self, agent, "exec", "extract_archive", "read_workspace_file")
        bridge = await startBridge(self, agent)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", SCRIPT, bridge.endpoint()],
            env=dict(os.environ),
            reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out),
            {
                "ready": "pyro-reactor",
                "exit_code": 5,
                "uploaded": 1,
                "read": "blocking upload\n",
                "error": "workspace path does not exist: /workspace/missing",
            },
        )


class ReactorThreadTests(TestCase):
    async def test_refusedFromTheReactorThread(self) -> None:
        """The blocking client refuses to be built on the reactor's thread, where it would
        deadlock, and points at AgentClient."""
        # Once an async trial test has waited once, the reactor runs in this thread: blocking
        # here would never end.
        await deferLater(reactor, 0, lambda: None)
        self.assertTrue(reactor.running)
        with self.assertRaises(RuntimeError) as caught:
            BlockingClient("tcp:host=127.0.0.1:port=1")
        self.assertIn("use AgentClient", str(caught.exception))
