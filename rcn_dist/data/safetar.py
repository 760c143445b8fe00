"""Reading tar archives as streams, refusing members that a data archive has no business holding.

Nothing is extracted, but a member with an absolute path, `..`, a link or a device node means the
archive was not written by us (or the CIFAR authors) and may be aimed at a tool that extracts it:
refused outright, not skipped as webdataset's own tar iterator does.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from rcn_dist.errors import DataError, UnsafeFileError


def check_member(info: tarfile.TarInfo, archive: str | Path) -> None:
    """Raise UnsafeFileError unless `info` is a plain file or directory with a relative,
    non-escaping name."""
    name = info.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeFileError(f"{archive}: tar member {name!r} has an absolute path")
    if ".." in name.split("/") or "\\" in name:
        raise UnsafeFileError(f"{archive}: tar member {name!r} escapes its directory")
    if info.issym() or info.islnk():
        raise UnsafeFileError(f"{archive}: tar member {name!r} is a link (to {info.linkname!r})")
    if not (info.isreg() or info.isdir()):
        raise UnsafeFileError(f"{archive}: tar member {name!r} is a device, fifo or other special file")


def iter_files(fileobj: io.BufferedIOBase, archive: str | Path, mode: str = "r|") -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular file of a tar stream, in archive order, each member checked
    first (UnsafeFileError); a truncated or corrupt archive raises DataError naming `archive`."""
    try:
        with tarfile.open(fileobj=fileobj, mode=mode) as tar:
            for info in tar:
                check_member(info, archive)
                if info.isdir():
                    continue
                # A regular file (check_member admits no other); a short one raises tarfile.ReadError.
                yield info.name, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{archive}: truncated or corrupt tar archive ({e})") from None
