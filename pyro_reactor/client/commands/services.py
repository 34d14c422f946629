"""The ``service`` command: start (with a readiness check), status, stop, logs, list."""

from __future__ import annotations

import json

from pyro_reactor.client.api import (
    commandReadiness,
    fileReadiness,
    httpReadiness,
    tcpReadiness,
)
from pyro_reactor.client.commands.base import EXIT_AGENT_ERROR, EXIT_OK, CommandBase
from pyro_reactor.client.commands.output import _serviceLine
from pyro_reactor.client.commands.parser import _command, _environment
from pyro_reactor.client.results import ServiceInfo


class ServiceCommands(CommandBase):
    """The ``service`` command of L{Runner<pyro_reactor.client.cli.Runner>}."""

    async def do_service(self) -> int:
        action = self.options.service_command
        name: str = getattr(self.options, "name", "")
        if action == "start":
            options = self.options
            readiness = (
                fileReadiness(options.ready_file)
                if options.ready_file
                else tcpReadiness(options.ready_tcp)
                if options.ready_tcp
                else httpReadiness(options.ready_http)
                if options.ready_http
                else commandReadiness(options.ready_command)
                if options.ready_command
                else None
            )
            info = await self.client.startService(
                name,
                _command(options.words),
                cwd=options.cwd,
                readiness=readiness,
                readyTimeoutSeconds=options.ready_timeout,
                readyIntervalMs=options.ready_interval,
                env=_environment(options.env),
            )
            self._showService(info)
            return EXIT_OK if info.state == "running" else EXIT_AGENT_ERROR
        if action == "status":
            self._showService(await self.client.statusService(name))
        elif action == "stop":
            self._showService(await self.client.stopService(name))
        elif action == "list":
            services = await self.client.listServices()
            for service in services:
                if self.options.json:
                    self.emit(service.raw)
                else:
                    self.say(_serviceLine(service))
        elif action == "logs":
            logs = await self.client.logsService(name, self.options.tail)
            if self.options.json:
                self.emit(logs.raw)
            else:
                self.console.stdout.write(logs.stdout)
                self.console.stderr.write(logs.stderr)
        return EXIT_OK

    def _showService(self, info: ServiceInfo) -> None:
        if self.options.json:
            self.emit(info.raw)
            return
        self.say(_serviceLine(info))
        for key in ("command", "cwd", "readiness", "stop_reason", "exit_code"):
            value = info.raw.get(key)
            if value is not None:
                self.say(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")
