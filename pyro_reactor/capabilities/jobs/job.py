"""One job: its machine, its record, its output, its stdin, and what its machine asks of the world.

A L{Job} is what the actions and the streams need of a job: its status, the signals its
machine delivers, the exit it collects once the runner has ended, and the bounded queue of
what hosts send to its stdin. L{pyro_reactor.capabilities.jobs.registry.Jobs} makes, keeps and
removes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger

from pyro_reactor.capabilities.jobs import records
from pyro_reactor.capabilities.jobs._machine import JobInput
from pyro_reactor.capabilities.jobs.output import JobOutput
from pyro_reactor.capabilities.jobs.runners import PidWatch
from pyro_reactor.capabilities.jobs.stdin import StdinQueue
from pyro_reactor.errors import ActionError
from pyro_reactor.system.cgroups import Cgroup
from pyro_reactor.system.processes import signalGroup

if TYPE_CHECKING:
    from pyro_reactor.capabilities.jobs.registry import Jobs

log = Logger(namespace="pyro_reactor.capabilities.jobs")


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


__all__ = ["Job"]
