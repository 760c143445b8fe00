"""Files written whole or not at all."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` durable: the entries a create or a rename made there
    survive a power loss only once the directory itself is fsynced (POSIX; a no-op where a
    directory cannot be opened for it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot fsync a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory from the deepest up to `root`: after
    it, what was written there is on the disk, names included (a checkpoint before its COMPLETE).

    Other processes may write there meanwhile (the other ranks of a save): a file gone between the
    listing and its open is one of their temporary files, renamed by atomic_write, which fsyncs
    what it writes itself; it is passed over."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += [Path(dirpath) / n for n in dirnames]
        for name in filenames:
            try:
                f = open(Path(dirpath) / name, "rb")
            except FileNotFoundError:
                continue
            with f:
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temporary file of this writer's own and rename, so that readers never see half
    a file (the rename replaces an older version in one step) and two writers of the same file
    never write into one temporary file. The file is fsynced before the rename and its directory
    after it, so that the new version is on the disk when this returns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
