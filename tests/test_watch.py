"""``watch_workspace``: real inotify on a real directory, through a whole agent on loopback;
the translation of kernel events and the stream machine in memory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pyro_reactor.capabilities.watch import tree
from pyro_reactor.capabilities.watch._machine import WatchCore, WatchMachine
from pyro_reactor.capabilities.watch.tree import WatchTree
from pyro_reactor.system import inotify as _inotify
from pyro_reactor.system.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_ISDIR,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    RawEvent,
    WatchLimitError,
    parseEvents,
)
from pyro_reactor.system.workspace import Workspace
from tests.helpers import RunningAgent, startAgent, waitUntil

reactor: Any = _reactor


class LineCollector(Protocol):
    """A host reading a watch stream: every line, parsed, and whether the stream ended."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.lines: list[dict[str, Any]] = []
        self.buffer = b""
        self.ended = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(self.request).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *whole, self.buffer = self.buffer.split(b"\n")
        self.lines += [json.loads(line) for line in whole]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True
        self.done.callback(None)

    def events(self) -> list[dict[str, Any]]:
        return self.lines[1:]

    def close(self) -> None:
        if not self.ended and self.transport is not None:
            self.transport.loseConnection()


async def watch(case: TestCase, agent: RunningAgent, **fields: Any) -> LineCollector:
    """A watch stream, once its first line is in."""
    collector = LineCollector({"action": "watch_workspace", **fields})
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port, timeout=5)
    await connectProtocol(endpoint, collector)

    async def closed() -> None:
        collector.close()
        if not collector.ended:
            await collector.done

    case.addCleanup(lambda: Deferred.fromCoroutine(closed()))
    await waitUntil(lambda: collector.lines or collector.ended, 10)
    return collector


def inotifyDescriptors() -> int:
    """How many inotify instances this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            continue
    return count


def has(collector: LineCollector, *wanted: dict[str, Any]) -> bool:
    return all(item in collector.events() for item in wanted)


class WatchTests(TestCase):
    """A watch stream through a whole agent."""

    timeout = 60

    async def test_fileWritten(self) -> None:
        """A file written right after the ``watching`` line is reported: created, then
        modified once on close, however many writes it took."""
        agent = await startAgent(self)
        stream = await watch(self, agent)
        self.assertEqual(stream.lines[0], {"watching": "/workspace"})
        with (agent.workspace / "notes.txt").open("w") as handle:
            for _ in range(100):
                handle.write("x" * 100)
                handle.flush()
        created = {"event": "created", "path": "/workspace/notes.txt", "is_dir": False}
        modified = {"event": "modified", "path": "/workspace/notes.txt", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: has(stream, created, modified), 10))
        await waitUntil(lambda: False, 0.2)
        self.assertEqual(stream.events(), [created, modified])

    async def test_newDirectoriesSeenWhole(self) -> None:
        """``mkdir -p a/b && touch a/b/c`` is reported whole, each entry once, and later
        changes inside the new directories are reported too."""
        agent = await startAgent(self)
        stream = await watch(self, agent)
        subprocess.run(
            ["sh", "-c", "mkdir -p a/b/d && touch a/b/c"], cwd=agent.workspace, check=True
        )
        wanted = [
            {"event": "created", "path": "/workspace/a", "is_dir": True},
            {"event": "created", "path": "/workspace/a/b", "is_dir": True},
            {"event": "created", "path": "/workspace/a/b/d", "is_dir": True},
            {"event": "created", "path": "/workspace/a/b/c", "is_dir": False},
        ]
        self.assertTrue(await waitUntil(lambda: has(stream, *wanted), 10), stream.lines)
        (agent.workspace / "a/b/d/e").write_text("e")
        modified = {"event": "modified", "path": "/workspace/a/b/d/e", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: has(stream, modified), 10), stream.lines)
        created = [e for e in stream.events() if e["event"] == "created"]
        self.assertEqual(len(created), len({e["path"] for e in created}), created)

    async def test_moves(self) -> None:
        """A rename inside the tree is ``moved`` with ``from``; out of the watched tree it is
        ``deleted``, into it ``created``; a moved directory's contents are reported under
        its new path."""
        agent = await startAgent(self)
        (agent.workspace / "sub").mkdir()
        (agent.workspace / "sub" / "dir").mkdir()
        (agent.workspace / "sub" / "f").write_text("f")
        (agent.workspace / "outside").write_text("o")
        stream = await watch(self, agent, path="/workspace/sub")
        self.assertEqual(stream.lines[0], {"watching": "/workspace/sub"})
        ws = agent.workspace
        os.rename(ws / "sub" / "f", ws / "sub" / "g")
        os.rename(ws / "sub" / "dir", ws / "sub" / "dir2")
        (ws / "sub" / "dir2" / "inside").write_text("i")
        os.rename(ws / "sub" / "g", ws / "g")
        os.rename(ws / "outside", ws / "sub" / "in")
        wanted = [
            {
                "event": "moved",
                "path": "/workspace/sub/g",
                "from": "/workspace/sub/f",
                "is_dir": False,
            },
            {
                "event": "moved",
                "path": "/workspace/sub/dir2",
                "from": "/workspace/sub/dir",
                "is_dir": True,
            },
            {"event": "modified", "path": "/workspace/sub/dir2/inside", "is_dir": False},
            {"event": "deleted", "path": "/workspace/sub/g", "is_dir": False},
            {"event": "created", "path": "/workspace/sub/in", "is_dir": False},
        ]
        self.assertTrue(await waitUntil(lambda: has(stream, *wanted), 10), stream.lines)

    async def test_directoryMovedOutIsForgotten(self) -> None:
        """A directory moved out of the watched tree is reported deleted, and what happens in
        it afterwards is never reported."""
        agent = await startAgent(self)
        ws = agent.workspace
        (ws / "sub" / "d").mkdir(parents=True)
        stream = await watch(self, agent, path="sub")
        os.rename(ws / "sub" / "d", ws / "d")
        gone = {"event": "deleted", "path": "/workspace/sub/d", "is_dir": True}
        self.assertTrue(await waitUntil(lambda: has(stream, gone), 10), stream.lines)
        (ws / "d" / "later").write_text("x")
        (ws / "sub" / "marker").write_text("x")
        marker = {"event": "modified", "path": "/workspace/sub/marker", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: has(stream, marker), 10), stream.lines)
        self.assertFalse([e for e in stream.events() if "later" in e.get("path", "")])

    async def test_rootDeleted(self) -> None:
        """Deleting the watched directory ends the stream with a ``deleted`` line carrying its
        own path, and frees the stream's slot."""
        agent = await startAgent(self, maxWatches=1)
        (agent.workspace / "gone").mkdir()
        stream = await watch(self, agent, path="/workspace/gone")
        (agent.workspace / "gone").rmdir()
        self.assertTrue(await waitUntil(lambda: stream.ended, 10))
        self.assertEqual(
            stream.events()[-1], {"event": "deleted", "path": "/workspace/gone", "is_dir": True}
        )
        again = await watch(self, agent)
        self.assertEqual(again.lines[0], {"watching": "/workspace"})

    async def test_notRecursive(self) -> None:
        """With ``recursive`` false, only the directory's own entries are reported."""
        agent = await startAgent(self)
        (agent.workspace / "deep").mkdir()
        stream = await watch(self, agent, recursive=False)
        (agent.workspace / "deep" / "hidden").write_text("x")
        (agent.workspace / "top").write_text("x")
        top = {"event": "modified", "path": "/workspace/top", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: has(stream, top), 10))
        self.assertFalse([e for e in stream.events() if "hidden" in e["path"]])

    async def test_symlinksNotFollowed(self) -> None:
        """A symlink to a directory outside is reported as an entry; changes behind it are
        not reported."""
        agent = await startAgent(self)
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        stream = await watch(self, agent)
        (agent.workspace / "link").symlink_to(outside)
        (outside / "secret").write_text("x")
        (agent.workspace / "marker").write_text("x")
        marker = {"event": "modified", "path": "/workspace/marker", "is_dir": False}
        self.assertTrue(await waitUntil(lambda: has(stream, marker), 10))
        self.assertIn(
            {"event": "created", "path": "/workspace/link", "is_dir": False}, stream.events()
        )
        self.assertFalse([e for e in stream.events() if "secret" in e["path"]])

    async def test_badPaths(self) -> None:
        """A file, a missing path, a symlink, ``..`` and a path outside the workspace are each
        refused with an error as the first line, then the connection closes."""
        agent = await startAgent(self)
        (agent.workspace / "file").write_text("x")
        (agent.workspace / "dir").mkdir()
        (agent.workspace / "link").symlink_to("dir")
        for path in (
            "/workspace/file",
            "/workspace/missing",
            "/workspace/link",
            "/workspace/../etc",
            "/etc",
        ):
            stream = await watch(self, agent, path=path)
            await stream.done
            self.assertEqual(len(stream.lines), 1, stream.lines)
            self.assertEqual(list(stream.lines[0]), ["error"], path)
            self.assertNotIn(str(agent.workspace), stream.lines[0]["error"])

    async def test_maxWatches(self) -> None:
        """One stream more than ``--max-watches`` is answered with an error; a closed stream
        gives its slot back."""
        agent = await startAgent(self, maxWatches=2)
        first = await watch(self, agent)
        await watch(self, agent)
        third = await watch(self, agent)
        self.assertIn("at most 2", third.lines[0]["error"])
        first.close()
        await first.done
        for _ in range(50):
            fourth = await watch(self, agent)
            if "watching" in fourth.lines[0]:
                break
            await waitUntil(lambda: False, 0.05)
        self.assertEqual(fourth.lines[0], {"watching": "/workspace"})

    async def test_descriptorsGivenBack(self) -> None:
        """Each stream's inotify descriptor is closed when it ends: host gone, root deleted,
        refused path."""
        agent = await startAgent(self)
        before = inotifyDescriptors()
        (agent.workspace / "gone").mkdir()
        first = await watch(self, agent)
        second = await watch(self, agent, path="gone")
        refused = await watch(self, agent, path="missing")
        self.assertEqual(inotifyDescriptors(), before + 2)
        first.close()
        (agent.workspace / "gone").rmdir()
        await first.done
        await second.done
        await refused.done
        self.assertTrue(await waitUntil(lambda: inotifyDescriptors() == before, 10))

    async def test_memoryBudget(self) -> None:
        """A stream reserves its share of the memory budget while it lives, gives it back when
        it ends, and is refused when the budget cannot hold it."""
        from pyro_reactor.capabilities.watch import WATCH_HOLDS

        agent = await startAgent(self)
        budget = agent.context.budget
        stream = await watch(self, agent)
        self.assertGreaterEqual(budget.used, WATCH_HOLDS)
        stream.close()
        await stream.done
        self.assertTrue(await waitUntil(lambda: budget.used == 0, 10), budget.used)
        small = await startAgent(self, memoryBudget=WATCH_HOLDS // 2)
        refused = await watch(self, small)
        self.assertIn("memory budget", refused.lines[0]["error"])

    async def test_pingFeatures(self) -> None:
        """``ping`` lists the ``tcp`` and ``watch`` features."""
        agent = await startAgent(self)
        answer = await agent.call({"action": "ping"})
        self.assertIn("watch", answer["features"])
        self.assertIn("tcp", answer["features"])
        self.assertIn("watch_workspace", answer["actions"])


class TreeTests(SynchronousTestCase):
    """The translation of raw kernel events, and the watch limit."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.root.mkdir()
        self.lines: list[dict[str, Any]] = []
        self.gone: list[bool] = []
        self.clock = Clock()
        self.fd = _inotify.openINotify(lambda events, drained: None, reactor=Clock())
        self.addCleanup(lambda: os.close(self.fd.fileno()))
        self.tree = WatchTree(
            workspace=Workspace(self.root),
            inotifyFD=self.fd.fileno(),
            root=(),
            recursive=True,
            clock=self.clock,
            emit=self.lines.append,
            rootGone=lambda: self.gone.append(True),
        )

    def test_overflow(self) -> None:
        """The kernel's queue overflow is reported as an ``overflow`` line, and directories
        made meanwhile (their events lost) are watched from then on."""
        self.tree.placeInitial()
        (self.root / "lost" / "deeper").mkdir(parents=True)
        self.tree.handle([RawEvent(-1, IN_Q_OVERFLOW, 0, "")], True)
        self.assertEqual(self.lines, [{"event": "overflow"}])
        self.assertIn(("lost", "deeper"), self.tree.wds)

    def test_unpairedMoveWaitsBriefly(self) -> None:
        """An ``IN_MOVED_FROM`` at the end of a read waits briefly for its pair: paired in the
        next read it is ``moved``; left alone it becomes ``deleted``."""
        self.tree.placeInitial()
        wd = self.tree.rootWd
        self.tree.handle([RawEvent(wd, IN_MOVED_FROM, 7, "a")], True)
        self.assertEqual(self.lines, [])
        self.tree.handle([RawEvent(wd, IN_MOVED_TO, 7, "b")], True)
        self.assertEqual(
            self.lines,
            [{"event": "moved", "path": "/workspace/b", "from": "/workspace/a", "is_dir": False}],
        )
        del self.lines[:]
        self.tree.handle([RawEvent(wd, IN_MOVED_FROM, 8, "c")], True)
        self.clock.advance(1)
        self.assertEqual(
            self.lines, [{"event": "deleted", "path": "/workspace/c", "is_dir": False}]
        )

    def test_otherEventFlushesMove(self) -> None:
        """An unpaired ``IN_MOVED_FROM`` followed by another event is reported first, in
        order."""
        self.tree.placeInitial()
        wd = self.tree.rootWd
        self.tree.handle(
            [RawEvent(wd, IN_MOVED_FROM, 9, "a"), RawEvent(wd, IN_CLOSE_WRITE, 0, "z")], True
        )
        self.assertEqual(
            [line["event"] for line in self.lines], ["deleted", "modified"], self.lines
        )

    def test_watchLimit(self) -> None:
        """The kernel's watch limit on a new directory is an ``error`` line naming it; the
        stream goes on."""
        self.tree.placeInitial()
        (self.root / "new").mkdir()

        def refuse(inotifyFD: int, directoryFD: int, mask: int = 0) -> int:
            raise WatchLimitError(28, "inotify watch limit reached (fs.inotify.max_user_watches)")

        self.patch(tree, "addWatch", refuse)
        self.tree.handle([RawEvent(self.tree.rootWd, IN_CREATE | IN_ISDIR, 0, "new")], True)
        self.assertEqual(
            self.lines,
            [
                {"event": "created", "path": "/workspace/new", "is_dir": True},
                {
                    "event": "error",
                    "path": "/workspace/new",
                    "error": "inotify watch limit reached (fs.inotify.max_user_watches):"
                    " /workspace/new is not watched",
                },
            ],
        )

    def test_parseEvents(self) -> None:
        """Raw events are parsed with their cookie and name; a partial event is kept."""
        raw = _inotify._EVENT.pack(3, IN_MOVED_TO, 42, 16) + b"name\0" + b"\0" * 11
        events, rest = parseEvents(raw + raw[:10])
        self.assertEqual(events, [RawEvent(3, IN_MOVED_TO, 42, "name")])
        self.assertEqual(rest, raw[:10])


class WatchMachineTests(SynchronousTestCase):
    """The stream lifecycle: reading follows the host's pace; the slot is freed once."""

    def setUp(self) -> None:
        self.events: list[str] = []
        self.machine = WatchMachine(
            WatchCore(
                startReading=lambda: self.events.append("read"),
                stopReading=lambda: self.events.append("stop"),
                closeHost=lambda: self.events.append("close"),
                release=lambda: self.events.append("release"),
            )
        )

    def test_pace(self) -> None:
        """Nothing is read before the host is attached; a paused host stops the reading and a
        resumed one starts it again."""
        self.assertEqual(self.events, [])
        self.machine.attach(object())
        self.machine.pause()
        self.machine.pause()
        self.machine.resume()
        self.assertEqual(self.events, ["read", "stop", "read"])

    def test_rootGone(self) -> None:
        """The root gone ends the stream: reading stops, the slot is freed, the host closed;
        later events change nothing."""
        self.machine.attach(object())
        self.machine.rootGone()
        self.machine.lost()
        self.machine.resume()
        self.assertEqual(self.events, ["read", "stop", "release", "close"])
        self.assertTrue(self.machine.isEnded())

    def test_lostBeforeAttach(self) -> None:
        """A host gone before the hand-over frees the slot."""
        self.machine.lost()
        self.assertEqual(self.events, ["stop", "release"])
