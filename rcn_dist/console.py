"""One rank-aware output helper: rich progress and tables on rank 0, plain lines when the
output is not a terminal (logs, Slurm), nothing on other ranks."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.progress import track as rich_track
from rich.table import Table

T = TypeVar("T")


class Console:
    """Prints only where `enabled` (rank 0)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def table(self, title: str, rows: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not sys.stdout.isatty():
            print(f"{title}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rows.items()), flush=True)
            return
        tab = Table(title=title)
        tab.add_column("metric")
        tab.add_column("value", justify="right")
        for k, v in rows.items():
            tab.add_row(k, _fmt(v))
        RichConsole().print(tab)

    def progress(self, total: int, start: int = 0, label: str = "train") -> TrainProgress:
        return TrainProgress(self, total, start, label)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrainProgress:
    """A rich progress bar with the latest loss parts (TTY) or a plain line every ~5% of steps."""

    SHOW = ("loss", "margin", "recon", "kl", "img_per_s")

    def __init__(self, con: Console, total: int, start: int, label: str):
        self.con, self.total, self.label = con, total, label
        self.every = max(1, (total - start) // 20)
        self._bar = None
        if con.enabled and sys.stdout.isatty():
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
            self._task = self._bar.add_task(label, total=total, completed=start, stats="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.con.enabled:
            return
        stats = "  ".join(f"{k} {_fmt(row[k])}" for k in self.SHOW if k in row)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=stats)
        elif step % self.every == 0 or step == self.total:
            print(f"{self.label} step {step}/{self.total}  {stats}", flush=True)

    def eval(self, ev: dict[str, Any]) -> None:
        rows = {k: v for k, v in ev.items() if k.startswith(("test_", "val_", "caps_", "info_"))}
        if self._bar is not None:
            self._bar.console.print(f"[bold]eval @ step {ev.get('step')}[/]: "
                                    + "  ".join(f"{k} {_fmt(v)}" for k, v in rows.items()))
        else:
            self.con.table(f"eval @ step {ev.get('step')}", rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def track(it: Iterable[T], label: str, enabled: bool = True) -> Iterable[T]:
    """Iterate with a rich progress bar when enabled and on a terminal, silently otherwise."""
    if not (enabled and sys.stdout.isatty()):
        return it
    return rich_track(it, description=label, transient=True)
