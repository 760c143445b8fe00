"""The test hooks live in one module: rcn_dist.testhooks reads every RCN_* test variable, nothing
else in the package or the entry scripts does, and unset each one is a no-op."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rcn_dist import testhooks
from rcn_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_only_testhooks_reads_the_test_variables() -> None:
    pattern = re.compile("|".join(testhooks.KNOBS))
    readers = []
    for path in sorted([*ROOT.joinpath("rcn_dist").rglob("*.py"), *ROOT.joinpath("launch").glob("*.py")]):
        # testhooks reads them; the GPU check is itself a test driver that sets RCN_FAULT for the
        # runs it starts (rcn_dist/bench/gpu_check.py, like tests/).
        if path.name == "testhooks.py" or path.relative_to(ROOT).as_posix() == "rcn_dist/bench/gpu_check.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            # a read is the name in a string literal (os.environ.get("RCN_FAULT"), env["..."])
            if re.search(r"[\"']" + f"(?:{pattern.pattern})", code):
                readers.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert readers == [], "test variables read outside rcn_dist/testhooks.py:\n" + "\n".join(readers)


def test_the_table_names_every_knob() -> None:
    doc = testhooks.__doc__ or ""
    table = [ln for ln in doc.splitlines() if ln.startswith("| RCN_")]
    assert [ln.split("|")[1].strip().split("=")[0] for ln in table] == list(testhooks.KNOBS)


def test_unset_every_hook_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    for knob in testhooks.KNOBS:
        monkeypatch.delenv(knob, raising=False)
    testhooks.fault_point("step", 0)  # would SIGKILL this test if it did anything
    testhooks.pause("start")  # would hold it 120 s
    assert testhooks.min_step_seconds() == 0.0
    assert testhooks.dump_loaded_state_path() is None
    assert not testhooks.skip_memory_check()
    assert not testhooks.ds_shm_comm()
    assert not testhooks.fault_armed("ds_save")


def test_set_hooks_take_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCN_FAULT", "ds_save:4:SIGTERM@1")
    assert testhooks.fault_armed("ds_save") and not testhooks.fault_armed("step")
    testhooks.fault_point("ds_save", 4, rank=0)  # another rank's fault: nothing happens here
    monkeypatch.setenv("RCN_TEST_MIN_STEP_S", "0.25")
    assert testhooks.min_step_seconds() == 0.25
    monkeypatch.setenv("RCN_TEST_MIN_STEP_S", "soon")
    with pytest.raises(ConfigError, match="RCN_TEST_MIN_STEP_S='soon'"):
        testhooks.min_step_seconds()
    monkeypatch.setenv("RCN_SKIP_MEMORY_CHECK", "1")
    monkeypatch.setenv("RCN_DS_SHM", "1")
    assert testhooks.skip_memory_check() and testhooks.ds_shm_comm()
