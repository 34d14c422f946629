"""What the services capability offers the others: readiness re-checks and a running count.

``restored`` re-checks the readiness of the services that were ready (a restored guest's
services may have lost their sockets) and ``stats`` counts the services that run; both reach
the services through the registries on the context (``context.hooks``).
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.helpers import reactor, startAgent


class ServiceHooksTests(TestCase):
    """The services capability registers its re-check and its count, and both tell the truth."""

    async def test_readyServicesAreRecheckedAndCounted(self) -> None:
        """Only a running service that became ready is re-checked, and ``stats`` counts every
        running service until it is stopped."""
        agent = await startAgent(self)
        listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        ready = await agent.call(
            {
                "action": "start_service",
                "service_name": "web",
                "command": "exec sleep 60",
                "readiness": {"type": "tcp", "address": f"127.0.0.1:{port}"},
            }
        )
        self.assertIsNotNone(ready.get("ready_at"), ready)
        plain = await agent.call(
            {"action": "start_service", "service_name": "plain", "command": "exec sleep 60"}
        )
        self.assertEqual(plain["state"], "running", plain)
        for name in ("web", "plain"):
            self.addCleanup(agent.call, {"action": "stop_service", "service_name": name})
        (recheck,) = agent.context.hooks.readinessRechecks
        self.assertEqual(await recheck(), 1)
        self.assertEqual((await agent.call({"action": "stats"}))["counts"]["services"], 2)
        await agent.call({"action": "stop_service", "service_name": "plain"})
        self.assertEqual((await agent.call({"action": "stats"}))["counts"]["services"], 1)
