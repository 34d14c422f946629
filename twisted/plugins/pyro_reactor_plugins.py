"""twistd and endpoint plugins of pyro-reactor: instances only, the code is in the package."""

from twisted.application.service import ServiceMaker

pyroAgent = ServiceMaker(
    "pyro-agent",
    "pyro_reactor.tap",
    "The pyro guest agent: exec, files, archives, shells and services over vsock/tcp/unix.",
    "pyro-agent",
)
