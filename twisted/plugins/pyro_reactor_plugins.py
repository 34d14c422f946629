"""twistd and endpoint plugins of pyro-reactor: instances only, the code is in the package."""

from twisted.application.service import ServiceMaker

from pyro_reactor.client.endpoints import FirecrackerVSockClientParser, VSockClientParser
from pyro_reactor.vsock import VSockServerParser

pyroAgent = ServiceMaker(
    "pyro-agent",
    "pyro_reactor.tap",
    "The pyro guest agent: exec, files, archives, shells and services over vsock/tcp/unix.",
    "pyro-agent",
)

vsockServerParser = VSockServerParser()

# Client endpoints of the host side (pyro_reactor.client): fcvsock: and vsock:.
firecrackerVSockClientParser = FirecrackerVSockClientParser()
vsockClientParser = VSockClientParser()
