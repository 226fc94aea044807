"""Kill training at random moments (some of them in the middle of a checkpoint write) with SIGKILL, resume
each time, and check that every resumed stretch repeats the losses of an uninterrupted run.

    python benchmarks/faults.py [--kills 10] [--steps 30] [--seed 0] [--work DIR]

Half of the kills come at a random moment of a step; the other half wait for a checkpoint's temporary file
to appear and kill at once, while it is being written. Prints a summary and writes benchmarks/results/faults.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfsup.core.io import read_metrics
from selfsup.training.checkpoint import TEMPORARY, checkpoints, load_checkpoint

# DINO on digits, small enough for a shared CPU; a wide head (out_dim 16384) makes a checkpoint ~30 MB, so
# that its write takes long enough to be caught
ARGS = ["--data", "digits", "--batch-size", "16", "backbone.depth=1", "backbone.patch_size=4", "backbone.img_size=16",
        "crops.global_size=16", "crops.local_size=8", "crops.n_local=2", "dino.out_dim=16384", "dino.hidden_dim=64",
        "dino.bottleneck_dim=64", "eval.final=false", "data.num_workers=0", "train.threads=1", "train.device=cpu",
        "train.checkpoint_every=1", "train.keep_last=2"]


def train(out: Path, steps: int, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "selfsup", "train", "--out", str(out), "--steps", str(steps), *ARGS]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=log, stderr=log)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def step_count(run: Path) -> int:
    return max(losses(run), default=0)


def kill_once(run: Path, steps: int, during_write: bool, rng: random.Random, timeout: float = 300) -> dict:
    """Start (or resume) the run, wait for it to make progress, SIGKILL it; returns what happened."""
    resumed_from = max((int(p.stem.split("-")[1]) for p in checkpoints(run)), default=0)
    proc = train(run, steps, resume=True)  # with no checkpoint yet, --resume starts the run afresh
    t0, step_t = time.monotonic(), None
    target, delay = resumed_from + rng.randint(1, 3), rng.uniform(0, 2.0)
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if step_count(run) >= target:  # training has made 1 to 3 steps of progress
            step_t = step_t or time.monotonic()
            if during_write:
                if any(run.glob(TEMPORARY)):
                    break
            elif time.monotonic() - step_t > delay:
                break
        time.sleep(0.002)
    writing = any(run.glob(TEMPORARY))
    finished = proc.poll() is not None
    proc.kill()
    proc.wait()
    return {"mode": "during checkpoint write" if during_write else "random moment", "resumed_from": resumed_from,
            "killed_at_step": step_count(run), "temporary_file_present": writing, "finished_before_kill": finished}


def verify(run: Path, reference: dict[int, float], since: int) -> dict:
    """The latest checkpoint loads, and every step logged after `since` has the reference's loss."""
    latest = checkpoints(run)[-1] if checkpoints(run) else None
    if latest is not None:
        load_checkpoint(latest)
    got = {s: l for s, l in losses(run).items() if s > since}
    diffs = [abs(l - reference[s]) for s, l in got.items()]
    return {"latest_checkpoint": latest.name if latest else None, "steps_checked": len(got),
            "max_abs_diff": max(diffs, default=0.0), "equal": all(d == 0.0 for d in diffs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "faults.json")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="selfsup-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    ref = work / "reference"
    assert train(ref, args.steps, resume=False).wait() == 0, f"the reference run failed: see {ref}.log"
    reference = losses(ref)
    run = work / "faulty"
    events = []
    modes = [i % 2 == 1 for i in range(args.kills)]
    rng.shuffle(modes)
    for i, during_write in enumerate(modes):
        event = kill_once(run, args.steps, during_write, rng)
        event.update(verify(run, reference, since=event["resumed_from"]))
        events.append(event)
        print(f"kill {i + 1:2d}: {event['mode']:<24} resumed from step {event['resumed_from']:2d}, killed at step "
              f"{event['killed_at_step']:2d}, temporary file {'yes' if event['temporary_file_present'] else 'no '}, "
              f"latest {event['latest_checkpoint']}, {event['steps_checked']} step(s) checked, "
              f"{'equal' if event['equal'] else 'DIFFERENT (max %.2e)' % event['max_abs_diff']}", flush=True)
    last = max((int(p.stem.split("-")[1]) for p in checkpoints(run)), default=0)
    final_rc = train(run, args.steps, resume=True).wait()
    final = verify(run, reference, since=0)
    complete = sorted(losses(run)) == list(range(1, args.steps + 1))
    summary = {
        "kills": len(events),
        "during_checkpoint_write": sum(e["temporary_file_present"] for e in events),
        "resumes_equal": sum(e["equal"] for e in events),
        "final_resume_from": last,
        "final_exit_code": final_rc,
        "all_steps_logged_once": complete,
        "final_equal_to_uninterrupted": final["equal"],
        "max_abs_diff": max([final["max_abs_diff"]] + [e["max_abs_diff"] for e in events]),
        "ok": final_rc == 0 and complete and final["equal"] and all(e["equal"] for e in events),
        "steps": args.steps,
        "seconds": round(time.monotonic() - t0, 1),
        "command": " ".join(sys.argv),
        "events": events,
    }
    print(f"\n{summary['kills']} SIGKILLs ({summary['during_checkpoint_write']} while a checkpoint was being written): "
          f"{summary['resumes_equal']}/{summary['kills']} resumed stretches equal to the uninterrupted run; final "
          f"resume from step {last} -> exit {final_rc}, all {args.steps} steps logged once: {complete}, losses equal "
          f"to the uninterrupted run: {final['equal']} (max |diff| {summary['max_abs_diff']:.1e}); "
          f"{'OK' if summary['ok'] else 'FAILED'} in {summary['seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
