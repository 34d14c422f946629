"""The jobs an agent knows: starting them, taking them back after a restart, following them.

L{Jobs} is the object the actions talk to (and the agent's service for jobs). Each job is a
L{Job} (``job.py``): its machine, its record, its output (L{JobOutput}) and, while this agent is
the one that started it, its runner process (stdin goes through it; ``runners.py``). The runner
(``_runner.py``) is what outlives the agent: it records the exit status and kills what the
command left behind.
"""

from __future__ import annotations

import marshal
import os
import secrets
import signal as _signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyro_reactor.capabilities.jobs import records
from pyro_reactor.capabilities.jobs._machine import JobCore, JobMachine
from pyro_reactor.capabilities.jobs.follow import OutputFollower
from pyro_reactor.capabilities.jobs.job import Job
from pyro_reactor.capabilities.jobs.output import JobOutput
from pyro_reactor.capabilities.jobs.runners import (
    LAUNCHING_RUNNERS,
    RUNNER,
    SIGNAL_NAMES,
    PidWatch,
    _RunnerProtocol,
    processStartTicks,
)
from pyro_reactor.capabilities.jobs.stdin import StdinQueue
from pyro_reactor.context import AgentContext
from pyro_reactor.errors import ActionError
from pyro_reactor.system.cgroups import Cgroup, CgroupTree, LimitError, Limits, lowerOwnOomScore
from pyro_reactor.system.processes import spawnInSession
from pyro_reactor.system.timeslices import TimeSlices
from pyro_reactor.system.workspace import WorkingDirectory

log = Logger(namespace="pyro_reactor.capabilities.jobs")

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


__all__ = ["SIGNAL_NAMES", "Job", "JobSpec", "Jobs", "newJobId"]
