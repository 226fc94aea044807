"""Preemption and crashes: SIGTERM saves a checkpoint and exits; kill -9 loses only the steps since the last
checkpoint; `--resume` then repeats exactly the losses of an uninterrupted run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.training.checkpoint import latest
from tiny import ARGS, losses

STEPS = 6
RUN = ["train", "--steps", str(STEPS), *ARGS, "train.checkpoint_every=1", "train.keep_last=2"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfsup", *RUN, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def test_sigterm_then_kill9_then_resume_repeat_the_uninterrupted_losses(tmp_path):
    assert main([*RUN, "--out", str(tmp_path / "ref")]) == 0
    ref = losses(tmp_path / "ref")
    run = tmp_path / "run"

    proc = start(run)  # preemption: SIGTERM saves a checkpoint, then exits with 128 + 15
    wait_for(run / "checkpoint-00000001.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = step_of(latest(run))
    assert f"interrupted at step {stopped}" in err and "--resume" in err
    assert stopped < STEPS

    proc = start(run, "--resume")  # a crash: nothing saved on the way out
    wait_for(run / f"checkpoint-{stopped + 2:08d}.pt", proc)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert main([*RUN, "--out", str(run), "--resume"]) == 0
    got = losses(run)
    assert list(got) == list(range(1, STEPS + 1))
    assert list(got.values()) == pytest.approx(list(ref.values()), abs=1e-6, rel=0)


def test_a_run_folder_with_checkpoints_needs_resume(tmp_path, capsys):
    (tmp_path / "checkpoint-00000001.pt").write_bytes(b"x")
    assert main([*RUN, "--out", str(tmp_path)]) == 2
    assert "pass --resume" in capsys.readouterr().err
