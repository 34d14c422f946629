"""Archives: uploading a 200 MiB tree (``extract_archive``) and exporting it (``export_archive``).

The tree is a few large random files plus 2,000 small ones (a checkout with its build
artefacts): 4 x 45 MiB + 2,000 x 10 KiB in 40 directories, about 200 MiB as a plain tar. Each
round starts a fresh agent of each kind (so that ``VmHWM``, the peak resident set, belongs to
this transfer), reads its idle ``VmRSS``, uploads the tar with ``sendfile`` (the client costs
the same for both), reads ``VmHWM``, then exports the extracted tree and reads it back to the
end. The goals (issue 3): throughput at least the reference's, and our peak RSS during the
upload under 1.2 x our idle RSS + 16 MiB (the reference holds the archive in memory, twice).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tarfile
import time
from pathlib import Path

from benchmarks.harness import (
    OURS,
    REFERENCE,
    Agent,
    Bench,
    BenchError,
    Row,
    expectOk,
    median,
)

NAME = "archives"
ORDER = 40
MiB = 1024 * 1024
LARGE_FILES = 4
LARGE_BYTES = 45 * MiB
SMALL_FILES = 2000
SMALL_BYTES = 10 * 1024
DIRECTORIES = 40
TIMEOUT = 300.0


def buildTree(path: Path) -> tuple[int, int]:
    """Write the benchmark's tar to ``path``; its member count and file bytes."""
    with tarfile.open(path, "w") as archive:
        for number in range(LARGE_FILES):
            _addRandom(archive, f"assets/blob{number}.bin", LARGE_BYTES)
        for number in range(SMALL_FILES):
            _addRandom(archive, f"src/pkg{number % DIRECTORIES}/mod{number}.py", SMALL_BYTES)
    return LARGE_FILES + SMALL_FILES, LARGE_FILES * LARGE_BYTES + SMALL_FILES * SMALL_BYTES


class _Random:
    """``size`` random bytes, read in pieces (never all in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, count: int = -1) -> bytes:
        count = self.left if count < 0 else min(count, self.left)
        self.left -= count
        return os.urandom(count)


def _addRandom(archive: tarfile.TarFile, name: str, size: int) -> None:
    member = tarfile.TarInfo(name)
    member.size = size
    member.mode = 0o644
    member.mtime = int(time.time())
    archive.addfile(member, _Random(size))


def _status(agent: Agent, field: str) -> int:
    for line in Path(f"/proc/{agent.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} for {agent.kind}")


def _receiveAll(connection: socket.socket, deadline: float) -> tuple[bytes, int]:
    """The first line, and how many bytes followed it until the agent closed."""
    view = memoryview(bytearray(4 * MiB))
    head = bytearray()
    rest = 0
    found = False
    while True:
        connection.settimeout(max(0.01, deadline - time.monotonic()))
        count = connection.recv_into(view)
        if count == 0:
            return bytes(head), rest
        if found:
            rest += count
            continue
        head += view[:count]
        index = head.find(b"\n")
        if index >= 0:
            found = True
            rest += len(head) - index - 1
            del head[index:]


def upload(agent: Agent, tree: Path, destination: str) -> tuple[float, dict[str, object]]:
    size = tree.stat().st_size
    request = {"action": "extract_archive", "destination": destination, "archive_size": size}
    deadline = time.monotonic() + TIMEOUT
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=TIMEOUT) as connection:
        connection.sendall(json.dumps(request).encode() + b"\n")
        with tree.open("rb") as body:
            connection.sendfile(body)
        line, _ = _receiveAll(connection, deadline)
    elapsed = time.perf_counter() - started
    return elapsed, expectOk(agent.kind, json.loads(line))


def export(agent: Agent, path: str) -> tuple[float, dict[str, object], int]:
    deadline = time.monotonic() + TIMEOUT
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=TIMEOUT) as connection:
        connection.sendall(json.dumps({"action": "export_archive", "path": path}).encode() + b"\n")
        line, received = _receiveAll(connection, deadline)
    elapsed = time.perf_counter() - started
    return elapsed, expectOk(agent.kind, json.loads(line)), received


def run(bench: Bench) -> list[Row]:
    tree = bench.workdir / "archives-tree.tar"
    members, fileBytes = buildTree(tree)
    size = tree.stat().st_size
    rounds = 1 if bench.quick else max(1, min(bench.rounds, 5))
    uploads: dict[str, list[float]] = {OURS: [], REFERENCE: []}
    exports: dict[str, list[float]] = {OURS: [], REFERENCE: []}
    peaks: dict[str, list[int]] = {OURS: [], REFERENCE: []}
    idles: dict[str, list[int]] = {OURS: [], REFERENCE: []}
    exportSizes: dict[str, int] = {}
    for number in range(rounds):
        order = (OURS, REFERENCE) if number % 2 == 0 else (REFERENCE, OURS)
        for kind in order:
            agent = bench.launch(kind)
            try:
                agent.waitForAnswer()
                idles[kind].append(_status(agent, "VmRSS"))
                # Start each agent's transfer with no dirty pages left by the previous one.
                os.sync()
                elapsed, answer = upload(agent, tree, "/workspace/up")
                peaks[kind].append(_status(agent, "VmHWM"))
                if answer.get("bytes_written") != fileBytes or answer.get("entry_count") != members:
                    raise BenchError(f"{kind} extracted {answer}")
                uploads[kind].append(size / elapsed / 1e6)
                os.sync()
                elapsed, header, received = export(agent, "/workspace/up")
                if (
                    header.get("archive_size") != received
                    or header.get("bytes_written") != fileBytes
                ):
                    raise BenchError(f"{kind} exported {header} with {received} bytes")
                exports[kind].append(received / elapsed / 1e6)
                exportSizes[kind] = received
            finally:
                agent.stop()
                shutil.rmtree(agent.workspace, ignore_errors=True)
    tree.unlink()
    idle = median([float(value) for value in idles[OURS]]) / MiB
    limit = 1.2 * idle + 16
    peak = {kind: median([float(value) for value in peaks[kind]]) / MiB for kind in peaks}
    shape = f"{size / MiB:.0f} MiB tar: {LARGE_FILES} x 45 MiB random + {SMALL_FILES} x 10 KiB"
    return [
        Row(
            "extract_archive 200 MiB upload (median)",
            "MB/s",
            median(uploads[OURS]),
            median(uploads[REFERENCE]),
            note=f"{shape}; {rounds} fresh agent(s) each; higher is better",
        ),
        Row(
            "export_archive 200 MiB download (median)",
            "MB/s",
            median(exports[OURS]),
            median(exports[REFERENCE]),
            note=(
                f"the extracted tree back ({exportSizes.get(OURS, 0) / MiB:.0f} MiB tar from"
                " ours); higher is better"
            ),
        ),
        Row(
            "peak RSS during a 200 MiB upload (VmHWM)",
            "MiB",
            peak[OURS],
            peak[REFERENCE],
            note=(
                f"our idle RSS {idle:.1f} MiB; goal < 1.2 x idle + 16 = {limit:.1f} MiB:"
                f" {'met' if peak[OURS] < limit else 'MISSED'}"
            ),
        ),
    ]
