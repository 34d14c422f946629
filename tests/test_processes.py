"""The process layer: children in their own session, and group signals that spare the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.system import processes, procfs
from pyro_reactor.system.processes import (
    groupAlive,
    sessionArgv,
    signalGroup,
    spawnInGroup,
    spawnInSession,
    terminateGroup,
)
from tests.helpers import alive, waitUntil

reactor: Any = _reactor


class _Recorder(ProcessProtocol):
    """Collects stdout and the end of a child."""

    def __init__(self) -> None:
        self.output = b""
        self.reason: Failure | None = None
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)

    async def end(self) -> Any:
        """Wait for the end; the exception (ProcessDone/ProcessTerminated) it ended with."""
        await self.ended
        assert self.reason is not None
        return self.reason.value


class SpawnInSessionTests(TestCase):
    spawn = staticmethod(spawnInSession)
    newSession = True

    def _spawn(self, argv: list[str], cwd: str | None = None) -> tuple[Any, _Recorder]:
        recorder = _Recorder()
        transport = self.spawn(reactor, recorder, argv, dict(os.environ), cwd=cwd)

        def reap() -> Deferred[None]:
            signalGroup(transport.pid, signal.SIGKILL)
            return recorder.ended

        self.addCleanup(reap)
        return transport, recorder

    async def test_childLeadsNewSessionAndGroup(self) -> None:
        """A spawned command leads its own process group, apart from the agent's (and its own
        session when one is asked for), so signalling that group reaches it."""
        transport, recorder = self._spawn(["sleep", "30"])
        pid = transport.pid
        self.assertEqual(os.getpgid(pid), pid)
        self.assertEqual(os.getsid(pid), pid if self.newSession else os.getsid(0))
        self.assertNotEqual(os.getpgid(pid), os.getpgrp())
        self.assertTrue(signalGroup(pid, signal.SIGTERM))
        ended = await recorder.end()
        self.assertIsInstance(ended, ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGTERM)

    async def test_workingDirectoryAndSession(self) -> None:
        """A working directory is entered (env --chdir once probed) in a new group/session."""
        processes.probeChdirProgram()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        script = 'echo "$PWD $(ps -o pgid= -p $$) $(ps -o sid= -p $$) $$"'
        _, recorder = self._spawn(["/bin/sh", "-c", script], cwd=str(directory))
        await recorder.ended
        where, pgid, sid, pid = recorder.output.decode().split()
        self.assertEqual(where, str(directory))
        self.assertEqual(pgid, pid)
        self.assertEqual(int(sid), int(pid) if self.newSession else os.getsid(0))

    async def test_workingDirectoryThroughFork(self) -> None:
        """Without env --chdir (or before the probe), the fork path does the same."""
        # Without coreutils' env --chdir, Twisted forks and the child calls setsid() itself.
        self.patch(processes, "chdirProgram", lambda: None)
        await self.test_workingDirectoryAndSession()

    async def test_programNameWithEqualsSign(self) -> None:
        """A program whose path contains `=` still runs in the given working directory as the
        leader of its own group."""
        # env --chdir would take "a=b/prog" for a variable: such a program goes the fork way.
        directory = Path(self.mktemp()).absolute()
        (directory / "a=b").mkdir(parents=True)
        program = directory / "a=b" / "prog"
        program.write_text('#!/bin/sh\necho "$PWD $(ps -o pgid= -p $$) $$"\n')
        program.chmod(0o755)
        _, recorder = self._spawn([str(program)], cwd=str(directory))
        await recorder.ended
        where, pgid, pid = recorder.output.decode().split()
        self.assertEqual(where, str(directory))
        self.assertEqual(pgid, pid)

    async def test_exitStatusIsTheProgramsOwn(self) -> None:
        """The exit status reported is the program's own, not that of any helper started in front
        of it."""
        _, recorder = self._spawn(["/bin/sh", "-c", "exit 7"])
        ended = await recorder.end()
        self.assertEqual(ended.exitCode, 7)

    def test_missingWorkingDirectoryRefused(self) -> None:
        """A working directory that does not exist is refused before anything is spawned."""
        with self.assertRaises(NotADirectoryError):
            spawnInSession(reactor, ProcessProtocol(), ["true"], {}, cwd="/nonexistent/dir")

    async def test_groupSignalReachesGrandchildren(self) -> None:
        """A signal to the command's group also reaches the children it started in the
        background, so none outlive it."""
        _, recorder = self._spawn(["/bin/sh", "-c", "sleep 30 & echo $!; wait"])
        self.assertTrue(await waitUntil(lambda: recorder.output.endswith(b"\n")))
        grandchild = int(recorder.output)
        self.assertTrue(alive(grandchild))
        pgid = os.getpgid(grandchild)
        self.assertTrue(signalGroup(pgid, signal.SIGKILL))
        await recorder.ended
        self.assertTrue(await waitUntil(lambda: not alive(grandchild)))
        self.assertTrue(await waitUntil(lambda: not groupAlive(pgid)))

    async def test_terminateGroupKillsWhatIgnoresSigterm(self) -> None:
        """Terminating a group that ignores SIGTERM sends SIGKILL once the grace period passes,
        and a group already gone needs no terminating."""
        # "trap '' TERM" makes the shell and its sleep ignore SIGTERM: only SIGKILL ends them.
        clock = Clock()
        transport, recorder = self._spawn(["/bin/sh", "-c", "trap '' TERM; sleep 30; :"])
        await deferLater(reactor, 0.2)
        killer = terminateGroup(clock, transport.pid, grace=2.0)
        self.assertIsNotNone(killer)
        await deferLater(reactor, 0.2)
        self.assertTrue(groupAlive(transport.pid))
        clock.advance(2.0)
        ended = await recorder.end()
        self.assertEqual(ended.signal, signal.SIGKILL)
        self.assertIsNone(terminateGroup(clock, transport.pid))


class _SpawnRecorder(MemoryReactor):
    """A fake reactor that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[str, list[str], dict[str, str]]] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: dict[str, str], **kw: Any
    ) -> object:
        self.spawned.append((executable, args, env))
        return object()


class SpawnInGroupTests(SpawnInSessionTests):
    """The same for a child that leads a new process group in the agent's session."""

    spawn = staticmethod(spawnInGroup)
    newSession = False


class FallbackTests(TestCase):
    """Reactors other than Twisted's POSIX ones get a trampoline in front of the argv."""

    def test_otherReactorsGetSessionArgv(self) -> None:
        """On a reactor other than Twisted's POSIX one, the command is spawned behind a session
        trampoline, with its environment unchanged."""
        memory = _SpawnRecorder()
        spawnInSession(memory, ProcessProtocol(), ["sh", "-c", "true"], {"A": "1"})
        [(executable, argv, env)] = memory.spawned
        self.assertEqual(argv, sessionArgv(["sh", "-c", "true"]))
        self.assertEqual(executable, argv[0])
        self.assertEqual(env, {"A": "1"})

    def _runDirect(self, argv: list[str], cwd: str | None = None) -> list[str]:
        script = 'echo "$PWD $(ps -o pgid= -p $$) $(ps -o sid= -p $$) $$"'
        completed = subprocess.run(
            [*sessionArgv([*argv, script], cwd)],
            capture_output=True,
            check=True,
            text=True,
            timeout=20,
        )
        return completed.stdout.split()

    def test_setsidProgram(self) -> None:
        """When util-linux `setsid` is installed, the trampoline uses it and the command leads
        its own session and group."""
        if processes._setsidProgram() is None:
            self.skipTest("util-linux setsid is not installed")
        argv = sessionArgv(["/bin/sh", "-c", "true"])
        self.assertTrue(argv[0].endswith("setsid"))
        _, pgid, sid, pid = self._runDirect(["/bin/sh", "-c"])
        self.assertEqual((pgid, sid), (pid, pid))

    def test_pythonTrampoline(self) -> None:
        """Without `setsid`, a Python trampoline starts the command in its own session and group,
        in the given working directory."""
        self.patch(processes, "_setsidProgram", lambda: None)
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.assertEqual(sessionArgv(["x"])[0], sys.executable)
        where, pgid, sid, pid = self._runDirect(["/bin/sh", "-c"], str(directory))
        self.assertEqual(where, str(directory))
        self.assertEqual((pgid, sid), (pid, pid))


class SignalGroupTests(SynchronousTestCase):
    def test_refusesTheAgentsOwnGroup(self) -> None:
        """Signals are never sent to the agent's own group, to init, or to a zero, negative or
        missing group id."""
        # If this were sent, the test run itself would stop.
        self.assertFalse(signalGroup(os.getpgrp(), signal.SIGSTOP))
        self.assertFalse(signalGroup(0, signal.SIGSTOP))
        self.assertFalse(signalGroup(1, 0))
        self.assertFalse(signalGroup(-5, 0))
        self.assertFalse(signalGroup(None, 0))
        self.flushLoggedErrors()

    def test_goneGroup(self) -> None:
        """Signalling or terminating a group that has already exited does nothing and reports
        that it is gone."""
        child = subprocess.Popen(["true"], start_new_session=True)
        child.wait()
        self.assertFalse(signalGroup(child.pid, signal.SIGTERM))
        self.assertFalse(groupAlive(child.pid))
        self.assertIsNone(terminateGroup(Clock(), child.pid))

    def test_groupAliveSeesAMember(self) -> None:
        """A group counts as alive while any of its members runs, and as gone once it has exited."""
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        try:
            self.assertTrue(groupAlive(child.pid))
        finally:
            child.kill()
            child.wait()
        self.assertFalse(groupAlive(child.pid))


class ProcStatTests(SynchronousTestCase):
    """The one ``/proc/<pid>/stat`` parser, and the walks built on it."""

    def test_parsesAWeirdCommandName(self) -> None:
        """A command name holding spaces and parentheses does not shift the fields."""
        raw = b"42 (a) b (c) S 1 40 39 0 -1 4194560 " + b"0 " * 12 + b"12345 0 0\n"
        info = processes.parseProcStat(42, raw)
        assert info is not None
        self.assertEqual(
            (info.state, info.ppid, info.pgid, info.session, info.startTicks),
            ("S", 1, 40, 39, 12345),
        )
        self.assertFalse(info.zombie)
        self.assertIsNone(processes.parseProcStat(42, b"42 (short) S 1"))

    def test_readsItself(self) -> None:
        """The agent's own entry: its pid, group and session as the os module says."""
        info = processes.readProcStat(os.getpid())
        assert info is not None
        self.assertEqual(
            (info.ppid, info.pgid, info.session), (os.getppid(), os.getpgrp(), os.getsid(0))
        )
        self.assertIsNone(processes.readProcStat(2**22 + 1))

    def test_descendantsIncludeThoseThatLeftTheGroup(self) -> None:
        """A ``setsid`` grandchild is found as a descendant though not in the group."""
        child = subprocess.Popen(
            ["/bin/sh", "-c", "setsid sleep 30 & echo $!; wait"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        self.addCleanup(os.kill, grandchild, signal.SIGKILL)
        found = {info.pid for info in processes.descendantsOf([child.pid])}
        self.assertIn(grandchild, found)

    def test_descendantsWithoutProcChildren(self) -> None:
        """Where the kernel has no ``task/*/children``, one scan of ``/proc`` finds them."""
        self.patch(procfs, "childrenOf", lambda pid, procRoot=None: None)
        child = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & wait"], start_new_session=True)
        self.addCleanup(child.wait)
        self.addCleanup(os.killpg, child.pid, signal.SIGKILL)
        deadline = 100
        found: set[int] = set()
        while not found and deadline:
            found = {info.pid for info in processes.descendantsOf([child.pid])}
            deadline -= 1
            if not found:
                import time

                time.sleep(0.05)
        self.assertEqual(len(found), 1)

    def test_exitCodePrecedence(self) -> None:
        """Exit status first, else minus the signal, ``ProcessDone`` 0, anything else -1."""
        from twisted.internet.error import ProcessDone

        exitCodeOf, processEndOf = processes.exitCodeOf, processes.processEndOf
        self.assertEqual(exitCodeOf(Failure(ProcessDone(0))), 0)
        self.assertEqual(exitCodeOf(Failure(ProcessTerminated(exitCode=3))), 3)
        self.assertEqual(exitCodeOf(Failure(ProcessTerminated(signal=9))), -9)
        self.assertEqual(exitCodeOf(Failure(ProcessTerminated(exitCode=2, signal=9))), 2)
        self.assertEqual(exitCodeOf(Failure(ValueError())), -1)
        self.assertEqual(processEndOf(Failure(ProcessTerminated(signal=15))).exitCode, None)
        self.assertEqual(processEndOf(Failure(ProcessTerminated(signal=15))).signal, 15)
