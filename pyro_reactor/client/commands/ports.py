"""The port commands: ``forward`` (host ports to guest ports) and ``ports`` (the guest's)."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from pyro_reactor.client.commands.base import EXIT_OK, CommandBase, UsageError
from pyro_reactor.client.errors import AgentUnavailableError


class PortCommands(CommandBase):
    """The ``forward`` and ``ports`` commands of L{Runner<pyro_reactor.client.cli.Runner>}."""

    async def do_forward(self) -> int:
        from pyro_reactor.client.forward import listenForward, parseForward  # noqa: PLC0415

        try:
            specs = [parseForward(text) for text in self.options.specs]
        except ValueError as error:
            raise UsageError(str(error)) from error

        def report(line: str) -> None:
            self.say(line)
            self.console.stdout.flush()

        for spec in specs:
            try:
                port = await listenForward(
                    self.reactor, spec, self.client.connectTCP(spec.guest), report
                )
            except Exception as error:
                raise AgentUnavailableError(
                    f"cannot listen on {spec}: {error}", "forward"
                ) from error
            address = port.getHost()
            report(f"forwarding {address.host}:{address.port} -> guest port {spec.guest}")
        await Deferred()  # until Ctrl-C stops the reactor
        return EXIT_OK

    async def do_ports(self) -> int:
        ports = await self.client.listPorts()
        if self.options.json:
            self.emit({"ports": ports})
            return EXIT_OK
        for entry in ports:
            host = entry.get("host", "")
            address = f"[{host}]" if ":" in str(host) else str(host)
            owner = f"{entry.get('command')} (pid {entry.get('pid')})" if entry.get("pid") else "-"
            self.say(f"{entry.get('family', ''):5} {address}:{entry.get('port')}  {owner}")
        return EXIT_OK
