"""Where a prepared data set lives (a directory, an http(s) URL prefix, a `pipe:` command with `{}`
for the file name, or a brace list of shards: docs/data.md, "Shard URLs"), and reading its files.

A remote name from the manifest must be a plain file name (SAFE_NAME): that is what makes
substituting it into a URL or a shell command safe. A file that cannot be fetched is a DataError
of one line naming the URL and the rank; the caller checks size and SHA-256.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import braceexpand

from rcn_dist.errors import DataError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TIMEOUT_S = 60.0
"""Per HTTP request (connect, and each read) and per pipe command: a hung store is an error."""


def rank() -> int:
    """This process's global rank from the launcher's environment (0 when started alone); the
    same precedence as rcn_dist.parallel.env.detect. DataLoader workers inherit it."""
    names = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    return next((int(os.environ[n]) for n in names if os.environ.get(n, "").isdigit()), 0)


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


class Source:
    """A parsed data location: kind "local", "http" or "pipe"; `shards` lists the shard files a
    brace list selected (None: all of the manifest's)."""

    def __init__(self, spec: str | Path) -> None:
        spec = str(spec)
        self.shards: list[str] | None = None
        if spec.startswith("pipe:"):
            if "{}" not in spec:
                raise DataError(f"{spec}: a pipe: data source needs {{}} where the file name goes "
                                "(e.g. pipe:curl -s https://host/fm/{})")
            self.kind, self.base = "pipe", spec
            return
        items = list(braceexpand.braceexpand(spec)) if "{" in spec else [spec]
        if len(items) > 1 or items[0].endswith(".tar"):
            heads = {os.path.dirname(it) or "." for it in items}
            names = [os.path.basename(it) for it in items]
            if len(heads) != 1 or not all(n.endswith(".tar") for n in names):
                raise DataError(f"{spec}: a brace list must name .tar shard files in one directory")
            spec = heads.pop()
            self.shards = list(dict.fromkeys(names))
        if re.match(r"https?://", spec, re.IGNORECASE):
            self.kind, self.base = "http", spec.rstrip("/")
        elif re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", spec) and not spec.startswith("file:"):
            raise DataError(f"{spec}: unsupported URL scheme (use a directory, http(s)://, or "
                            "pipe:COMMAND with {} for the file name, e.g. pipe:aws s3 cp s3://b/fm/{} -)")
        else:
            self.kind, self.base = "local", re.sub(r"^file:(//)?", "", spec)

    @property
    def local_dir(self) -> Path | None:
        return Path(self.base) if self.kind == "local" else None

    def where(self, name: str) -> str:
        """The path, URL or command that reads file `name`."""
        if self.kind == "pipe":
            return self.base.replace("{}", name)
        if self.kind == "http":
            return f"{self.base}/{name}"
        return str(Path(self.base) / name)

    def check_name(self, name: str, manifest: str) -> None:
        """Refuse a name that would change the meaning of a URL or a shell command."""
        if self.kind != "local" and not SAFE_NAME.fullmatch(name):
            raise DataError(f"{manifest}: shard file name {name!r} is not a plain file name "
                            "([A-Za-z0-9._-], as `rcn prepare` writes them)")

    def read(self, name: str) -> bytes:
        """The whole file `name` (DataError "rank R: cannot open WHERE: why" if it cannot be had);
        a local file's OSError is left to the caller, whose message names what it was reading."""
        where = self.where(name)
        if self.kind == "local":
            return Path(where).read_bytes()
        if self.kind == "pipe":
            # WebDataset's pipe: runs the command through the shell too; stderr is kept for the message.
            try:
                p = subprocess.run(where[len("pipe:"):], shell=True, capture_output=True, timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise DataError(f"rank {rank()}: cannot open {where}: no result after {TIMEOUT_S:.0f} s") from None
            if p.returncode != 0:
                why = _one_line(p.stderr.decode(errors="replace"))
                raise DataError(f"rank {rank()}: cannot open {where}: exit {p.returncode}"
                                + (f" ({why})" if why else ""))
            return p.stdout
        try:
            with urllib.request.urlopen(where, timeout=TIMEOUT_S) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            why = f"{e.code} {e.reason}"
        except urllib.error.URLError as e:
            why = str(e.reason)
        except (OSError, http.client.HTTPException, ValueError) as e:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DataError(f"rank {rank()}: cannot open {where}: {_one_line(why)}")
