"""The `rcn` command: one entry point, a sub-command per job.

Each sub-command lives in its own module as `main(argv) -> int`, imported only when used so
that `rcn env` or `rcn prepare` never pay for importing DeepSpeed.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from rcn_dist import __version__, signals, testhooks
from rcn_dist.errors import RcnError
from rcn_dist.parallel.teardown import exit_process

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("rcn_dist.data.prepare", "convert a dataset into WebDataset shards + manifest"),
    "train": ("rcn_dist.train", "train (plain, torchrun, deepspeed, srun or mpirun)"),
    "eval": ("rcn_dist.eval", "evaluate a run: test error, ELBO, IW bound, sample figures"),
    "sample": ("rcn_dist.sample", "draw samples, the drawing animation, reconstructions"),
    "report": ("rcn_dist.report", "one page with a run's config, curves, numbers and pictures"),
    "bench": ("rcn_dist.bench", "benchmarks: throughput, FLOPs, fraction of peak"),
    "submit": ("rcn_dist.submit", "submit a training run to Slurm (or locally) with submitit"),
    "env": ("rcn_dist.parallel.env", "print the detected launch environment and exit"),
    "export": ("rcn_dist.export", "export consolidated weights (safetensors + config JSON)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rcn <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rcn <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["train"]:
        # Only training has a stop protocol; for the other commands (and help, or a bad command)
        # the signals that entry() caught mean what they usually do again.
        signals.release_and_deliver()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"rcn_dist {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"rcn: error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_main(importlib.import_module(COMMANDS[argv[0]][0]).main, argv[1:])


def run_main(fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run a sub-command; an RcnError becomes one line on stderr and its exit code, a stop before
    the first step (signals.Stopped, its line already printed) exit 3."""
    # Local: rcn_dist.parallel.safety imports torch, which this module must not load before entry()
    # has caught the signals and the command is known (`rcn --help` stays instant).
    from rcn_dist.parallel.safety import restrict_umask

    restrict_umask()  # nothing we (or DeepSpeed) write may be world-writable, whatever the umask
    try:
        return int(fn(argv) or 0)
    except signals.Stopped as e:
        return e.exit_code
    except RcnError as e:
        print(f"rcn: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


def entry() -> None:
    """The `rcn` program (also `python -m rcn_dist` and `python -m rcn_dist.cli`)."""
    # First, before anything heavy is imported: a stop signal from now on is recorded, not fatal
    # (rcn_dist.signals); main() gives the signals back to the commands that do not train.
    signals.catch()
    testhooks.pause("start")
    try:
        code = main()
        sys.stdout.flush()  # inside the try: a reader that left must not fail the exit's flush
    except BrokenPipeError:
        # The reader of our output went away (`rcn --help | head -1`): stop quietly, as other
        # command-line tools do, and send what is left of stdout nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1

    exit_process(code)  # sys.exit(code); no abort at exit after a distributed run


if __name__ == "__main__":
    entry()
