"""The workspace commands: ``ls``, ``cat``, ``put``, ``rm``, ``upload``, ``download``, ``watch``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyro_reactor.client.commands.base import EXIT_OK, CommandBase, UsageError
from pyro_reactor.client.progress import formatBytes


class FileCommands(CommandBase):
    """The workspace commands of L{Runner<pyro_reactor.client.cli.Runner>}."""

    async def do_ls(self) -> int:
        listing = await self.client.listWorkspace(self.options.path, self.options.recursive)
        if self.options.json:
            self.emit(listing.raw)
            return EXIT_OK
        kinds = {"directory": "d", "file": "-", "symlink": "l"}
        for entry in listing.entries:
            link = f" -> {entry.linkTarget}" if entry.linkTarget is not None else ""
            size = "" if entry.artifactType == "directory" else str(entry.sizeBytes)
            self.say(f"{kinds.get(entry.artifactType, '?')} {size:>12}  {entry.path}{link}")
        return EXIT_OK

    async def do_cat(self) -> int:
        content = await self.client.readWorkspaceFile(self.options.path, self.options.max_bytes)
        if self.options.json:
            self.emit(content.raw)
            return EXIT_OK
        binary = self.console.binaryOut()
        if binary is not None:
            self.console.stdout.flush()
            binary.write(content.content)
            binary.flush()
        else:
            self.console.stdout.write(content.text)
        return EXIT_OK

    async def do_put(self) -> int:
        source = self.options.source
        try:
            if source == "-":
                text = self.console.stdin.read()
            else:
                text = Path(source).read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"{source} is not UTF-8 text (use upload for binary files)") from error
        except OSError as error:
            raise UsageError(f"cannot read {source}: {error.strerror}") from error
        result = await self.client.writeWorkspaceFile(self.options.path, text)
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(f"wrote {result.bytesWritten} bytes to {result.path}")
        return EXIT_OK

    async def do_rm(self) -> int:
        result = await self.client.deleteWorkspacePath(self.options.path)
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(f"deleted {result.path}")
        return EXIT_OK

    async def do_upload(self) -> int:
        local = Path(self.options.local)
        if not local.exists() and not local.is_symlink():
            raise UsageError(f"{local} does not exist")
        progress, bar = self.progress(f"upload {local.name or local}")
        try:
            result = await self.client.upload(local, self.options.destination, progress)
        finally:
            if bar is not None:
                bar.finish()
        if self.options.json:
            self.emit(result.raw)
        else:
            self.say(
                f"uploaded {local} to {result.destination}: {result.entryCount} entries,"
                f" {formatBytes(result.bytesWritten)}"
            )
        return EXIT_OK

    async def do_download(self) -> int:
        local = Path(self.options.local)
        progress, bar = self.progress(f"download {self.options.path}")
        try:
            result = await self.client.download(self.options.path, local, progress)
        finally:
            if bar is not None:
                bar.finish()
        if self.options.json:
            self.emit({**result.export.raw, "local_dir": str(local)})
        else:
            self.say(
                f"downloaded {result.export.workspacePath} ({result.export.artifactType}) into"
                f" {local}: {result.export.entryCount} entries,"
                f" {formatBytes(result.export.bytesWritten)}"
            )
        return EXIT_OK

    async def do_watch(self) -> int:
        def show(event: dict[str, Any]) -> None:
            if self.options.json:
                self.emit(event)
            else:
                kind = event.get("event", "?")
                path = event.get("path", "")
                if "from" in event:
                    path = f"{event['from']} -> {path}"
                elif kind == "error":
                    path = f"{path}: {event.get('error', '')}"
                slash = "/" if event.get("is_dir") else ""
                self.say(f"{kind:8} {path}{slash}")
            self.console.stdout.flush()

        watch = await self.client.watchWorkspace(
            show, self.options.path, recursive=not self.options.no_recursive
        )
        if not self.options.json:
            self.say(f"watching {watch.path} (Ctrl-C stops)")
        else:
            self.emit({"watching": watch.path})
        self.console.stdout.flush()
        await watch.ended
        return EXIT_OK
