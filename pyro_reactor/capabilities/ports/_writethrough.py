"""Writing relayed bytes to a socket at once when nothing is queued before them.

Twisted's ``transport.write`` always queues and sends on the reactor's next turn (when the
descriptor is reported writable). For a relay that is one more turn of the reactor per hop,
which doubles the latency of small request/response exchanges. L{sendNow} tries the socket
first when the transport has nothing queued (so ordering is kept), and hands what the socket
did not take (or any error, which Twisted then detects and reports as usual) to
``transport.write``.

It reads private attributes of Twisted's ``FileDescriptor`` (``_tempDataLen``,
``dataBuffer``/``offset``, ``_writeDisconnected``/``_writeDisconnecting``) and the
connection's ``socket``; ``tests/test_ports.py`` keeps a canary test on them, and without
them (another transport) it falls back to ``transport.write``.
"""

from __future__ import annotations

from typing import Any


def sendNow(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, straight to its socket when nothing is queued."""
    try:
        idle = (
            transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._writeDisconnecting
            and not transport._tempDataLen
            and len(transport.dataBuffer) <= transport.offset
        )
        sock = transport.socket
    except AttributeError:
        transport.write(data)
        return
    if idle:
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0  # would block, or an error Twisted's own write path will report
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
