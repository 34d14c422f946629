"""``AgentClient`` without sockets: a fake endpoint and a fake clock drive timeouts and backoff."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pyro_reactor.client import AgentClient, AgentError, AgentTimeoutError
from pyro_reactor.client.protocol import ExchangeProtocol


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Refuses the first ``refusals`` connections, then connects to a StringTransport."""

    def __init__(self, clock: MemoryReactorClock, refusals: int = 0) -> None:
        self.clock = clock
        self.refusals = refusals
        self.attempts: list[float] = []
        self.protocols: list[ExchangeProtocol] = []
        self.hang = False

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts.append(self.clock.seconds())
        if len(self.attempts) <= self.refusals:
            return fail(ConnectionRefusedError("refused"))
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5005))
        assert isinstance(protocol, ExchangeProtocol)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


def outcome(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


class WaitUntilReadyTests(SynchronousTestCase):
    def test_retriesUntilAnAnswer(self) -> None:
        """waitUntilReady keeps retrying refused connections and returns the first answer,
        leaving no timer behind."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock, refusals=6)
        client = AgentClient(clock, endpoint)
        results = outcome(client.waitUntilReady(timeout=60, initialDelay=0.1, maxDelay=0.5))
        for _ in range(6):
            clock.advance(0.5)
        self.assertEqual(len(endpoint.protocols), 1)
        endpoint.protocols[0].dataReceived(b'{"pong": true, "agent": "pyro-reactor"}\n')
        self.assertEqual(results[0].agent, "pyro-reactor")
        self.assertEqual(len(endpoint.attempts), 7)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_backoffDoublesUpToTheMaximum(self) -> None:
        """The delay between waitUntilReady's attempts doubles from the initial delay up to the
        maximum."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock, refusals=100)
        client = AgentClient(clock, endpoint)
        outcome(client.waitUntilReady(timeout=60, initialDelay=0.1, maxDelay=0.5))
        for _ in range(6):
            (timer,) = clock.getDelayedCalls()
            clock.advance(timer.getTime() - clock.seconds())
        attempts = endpoint.attempts
        gaps = [round(b - a, 3) for a, b in pairwise(attempts)]
        self.assertEqual(gaps, [0.1, 0.2, 0.4, 0.5, 0.5, 0.5])

    def test_givesUpAtTheDeadline(self) -> None:
        """waitUntilReady fails at its deadline with a timeout naming the last refusal, leaving
        no timer behind."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock, refusals=1000)
        results = outcome(AgentClient(clock, endpoint).waitUntilReady(timeout=3))
        clock.pump([0.1] * 40)
        failure = results[0]
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, AgentTimeoutError)
        self.assertIn("did not answer within 3 s", failure.value.message)
        self.assertIn("Connection was refused", failure.value.message)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_anErrorAnswerMeansReady(self) -> None:
        """An agent that answers ping with an error (an older agent without ping) counts as
        ready."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock)
        results = outcome(AgentClient(clock, endpoint).waitUntilReady())
        endpoint.protocols[0].dataReceived(b'{"error": "unknown action: \'ping\'"}\n')
        self.assertEqual(results[0].actions, ())


class TimeoutTests(SynchronousTestCase):
    def test_connectTimeout(self) -> None:
        """A connection that hangs fails at exactly the connect timeout with a message naming the
        endpoint."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock)
        endpoint.hang = True
        results = outcome(AgentClient(clock, endpoint, connectTimeout=2).ping())
        clock.advance(1.9)
        self.assertEqual(results, [])
        clock.advance(0.1)
        self.assertIsInstance(results[0].value, AgentTimeoutError)
        self.assertIn("could not connect to", results[0].value.message)
        self.assertIn("within 2 s", results[0].value.message)

    def test_callTimeoutAndCallsThatWaitOnPurpose(self) -> None:
        """The call timeout ends a silent ping, while an exec waits its own timeout_seconds on
        top of the call timeout."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock)
        client = AgentClient(clock, endpoint, timeout=5)
        pinged = outcome(client.ping())
        executed = outcome(client.execute("sleep 20", timeoutSeconds=20))
        clock.advance(5)
        self.assertIsInstance(pinged[0].value, AgentTimeoutError)
        self.assertEqual(pinged[0].value.message, f"no answer to ping from {endpoint!r} within 5 s")
        self.assertTrue(endpoint.protocols[0].transport.disconnecting)  # type: ignore[union-attr]
        # exec waits its own timeout_seconds on top of the call timeout.
        clock.advance(19)
        self.assertEqual(executed, [])
        endpoint.protocols[1].dataReceived(b'{"exit_code": 124, "stderr": "timed out"}\n')
        self.assertEqual(executed[0].exitCode, 124)

    def test_errorAnswerRaisesAgentError(self) -> None:
        """An error answer raises a plain AgentError with the agent's message and the action
        name."""
        clock = MemoryReactorClock()
        endpoint = FakeEndpoint(clock)
        results = outcome(AgentClient(clock, endpoint).statusService("x"))
        endpoint.protocols[0].dataReceived(b'{"error": "service \'x\' does not exist"}\n')
        self.assertIs(type(results[0].value), AgentError)
        self.assertEqual(results[0].value.message, "service 'x' does not exist")
        self.assertEqual(results[0].value.action, "status_service")
