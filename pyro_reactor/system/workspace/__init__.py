"""Guest paths and kernel-confined access to the workspace directory.

- L{paths}: what a request's ``/workspace/...`` names (L{GuestPath}) and the errors about it;
- L{resolvers}: ``openat2`` ``RESOLVE_BENEATH`` and the ``O_NOFOLLOW`` walk;
- L{walk}: listing a directory and walking a tree through descriptors;
- L{facade}: L{Workspace}, the one object capabilities use, and L{WorkingDirectory}.

Every name capabilities use is importable from here.
"""

from pyro_reactor.system._linux import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS
from pyro_reactor.system.workspace.facade import (
    WorkingDirectory,
    Workspace,
    openat2Available,
    processUmask,
)
from pyro_reactor.system.workspace.paths import (
    TEMP_PREFIX,
    WORKSPACE_ROOT,
    EscapingSymlink,
    GuestPath,
    MissingPath,
    NotADirectoryInPath,
    NotARegularFile,
    SymlinkInPath,
    WorkspaceError,
    resolveGuestPath,
)
from pyro_reactor.system.workspace.resolvers import MAX_SYMLINKS
from pyro_reactor.system.workspace.walk import Child, TreeEntry, walkTree

__all__ = [
    "MAX_SYMLINKS",
    "RESOLVE_BENEATH",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "TEMP_PREFIX",
    "WORKSPACE_ROOT",
    "Child",
    "EscapingSymlink",
    "GuestPath",
    "MissingPath",
    "NotADirectoryInPath",
    "NotARegularFile",
    "SymlinkInPath",
    "TreeEntry",
    "WorkingDirectory",
    "Workspace",
    "WorkspaceError",
    "openat2Available",
    "processUmask",
    "resolveGuestPath",
    "walkTree",
]
