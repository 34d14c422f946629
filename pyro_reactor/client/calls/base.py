"""What every call of the client goes through: one request, one connection, one answer.

L{CallBase} holds the endpoint and the timeouts (``AgentClient``'s constructor) and the
exchange: connect within ``connectTimeout``, send, read the answer within the call's budget,
stream an upload from a file or an export to one; every failure an L{AgentError}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from pyro_reactor.client.endpoints import VSockConnectError
from pyro_reactor.client.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeoutError,
    AgentUnavailableError,
)
from pyro_reactor.client.protocol import (
    DEFAULT_MAX_ANSWER_BYTES,
    ExchangeFactory,
    ExchangeProtocol,
    Progress,
    encodeRequest,
)

_T = TypeVar("_T")
_R = TypeVar("_R")


class CallBase:
    """The endpoint, the timeouts, and the exchange each call of ``AgentClient`` makes."""

    def __init__(
        self,
        reactor: Any,
        endpoint: str | IStreamClientEndpoint,
        *,
        timeout: float = 30.0,
        connectTimeout: float = 10.0,
        transferTimeout: float = 3600.0,
        maxAnswerBytes: int = DEFAULT_MAX_ANSWER_BYTES,
        spoolDirectory: Path | None = None,
    ) -> None:
        self.reactor = reactor
        if isinstance(endpoint, str):
            self.where = endpoint
            self.endpoint: IStreamClientEndpoint = clientFromString(reactor, endpoint)
        else:
            self.where = repr(endpoint)
            self.endpoint = endpoint
        self.timeout = timeout
        self.connectTimeout = connectTimeout
        self.transferTimeout = transferTimeout
        self.maxAnswerBytes = maxAnswerBytes
        self.spoolDirectory = spoolDirectory

    def call(
        self,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        raiseOnError: bool = True,
    ) -> Deferred[dict[str, Any]]:
        """Send one request; the answer as a ``dict`` (an ``error`` answer raises)."""
        return Deferred.fromCoroutine(
            self._exchange(fields, timeout=timeout, raiseOnError=raiseOnError)
        )

    async def _exchange(
        self,
        fields: dict[str, Any],
        *,
        timeout: float | None = None,
        upload: Path | None = None,
        export: Path | None = None,
        progress: Progress | None = None,
        raiseOnError: bool = True,
    ) -> dict[str, Any]:
        action = str(fields.get("action", "exec"))
        budget = self.timeout if timeout is None else timeout
        started = self.reactor.seconds()
        uploadHandle = upload.open("rb") if upload is not None else None
        exportHandle = export.open("wb") if export is not None else None
        try:
            uploadSize = os.fstat(uploadHandle.fileno()).st_size if uploadHandle else 0
            protocol = ExchangeProtocol(
                encodeRequest(fields),
                upload=uploadHandle,
                uploadSize=uploadSize,
                export=exportHandle,
                progress=progress,
                maxAnswerBytes=self.maxAnswerBytes,
            )
            connectFor = min(self.connectTimeout, budget)
            try:
                await self._bounded(
                    self.endpoint.connect(ExchangeFactory(protocol)),
                    connectFor,
                    lambda: AgentTimeoutError(
                        f"could not connect to {self.where} within {connectFor:g} s", action
                    ),
                )
            except AgentError:
                raise
            except ierror.TimeoutError as reason:
                raise AgentTimeoutError(
                    f"could not connect to {self.where}: {reason}", action
                ) from reason
            except Exception as reason:
                raise AgentUnavailableError(
                    f"could not connect to {self.where}: {_describe(reason)}", action
                ) from reason
            remaining = max(budget - (self.reactor.seconds() - started), 0.001)
            try:
                answer = await self._bounded(
                    protocol.answered,
                    remaining,
                    lambda: AgentTimeoutError(
                        f"no answer to {action} from {self.where} within {budget:g} s", action
                    ),
                )
            except AgentError as reason:
                if reason.action is None:
                    reason.action = action
                raise
        finally:
            if uploadHandle is not None:
                uploadHandle.close()
            if exportHandle is not None:
                exportHandle.close()
        if raiseOnError and "error" in answer:
            raise AgentError(str(answer["error"]), action)
        return answer

    async def _bounded(
        self, waiting: Deferred[_T], seconds: float, timedOut: Callable[[], AgentError]
    ) -> _T:
        fired: list[bool] = []

        def expire() -> None:
            fired.append(True)
            waiting.cancel()

        timer: IDelayedCall = self.reactor.callLater(seconds, expire)
        try:
            return await waiting
        except (CancelledError, ierror.ConnectingCancelledError) as reason:
            if fired:
                raise timedOut() from reason
            raise
        except Exception as reason:
            if fired:
                raise timedOut() from reason
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _simple(
        self,
        fields: dict[str, Any],
        parse: Callable[[dict[str, Any]], _R],
        timeout: float | None = None,
    ) -> Deferred[_R]:
        return self.call(fields, timeout=timeout).addCallback(parse)

    @contextmanager
    def _transient(self, path: Path, keep: bool = False) -> Iterator[None]:
        """``path`` is removed when the block fails (or, unless ``keep``, ends), and also if
        the reactor shuts down meanwhile (Ctrl-C in the CLI): no half-written file stays."""
        trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", path.unlink, missing_ok=True
        )
        try:
            yield
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        else:
            if not keep:
                path.unlink(missing_ok=True)
        finally:
            self.reactor.removeSystemEventTrigger(trigger)

    def _inThread(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)


def _items(answer: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = answer.get(key)
    if not isinstance(items, list):
        raise AgentProtocolError(f"the agent's answer has no {key!r} list")
    return [item for item in items if isinstance(item, dict)]


def _describe(reason: BaseException) -> str:
    if isinstance(reason, ierror.ConnectError) and not isinstance(reason, VSockConnectError):
        # Twisted's str() of these reads "An error occurred while connecting: 19: ...".
        kind = str(getattr(reason, "MESSAGE", "") or type(reason).__name__).rstrip(".")
        detail = reason.osError
        if isinstance(detail, Failure):
            detail = detail.getErrorMessage()
        elif isinstance(detail, int):
            detail = None
        first = reason.args[0] if reason.args else ""
        if isinstance(first, Failure):
            first = first.getErrorMessage()
        text = str(first or "") or (str(detail) if detail else "")
        return f"{kind}: {text}" if text else kind
    if isinstance(reason, OSError) and reason.strerror:
        where = f": {reason.filename}" if reason.filename else ""
        return f"{reason.strerror}{where}"
    return str(reason) or type(reason).__name__
