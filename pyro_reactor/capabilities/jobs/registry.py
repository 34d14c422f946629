"""The jobs an agent knows: starting them, taking them back after a restart, following them.

L{Jobs} is the object the actions talk to (and the agent's service for jobs). Each job is a
L{Job}: its machine, its record, its output (L{JobOutput}) and, while this agent is the one
that started it, its runner process (stdin goes through it). The runner (``_runner.py``) is
what outlives the agent: it records the exit status and kills what the command left behind.
"""

from __future__ import annotations

import marshal
import os
import secrets
import signal as _signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore, succeed
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pyro_reactor.capabilities.jobs import records
from pyro_reactor.capabilities.jobs._machine import JobCore, JobInput, JobMachine
from pyro_reactor.capabilities.jobs.follow import POLL_INTERVAL, OutputFollower
from pyro_reactor.capabilities.jobs.output import JobOutput
from pyro_reactor.capabilities.jobs.stdin import StdinQueue
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.cgroups import Cgroup, CgroupTree, LimitError, Limits, lowerOwnOomScore
from pyro_reactor.system.processes import signalGroup, spawnInSession
from pyro_reactor.system.timeslices import TimeSlices
from pyro_reactor.system.workspace import WorkingDirectory

log = Logger(namespace="pyro_reactor.capabilities.jobs")

RUNNER = Path(__file__).with_name("_runner.py")
#: Seconds between two checks of the output files where inotify is missing, and of a
#: re-adopted runner without pidfd.
#: Runners starting at once. Each is a Python interpreter starting (tens of ms of CPU): 200 at
#: once took the two cores from the agent for a second (a ping waited 0.9-1.8 s); the rest
#: wait their turn, and only their start_job answers wait with them.
LAUNCHING_RUNNERS = 4
#: Signal numbers and their names without ``SIG`` ("TERM"), for the runner (which does not
#: import ``signal``: see its docstring).
SIGNAL_NAMES = {number.value: number.name[3:] for number in _signal.Signals}
#: How long to wait for a killed cgroup to empty before giving up removing it.
CGROUP_REMOVE_TRIES = 20


@dataclass
class JobSpec:
    """A checked ``start_job`` request."""

    jobId: str
    argv: list[str]
    shown: dict[str, Any]
    cwd: str
    env: dict[str, str]
    stdin: bool
    timeout: float | None
    limits: Limits


def processStartTicks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class _RunnerProtocol(ProcessProtocol):
    """The runner as our child: its pid report (fd 4), its exit, the job's stdin (fd 0)."""

    def __init__(self, job: Job, directory: WorkingDirectory, spec: bytes) -> None:
        self.job = job
        self.directory: WorkingDirectory | None = directory
        self.spec = spec
        self.report = b""
        self.exited = False
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.writeToChild(3, self.spec)
        self.transport.closeChildFD(3)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 4:
            return
        self.report += data
        if b"\n" in self.report:
            line = self.report.split(b"\n", 1)[0]
            self.releaseDirectory()
            try:
                pid = int(line)
            except ValueError:
                return
            self.job.machine._started(pid)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            # The job closed its stdin (or ended): what it was sent and never read is dropped.
            self.job.stdinGone()

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self.releaseDirectory()
        self.job.stdinGone()
        self.job.runner = None
        # Queued, not called: runners reaped together (one SIGCHLD) are handled a few at a
        # time, with the reactor's other connections served in between.
        self.job.jobs.slices.run(self, self.job.machine._runnerExited)

    def releaseDirectory(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            directory.close()


@implementer(IReadDescriptor)
class PidWatch:
    """A runner started by an earlier agent, watched through a pidfd (or polled)."""

    def __init__(self, reactor: Any, pid: int, ticks: int | None, onExit: Callable[[], None]):
        self.reactor = reactor
        self.pid = pid
        self.ticks = ticks
        self.onExit: Callable[[], None] | None = onExit
        self.pidfd: int | None = None
        self.poll: IDelayedCall | None = None

    def alive(self) -> bool:
        ticks = processStartTicks(self.pid)
        return ticks is not None and (self.ticks is None or ticks == self.ticks)

    def start(self) -> None:
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        if not self.alive():
            self._ended()
        elif self.pidfd is not None:
            self.reactor.addReader(self)
        else:
            self.poll = self.reactor.callLater(POLL_INTERVAL, self._check)

    def _check(self) -> None:
        self.poll = None
        if self.alive():
            self.poll = self.reactor.callLater(POLL_INTERVAL, self._check)
        else:
            self._ended()

    def fileno(self) -> int:
        return -1 if self.pidfd is None else self.pidfd

    def doRead(self) -> None:
        self._ended()

    def connectionLost(self, reason: Failure) -> None:
        self.stop()

    def logPrefix(self) -> str:
        return f"job-runner-{self.pid}"

    def stop(self) -> None:
        if self.pidfd is not None:
            self.reactor.removeReader(self)
            os.close(self.pidfd)
            self.pidfd = None
        if self.poll is not None and self.poll.active():
            self.poll.cancel()
        self.poll = None

    def _ended(self) -> None:
        self.stop()
        onExit, self.onExit = self.onExit, None
        if onExit is not None:
            onExit()


@dataclass
class Job:
    """One job: what the actions and the streams need of it."""

    jobs: Jobs
    files: records.JobFiles
    record: dict[str, Any]
    output: JobOutput
    cgroup: Cgroup | None
    stdin: str
    machine: JobInput = field(init=False)
    runner: Any = None
    #: What hosts sent to the job's stdin and it has not read yet (while the pipe is open).
    stdinQueue: StdinQueue | None = None
    watch: PidWatch | None = None
    #: The job's file work (record writes, the final removal) runs one at a time, in order:
    #: the pool's threads would otherwise let a late record write re-create removed files.
    fileWork: DeferredLock = field(default_factory=DeferredLock)

    @property
    def jobId(self) -> str:
        return self.files.jobId

    @property
    def reactor(self) -> Any:
        return self.jobs.reactor

    def exitInfo(self) -> dict[str, Any] | None:
        if self.machine.state() != "exited":
            return None
        record = self.record
        return {
            "exit_code": record.get("exit_code"),
            "signal": record.get("signal"),
            "timed_out": bool(record.get("timed_out")),
            "oom_killed": bool(record.get("oom_killed")),
            "ended_at": record.get("ended_at"),
            "duration_ms": record.get("duration_ms"),
            "stdout_bytes": self.output.streams["stdout"].size,
            "stderr_bytes": self.output.streams["stderr"].size,
        }

    def status(self) -> dict[str, Any]:
        record = self.record
        state = self.machine.state()
        usage = record.get("usage")
        if state == "running" and self.cgroup is not None:
            usage = self.cgroup.usage()
        answer: dict[str, Any] = {"job_id": self.jobId}
        for key in ("command", "argv"):
            if key in record:
                answer[key] = record[key]
        answer.update(
            cwd=record.get("cwd"),
            state=state,
            pid=record.get("pid"),
            started_at=record.get("started_at"),
            ended_at=record.get("ended_at"),
            exit_code=record.get("exit_code"),
            signal=record.get("signal"),
            timed_out=bool(record.get("timed_out")),
            oom_killed=bool(record.get("oom_killed")),
            stdout_bytes=self.output.streams["stdout"].size,
            stderr_bytes=self.output.streams["stderr"].size,
            stdin=self.stdin,
            usage=usage if self.cgroup is not None or usage else None,
            cgroup=bool(record.get("cgroup")),
            limits_applied=record.get("limits_applied", {}),
        )
        return answer

    # -- what the machine asks of the world ----------------------------------------------

    def deliver(self, signum: int) -> bool:
        if self.cgroup is not None and self.cgroup.exists():
            self.cgroup.signal(signum)
            return True
        pid = self.record.get("pid")
        if pid is not None and signalGroup(pid, signum):
            return True
        return self.runner is not None or self.watch is not None

    def started(self, pid: int) -> None:
        self.record["pid"] = pid
        self.jobs.save(self)

    def collect(self) -> Deferred[dict[str, Any]]:
        cgroup, files = self.cgroup, self.files

        def gather() -> dict[str, Any]:
            outcome = records.readExit(files) or {
                "exit_code": None,
                "signal": None,
                "timed_out": False,
                "ended_at": time.time(),
            }
            if cgroup is not None:
                outcome["oom_killed"] = cgroup.oomKilled()
                outcome["usage"] = cgroup.usage()
                cgroup.kill()  # a runner killed itself leaves no survivor to chance
            return outcome

        return (
            self.jobs.context.inThread(gather)
            .addCallback(self._inSlice)
            .addCallback(self._collected)
        )

    def _inSlice(self, outcome: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """C{outcome}, once the jobs' time slices get to it: 40 jobs ending on the same second
        are wound up (cgroups removed, records saved, streams ended) a few per reactor turn."""
        turn: Deferred[dict[str, Any]] = Deferred()
        self.jobs.slices.run(("collected", self.jobId), lambda: turn.callback(outcome))
        return turn

    def _collected(self, outcome: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.cgroup is not None:
            self.jobs.removeCgroup(self.cgroup)
        return self.output.settled().addCallback(lambda _: outcome)

    def ended(self, outcome: dict[str, Any]) -> None:
        record = self.record
        ended = float(outcome.get("ended_at") or time.time())
        started = float(record.get("started_at") or ended)
        record.update(
            state="exited",
            exit_code=outcome.get("exit_code"),
            signal=outcome.get("signal"),
            timed_out=bool(outcome.get("timed_out")),
            oom_killed=bool(outcome.get("oom_killed")),
            ended_at=ended,
            duration_ms=max(0, round((ended - started) * 1000)),
            usage=outcome.get("usage"),
        )
        self.stdinGone()
        self.reactor.callLater(0, self.output.notify)
        self.jobs.save(self)
        log.info(
            "job {job_id} ended: exit {exit_code}, signal {signal}",
            job_id=self.jobId,
            exit_code=record["exit_code"],
            signal=record["signal"],
        )

    def forget(self) -> None:
        self.stdinGone()
        self.output.close()
        self.jobs.forget(self)

    # -- stdin ---------------------------------------------------------------------------

    def _openStdin(self) -> StdinQueue:
        if self.stdin == "none":
            raise ActionError(f"job {self.jobId!r} has no stdin (start it with stdin: true)")
        if self.machine.state() != "running":
            raise ActionError(f"job {self.jobId!r} has ended")
        queue = self.stdinQueue
        if self.stdin == "closed" or self.runner is None or queue is None:
            raise ActionError(f"job {self.jobId!r} has its stdin closed")
        return queue

    def write(self, data: bytes, close: bool) -> int:
        """Queue all of ``data`` for the job's stdin or refuse it whole (``write_job``)."""
        queue = self._openStdin()
        queue.write(data)
        if close:
            queue.close()
            self.stdin = "closed"
        return len(data)

    def offerStdin(self, data: bytes) -> int:
        """Queue what fits of ``data`` (an attach stream); the bytes taken."""
        return self._openStdin().offer(data)

    def whenStdinRoom(self) -> Deferred[None]:
        """Fires when the stdin queue has room again (or is gone)."""
        queue = self.stdinQueue
        return succeed(None) if queue is None else queue.whenRoom()

    def stdinGone(self) -> None:
        """The pipe is closed (by the job, its end, or us): drop what is queued."""
        if self.stdin == "open":
            self.stdin = "closed"
        queue, self.stdinQueue = self.stdinQueue, None
        if queue is not None:
            queue.drop()


class Jobs(Service):
    """Every job of this agent, by id; re-adopts the jobs on disk at start-up."""

    def __init__(self, context: AgentContext, cgroups: CgroupTree | bool | None = True) -> None:
        self.context = context
        self.reactor = context.reactor
        self.root = context.config.stateDir / "pyro-jobs"
        self.outputLimit = context.config.jobOutputBytes
        self.maxJobs = context.config.maxJobs
        self.jobs: dict[str, Job] = {}
        self._launching = DeferredSemaphore(LAUNCHING_RUNNERS)
        self._cgroupsWanted = cgroups
        self.cgroups: CgroupTree | None = cgroups if isinstance(cgroups, CgroupTree) else None
        #: Output changes and runner exits, handled a slice of reactor time per turn.
        self.slices = TimeSlices(self.reactor)
        self.follower = OutputFollower(
            self.reactor, self.root, lambda: list(self.jobs), self._outputChanged, self.slices
        )

    # -- the service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if self._cgroupsWanted is True:
            self.cgroups = CgroupTree.detect()
        lowerOwnOomScore()
        for record in records.readRecords(self.root):
            try:
                self._adopt(record)
            except Exception:
                log.failure("cannot take back job {job_id}", job_id=record.get("job_id"))
        self.follower.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.follower.stop()
        self.slices.cancel()
        for job in self.jobs.values():
            if job.watch is not None:
                job.watch.stop()
            job.stdinGone()
            if job.runner is not None:
                # The job runs on without us; our ends of its pipes go (stdin sees EOF, as
                # it would if the agent died).
                job.runner.loseConnection()
            job.output.close()
        return None

    def _outputChanged(self, jobId: str) -> None:
        job = self.jobs.get(jobId)
        if job is not None:
            job.output.refresh()

    @property
    def cgroupsWork(self) -> bool:
        return self.cgroups is not None

    # -- records -------------------------------------------------------------------------

    def save(self, job: Job) -> None:
        record = dict(job.record)

        def failed(failure: Failure) -> None:
            log.failure("cannot write the record of job {job_id}", failure, job_id=job.jobId)

        written: Deferred[None] = job.fileWork.run(
            self.context.inThread, records.writeRecord, job.files, record
        )
        written.addErrback(failed)

    def forget(self, job: Job) -> None:
        if self.jobs.get(job.jobId) is job:
            del self.jobs[job.jobId]
        removed: Deferred[None] = job.fileWork.run(
            self.context.inThread, records.removeFiles, job.files
        )
        removed.addErrback(lambda f: log.failure("cannot remove job {job_id}", f, job_id=job.jobId))

    def removeCgroup(self, cgroup: Cgroup, tries: int = CGROUP_REMOVE_TRIES) -> None:
        """Remove a job's cgroup once its killed processes are gone (retrying ~15 s)."""
        if cgroup.remove() or tries <= 0:
            return
        delay = min(0.01 * 2 ** (CGROUP_REMOVE_TRIES - tries), 1.0)
        self.reactor.callLater(delay, self.removeCgroup, cgroup, tries - 1)

    # -- jobs ----------------------------------------------------------------------------

    def _makeJob(
        self, files: records.JobFiles, record: dict[str, Any], cgroup: Cgroup | None, stdin: str
    ) -> Job:
        output = JobOutput(
            {s: files.output(s) for s in records.STREAMS}, self.outputLimit, self.context.inThread
        )
        job = Job(self, files, record, output, cgroup, stdin)
        job.machine = JobMachine(
            JobCore(
                clock=self.reactor,
                launch=lambda: None,
                collect=job.collect,
                deliver=job.deliver,
                started=job.started,
                ended=job.ended,
                forget=job.forget,
            )
        )
        return job

    def _adopt(self, record: dict[str, Any]) -> None:
        files = records.JobFiles(self.root, record["job_id"])
        cgroupPath = record.get("cgroup_path")
        cgroup = None
        if cgroupPath and self.cgroups is not None:
            cgroup = self.cgroups.adopt(cgroupPath)
        job = self._makeJob(files, record, cgroup, "none" if not record.get("stdin") else "closed")
        if record.get("stdin") is False or record.get("stdin") == "none":
            job.stdin = "none"
        self.jobs[job.jobId] = job
        if record.get("state") == "exited":
            job.machine.restore()
            return
        runnerPid = record.get("runner_pid")
        if isinstance(runnerPid, int):
            watch = PidWatch(
                self.reactor, runnerPid, record.get("runner_start_ticks"), job.machine._runnerExited
            )
            if watch.alive():
                job.watch = watch
                job.machine.adopt()
                watch.start()
                return
        job.machine.adoptEnded()

    def get(self, jobId: str) -> Job:
        job = self.jobs.get(jobId)
        if job is None:
            raise ActionError(f"job {jobId!r} does not exist")
        return job

    def _makeRoom(self) -> None:
        if len(self.jobs) < self.maxJobs:
            return
        for job in list(self.jobs.values()):
            if job.machine.state() == "exited":
                job.machine.remove()
                if len(self.jobs) < self.maxJobs:
                    return
        raise ActionError(
            f"too many jobs: {self.maxJobs} are running (remove ended jobs or wait for one)"
        )

    def start(self, spec: JobSpec) -> Deferred[Job]:
        """Start a job; fires with it once its command runs (or has already ended)."""
        if spec.jobId in self.jobs:
            raise ActionError(f"job {spec.jobId!r} already exists")
        if spec.limits.asked() and self.cgroups is None:
            raise ActionError("limits need cgroup v2, which this guest does not provide")
        self._makeRoom()
        files = records.JobFiles(self.root, spec.jobId)
        cgroup = None
        limitsApplied: dict[str, Any] = {}
        if self.cgroups is not None:
            try:
                cgroup = self.cgroups.create("job")
            except OSError as error:
                raise ActionError(f"cannot create the job's cgroup: {error}") from None
            try:
                limitsApplied = cgroup.applyLimits(spec.limits)
            except LimitError as error:
                cgroup.remove()
                raise ActionError(str(error)) from None
        record: dict[str, Any] = {"job_id": spec.jobId, **spec.shown, "cwd": spec.cwd}
        record.update(
            state="running",
            started_at=time.time(),
            pid=None,
            stdin=spec.stdin,
            cgroup=cgroup is not None,
            cgroup_path=None if cgroup is None else str(cgroup.path),
            limits_applied=limitsApplied,
            timeout_seconds=spec.timeout,
            ended_at=None,
            exit_code=None,
            signal=None,
            timed_out=False,
            oom_killed=False,
            usage=None,
        )
        # Reserve the id while the files are prepared.
        placeholder: Any = object()
        self.jobs[spec.jobId] = placeholder

        def prepare() -> tuple[WorkingDirectory, dict[str, int]]:
            directory = self.context.workspace.openWorkingDirectory(spec.cwd)
            try:
                fds = records.prepareOutput(files)
            except BaseException:
                directory.close()
                raise
            return directory, fds

        def prepared(result: tuple[WorkingDirectory, dict[str, int]]) -> Deferred[Job]:
            directory, fds = result
            try:
                job = self._makeJob(files, record, cgroup, "open" if spec.stdin else "none")
                self.jobs[spec.jobId] = job
                self._spawn(job, spec, directory, fds)
            except BaseException as error:
                self.jobs.pop(spec.jobId, None)
                directory.close()
                if cgroup is not None:
                    cgroup.remove()
                if isinstance(error, OSError):
                    raise ActionError(
                        f"cannot start job {spec.jobId!r}: {error.strerror or error}"
                    ) from None
                raise
            finally:
                for fd in fds.values():
                    os.close(fd)
            self.save(job)
            log.info("job {job_id} started", job_id=spec.jobId)
            return job.machine.whenStarted().addCallback(lambda _: job)

        def failed(failure: Failure) -> Failure:
            if self.jobs.get(spec.jobId) is placeholder:
                del self.jobs[spec.jobId]
            if cgroup is not None:
                cgroup.remove()
            if failure.check(OSError):
                error = failure.value
                raise ActionError(f"cannot start job {spec.jobId!r}: {error}")
            return failure

        def queued(result: tuple[WorkingDirectory, dict[str, int]]) -> Deferred[Job]:
            launched: Deferred[Job] = self._launching.run(prepared, result)
            return launched

        started: Deferred[tuple[WorkingDirectory, dict[str, int]]] = self.context.inThread(prepare)
        return started.addCallbacks(queued, failed)

    def _spawn(
        self, job: Job, spec: JobSpec, directory: WorkingDirectory, fds: dict[str, int]
    ) -> None:
        payload = {
            "argv": spec.argv,
            "env": spec.env,
            "cgroup_procs": None if job.cgroup is None else str(job.cgroup.procs),
            "timeout_seconds": spec.timeout,
            "exit_path": str(job.files.exit),
            "signal_names": SIGNAL_NAMES,
        }
        protocol = _RunnerProtocol(job, directory, marshal.dumps(payload))
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        childFDs: dict[int, int | str] = {
            0: "w" if spec.stdin else null,
            1: fds["stdout"],
            2: fds["stderr"],
            3: "w",
            4: "r",
        }
        env = {key: value for key, value in os.environ.items() if key in ("PATH", "LANG")}
        try:
            transport = spawnInSession(
                self.reactor,
                protocol,
                [sys.executable, "-I", "-S", str(RUNNER)],
                env,
                cwd=directory.path,
                childFDs=childFDs,
            )
        except BaseException:
            protocol.directory = None
            raise
        finally:
            os.close(null)
        pid = protocol.pid if protocol.pid is not None else transport.pid
        job.record["runner_pid"] = pid
        job.record["runner_start_ticks"] = None if pid is None else processStartTicks(pid)
        if not protocol.exited:
            job.runner = transport
            if spec.stdin:
                job.stdinQueue = StdinQueue(
                    job.jobId,
                    transport,
                    self.reactor,
                    self.context.budget.reserve(0, f"stdin queued for job {job.jobId!r}"),
                )
        job.machine.start()

    def signal(self, job: Job, signum: int) -> bool:
        return job.machine.signal(signum)

    def freeze(self) -> list[str]:
        """Freeze every running job's cgroup (for snapshots); the ids frozen."""
        frozen = []
        for job in self.jobs.values():
            running = job.machine.state() == "running"
            if running and job.cgroup is not None and job.cgroup.freeze():
                frozen.append(job.jobId)
        return frozen

    def thaw(self) -> list[str]:
        thawed = []
        for job in self.jobs.values():
            if job.cgroup is not None and job.cgroup.exists() and job.cgroup.thaw():
                thawed.append(job.jobId)
        return thawed

    def remove(self, job: Job, force: bool) -> Deferred[None]:
        if job.machine.state() == "exited":
            job.machine.remove()
            return succeed(None)
        if not force:
            raise ActionError(f"job {job.jobId!r} is running (use force to kill and remove it)")
        job.machine.signal(_signal.SIGKILL)

        def forget(_: None) -> None:
            job.machine.remove()

        return job.machine.whenEnded().addCallback(forget)


def newJobId() -> str:
    return "job-" + secrets.token_hex(8)


__all__ = ["Job", "JobSpec", "Jobs", "newJobId"]
