"""twistd and endpoint plugins of pyro-reactor: instances only, the code is in the package.

twistd imports this module at every start (the agent's too), so it names code rather than
importing it: the service maker names ``pyro_reactor.tap``, and the endpoint parsers are
L{pyro_reactor.parsers} shells that import their endpoint module on first use.
"""

from twisted.application.service import ServiceMaker

from pyro_reactor.parsers import LazyClientParser, LazyServerParser

pyroAgent = ServiceMaker(
    "pyro-agent",
    "pyro_reactor.tap",
    "The pyro guest agent: exec, files, archives, shells and services over vsock/tcp/unix.",
    "pyro-agent",
)

# The guest's AF_VSOCK server endpoint: vsock:PORT.
vsockServerParser = LazyServerParser("vsock", "pyro_reactor.system.vsock", "VSockServerParser")

# Client endpoints of the host side (pyro_reactor.client): fcvsock: and vsock:.
firecrackerVSockClientParser = LazyClientParser(
    "fcvsock", "pyro_reactor.client.endpoints", "FirecrackerVSockClientParser"
)
vsockClientParser = LazyClientParser("vsock", "pyro_reactor.client.endpoints", "VSockClientParser")

# A guest TCP port through the agent: pyro:<agent endpoint>:guest_port=PORT.
pyroClientParser = LazyClientParser("pyro", "pyro_reactor.client.tcp", "PyroClientParser")
