"""The `rcn` entry point as a shell sees it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PY, REPO, cli_env

RCN = Path(sys.executable).with_name("rcn")


# Our own output exits 1. A sub-command's --help is argparse's: Python 3.11.7 ignores the failed
# write and exits 0, Debian's 3.11.2 raises it and our handler exits 1.
@pytest.mark.parametrize(("args", "codes"), [(["--help"], {1}), (["train", "--help"], {0, 1})])
def test_output_into_a_closed_pipe_ends_without_a_traceback(args, codes):
    """`rcn --help | head -1` where head has already gone: the write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write to the pipe fails
    try:
        p = subprocess.run([PY, "-m", "rcn_dist.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, env=cli_env(), cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert p.returncode in codes
    assert p.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" line


@pytest.mark.skipif(shutil.which("head") is None or not RCN.is_file(), reason="needs head and the rcn script")
def test_help_into_head_prints_the_first_line():
    p = subprocess.run(f"'{RCN}' --help | head -1", shell=True, capture_output=True, text=True, env=cli_env(),
                       cwd=REPO, timeout=120)
    assert p.stdout == "usage: rcn <command> [options]\n"
    assert "Traceback" not in p.stderr and "Error" not in p.stderr
