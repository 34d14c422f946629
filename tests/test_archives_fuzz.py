"""Fuzzing extract_archive: random tars never reach outside the workspace, and a refused one
leaves the workspace exactly as it was."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyro_reactor.capabilities.archives import STAGE_PREFIX, extractArchive
from pyro_reactor.errors import ActionError
from pyro_reactor.system.workspace import Workspace
from tests.archive_helpers import (
    Member,
    dirMember,
    fileMember,
    linkMember,
    makeTar,
    snapshot,
    specialMember,
)

# Mostly plain names (so that many archives are accepted), sometimes the dangerous ones.
_components = st.sampled_from(
    ["a", "b", "c", "d", "new", "f"] * 4 + ["s", "r", "..", ".", "", " x "]
)
_names = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "", "", "", "./", "/", "//"]),
    st.lists(_components, min_size=1, max_size=4),
)
_targets = st.one_of(
    st.sampled_from(["a", "b", "../x", "/etc/passwd", "../../outside/target", "a/../b", "", "s/x"]),
    _names,
)


@st.composite
def _members(draw: st.DrawFn) -> Member:
    name = draw(_names)
    kind = draw(
        st.sampled_from(
            ["file"] * 8 + ["dir"] * 4 + ["symlink"] * 3 + ["hardlink", "device", "fifo"]
        )
    )
    if kind == "file":
        return fileMember(
            name, draw(st.binary(max_size=64)), draw(st.sampled_from([0o644, 0o4777, 0o000]))
        )
    if kind == "dir":
        return dirMember(name)
    if kind == "symlink":
        return linkMember(name, draw(_targets))
    if kind == "hardlink":
        return linkMember(name, draw(_targets), tarfile.LNKTYPE)
    return specialMember(name, tarfile.CHRTYPE if kind == "device" else tarfile.FIFOTYPE)


class ExtractFuzzTests(SynchronousTestCase):
    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(
        members=st.lists(_members(), max_size=6),
        destination=st.sampled_from(["/workspace", "/workspace/a", "/workspace/new/dir", "r"]),
    )
    def test_neverOutsideAndUnchangedOnError(self, members: list[Member], destination: str) -> None:
        """For random archives, extraction never writes outside the destination and leaves the
        workspace unchanged when it fails."""
        base = Path(self.mktemp()).absolute()
        try:
            self._check(base, members, destination)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _check(self, base: Path, members: list[Member], destination: str) -> None:
        root, outside = base / "workspace", base / "outside"
        (root / "a").mkdir(parents=True)
        (root / "b").write_bytes(b"b")
        outside.mkdir()
        (outside / "target").write_bytes(b"outside")
        os.symlink(outside, root / "s")
        os.symlink("a", root / "r")
        archive = base / "upload.tar"
        archive.write_bytes(makeTar(members))
        before, outsideBefore = snapshot(root), snapshot(outside)
        parentBefore = sorted(os.listdir(base))
        workspace = Workspace(root)
        try:
            extractArchive(workspace, archive, workspace.resolve(destination))
        except ActionError:
            event("refused")
            self.assertEqual(snapshot(root), before)
        else:
            event("extracted")
            after = snapshot(root)
            for path, (kind, mode, content) in after.items():
                self.assertFalse(PurePosixPath(path).name.startswith(STAGE_PREFIX), path)
                if kind == "symlink" and before.get(path) != (kind, mode, content):
                    assert isinstance(content, str)
                    self.assertFalse(content.startswith("/"), (path, content))
                    self.assertNotIn("..", PurePosixPath(content).parts, (path, content))
                self.assertIn(kind, ("file", "directory", "symlink"), path)
                if kind == "file":
                    self.assertEqual(mode & 0o7022, 0, path)
        self.assertEqual(snapshot(outside), outsideBefore)
        self.assertEqual(sorted(os.listdir(base)), parentBefore)
