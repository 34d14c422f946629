"""What a start hands the service machine: its readiness probe and its spawned runner.

L{probeFactory} wires a start's readiness check into L{ProbeMachine}s (one per run, built by
the service machine when the runner has started); L{spawnRunner} spawns the runner in its
session, in the directory the start opened and, where the agent has them, in a cgroup unit of
its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyro_reactor.capabilities.services._machine import ProbeFactory, ServiceInput
from pyro_reactor.capabilities.services._probe_machine import ProbeCore, ProbeInput, ProbeMachine
from pyro_reactor.capabilities.services._runner import DIRECTORY_FD
from pyro_reactor.capabilities.services.handles import releasingOnExit
from pyro_reactor.capabilities.services.records import ServiceFiles
from pyro_reactor.capabilities.services.runners import ChildProcess, RunnerProtocol, ServiceProcess
from pyro_reactor.capabilities.services.units import processStat
from pyro_reactor.system.processes import spawnInSession
from pyro_reactor.system.unitcgroups import CgroupUnit, unitCgroups
from pyro_reactor.system.workspace import WorkingDirectory

if TYPE_CHECKING:  # the actions module imports the registry, which imports this one
    from pyro_reactor.capabilities.services.actions import StartSpec
    from pyro_reactor.context import AgentContext


def probeFactory(context: AgentContext, spec: StartSpec) -> ProbeFactory | None:
    """What builds a run's readiness probe machine from a start's ``readiness``, if any."""
    if spec.probe is None:
        return None
    check = spec.probe.check(
        context.reactor,
        workspace=context.workspace,
        inThread=context.inThread,
        cwd=spec.cwd,
        env=spec.env,
    )

    def makeProbe(onReady: Any, onTimeout: Any) -> ProbeInput:
        return ProbeMachine(
            ProbeCore(
                clock=context.reactor,
                check=check,
                interval=spec.interval,
                timeout=float(spec.readyTimeout),
                onReady=onReady,
                onTimeout=onTimeout,
            )
        )

    return makeProbe


def spawnRunner(
    reactor: Any,
    files: ServiceFiles,
    directory: WorkingDirectory,
    env: Mapping[str, str],
    machine: ServiceInput,
) -> ServiceProcess:
    """Start the runner, handing it the directory it runs in; C{directory} is let go.

    The runner gets the opened directory as its descriptor L{DIRECTORY_FD} and enters it
    itself (``fchdir``): the start never depends on this agent still being alive (a path
    through ``/proc/<agent pid>/fd`` would stop working the moment the agent dies, and an
    agent killed just after answering would leave a service that never started).
    """
    protocol = RunnerProtocol(reactor, machine._exited)
    # The runner writes the command's output to the log files itself; its own standard
    # streams go nowhere, so the service never depends on this agent's pipes.
    try:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            held = os.open(directory.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(null)
            raise
    finally:
        directory.close()
    cgroups = unitCgroups()
    cgroup = None if cgroups is None else cgroups.create("service")
    inside = False

    def spawn() -> Any:
        return spawnInSession(
            reactor,
            protocol,
            [str(files.runner)],
            env,
            childFDs={0: null, 1: null, 2: null, DIRECTORY_FD: held},
        )

    try:
        if cgroups is not None and cgroup is not None:
            transport, inside = cgroups.spawnIn(cgroup, spawn)
        else:
            transport = spawn()
    except BaseException:
        if cgroups is not None and cgroup is not None:
            cgroups.release(cgroup)
        raise
    finally:
        os.close(null)
        os.close(held)
        protocol.spawning = False
    unit: CgroupUnit | None = None
    if cgroups is not None and cgroup is not None:
        if inside:
            unit = CgroupUnit(cgroup, cgroups)
            protocol.onExit = releasingOnExit(unit, machine._exited)
        else:
            cgroups.release(cgroup)
    pid = protocol.pid if protocol.pid is not None else transport.pid
    assert pid is not None
    stat = processStat(pid)
    return ChildProcess(reactor, pid, None if stat is None else stat[1], protocol, unit)


__all__ = ["probeFactory", "spawnRunner"]
