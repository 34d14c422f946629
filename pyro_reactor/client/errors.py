"""The one exception type the client raises, and the transport-level kinds of it.

Every failure of a call is an L{AgentError}: catch that one type to handle them all. When the
agent itself answered ``{"error": "..."}``, the exception's message is the agent's message,
unchanged. Failures that happen before or instead of an answer (nothing listening, a refused
Firecracker ``CONNECT``, a connection closed without an answer, a timeout) are the subclasses
below, so a host can tell "the agent said no" from "no agent to ask".
"""

from __future__ import annotations

from twisted.internet import error


class AgentError(Exception):
    """A call failed; ``message`` is the agent's ``error`` text when it answered one."""

    def __init__(self, message: str, action: str | None = None) -> None:
        super().__init__(message)
        self.action = action

    @property
    def message(self) -> str:
        return str(self.args[0])


class AgentUnavailableError(AgentError):
    """No answer could be had: connecting failed, or the connection closed before an answer."""


class AgentClosedError(AgentUnavailableError):
    """The connection was accepted, then closed before one byte of answer arrived.

    This is what a booting VM looks like through a forwarder that accepts before the agent
    listens (QEMU's slirp ``hostfwd``, some vsock proxies): worth retrying while waiting.
    """


class AgentTimeoutError(AgentError):
    """Connecting, or the whole call, took longer than its timeout."""


class AgentProtocolError(AgentError):
    """The agent's answer did not follow the protocol (not JSON, too long, cut off)."""


class MessageConnectError(error.ConnectError):
    """A connect that failed for a reason the message says whole (no Twisted prefix added)."""

    def __init__(self, message: str) -> None:
        super().__init__(string=message)
        self.message = message

    def __str__(self) -> str:
        return self.message
