"""Trial steps before a run: the largest batch that fits in memory, the speed, and from them the run's length.

Memory: training steps at batch 2, 4, 8, ... (synthetic multi-crop views through the run's own `MultiCrop`)
give the peak memory (CUDA max allocated, or the process's peak RSS); a line through the last two points
extrapolates to larger batches, and no batch is tried that the line says would not fit. Speed: a few steps at
the chosen batch, the loader's decode-and-crop time per image, and an inference pass for the final k-NN. The
trainer restores its state afterwards, so a run with trial steps trains exactly like one without.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import eval_size
from ..core.device import synchronize
from ..core.errors import UserError
from ..core.machine import PeakMemory, free_memory, process_memory
from ..core.progress import format_duration
from ..data.builtin import labelled_splits, open_source
from ..data.loader import epoch_loader
from ..data.views import synthetic_views
from .checkpoint import atomic_save

GiB = 2**30
WORKER_RESERVE = 0.5 * GiB  # a loader process: its own interpreter and prefetched batches


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@dataclass
class MemoryFit:
    largest_batch: int  # per process
    budget: float  # bytes the process may use at its peak
    peak_at: dict[int, float]  # batch -> measured peak bytes

    def needed(self, batch: int) -> float:
        """Peak bytes at `batch`, on the line through the two largest measured batches."""
        (b1, p1), (b2, p2) = sorted(self.peak_at.items())[-2:]
        return p2 + max(p2 - p1, 0.0) / (b2 - b1) * (batch - b2)

    def solve(self) -> float:
        """The batch at which that line reaches the budget."""
        (b1, p1), (b2, p2) = sorted(self.peak_at.items())[-2:]
        slope = (p2 - p1) / (b2 - b1)
        return math.inf if slope <= 0 else b2 + (self.budget - p2) / slope


def memory_budget(device: torch.device, fraction: float, limit_gib: float | None, workers: int) -> float:
    """Bytes the training process may use at its peak: what it holds now plus `fraction` of what is free (on
    a CPU less a reserve per loader worker), capped by `limit_gib`."""
    budget = process_memory(device) + fraction * free_memory(device)
    if device.type != "cuda":
        budget -= workers * WORKER_RESERVE
    return min(budget, limit_gib * GiB) if limit_gib else budget


def fit_batch(step, device: torch.device, target: int, budget: float, start: int = 2,
              memory: PeakMemory | None = None) -> MemoryFit:
    """Trial steps `step(b)` at b = start, 2 start, ... up to `target`, none that the line through the last two
    measured would put over `budget`; the largest batch (at most `target`) that line keeps under `budget`."""
    memory, peaks, b, ceiling = memory or PeakMemory(device), {}, min(start, target), target
    while True:
        memory.reset()
        try:
            step(b)
            synchronize(device)
        except Exception as e:  # noqa: BLE001 - only running out of memory is an answer; re-raised otherwise
            if not is_out_of_memory(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ceiling = b - 1
            break
        peaks[b] = memory.read() * 2**20
        nxt = min(2 * b, target)
        if b >= target or (len(peaks) > 1 and MemoryFit(0, budget, peaks).needed(nxt) > budget):
            break
        b = nxt
    fit = MemoryFit(0, budget, peaks)
    if len(peaks) == 1:
        (b1, p1), = peaks.items()
        fit.largest_batch = min(b1, ceiling) if p1 <= budget else 0
    elif peaks:
        fit.largest_batch = max(0, min(ceiling, math.floor(min(fit.solve(), 1e9))))
    return fit


def time_steps(step, n: int, device: torch.device) -> float:
    """Median seconds of `n` calls after one untimed call."""
    step()
    times = []
    for _ in range(n):
        synchronize(device)
        t = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spread(source, n: int) -> list[int]:
    """Up to `n` indices evenly spread over `source`."""
    n = min(n, len(source))
    return [i * (len(source) // n) for i in range(n)]


def load_time(source, multicrop, n: int = 32) -> float:
    """Seconds to decode and multi-crop one image of `source`, in this process."""
    t = time.perf_counter()
    samples = [(*source[i], i) for i in spread(source, n)]
    multicrop(samples, 0)
    return (time.perf_counter() - t) / len(samples)


def human_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def stage_seconds(trainer, multicrop, batch: int) -> tuple[float, float]:
    """(seconds per step, seconds to load one image) of training steps on `multicrop`'s crops: the step waits
    for the slower of the device and the loader workers."""
    channels = trainer.cfg.backbone.in_chans
    compute_s = time_steps(lambda: trainer.train_step(synthetic_views(multicrop, batch, channels=channels)), 2,
                           trainer.device)
    load_s = load_time(trainer.source, multicrop)
    workers = trainer.cfg.data.num_workers
    return (max(compute_s, load_s * batch / workers) if workers else compute_s + load_s * batch), load_s


def decode_time(source, n: int = 32) -> float:
    """Seconds to read one image of `source` (decoding, for files), in this process."""
    picks = spread(source, n)
    t = time.perf_counter()
    for i in picks:
        source[i]
    return (time.perf_counter() - t) / len(picks)


def matmul_flops(device: torch.device) -> float:
    """Float32 matrix-multiply speed (FLOP/s), for the k-NN's similarity matrices."""
    a, b = torch.randn(512, 1024, device=device), torch.randn(1024, 2048, device=device)
    seconds = time_steps(lambda: a @ b, 2, device)
    return 2 * 512 * 1024 * 2048 / max(seconds, 1e-9)


def epoch_seconds(trainer) -> float:
    """What each epoch adds to its steps: the loader's start (its workers, the first batch) and a checkpoint."""
    t = time.perf_counter()
    batches = iter(epoch_loader(trainer.batches, 0, 0, trainer.cfg.data.num_workers))
    next(batches)
    del batches
    with tempfile.TemporaryDirectory() as tmp:
        atomic_save(trainer.state(), Path(tmp) / "checkpoint.pt")
    return time.perf_counter() - t


def eval_seconds(trainer, workers: int) -> float:
    """The final evaluation's time: features of every labelled image from the trained and the random-init
    backbone and raw pixels (decode, then forward), and their k-NN similarity matrices."""
    cfg, device = trainer.cfg, trainer.device
    spec = cfg.data.eval_source or cfg.data.source
    if not cfg.eval.final or not open_source(spec).labelled:
        return 0.0
    train, test = labelled_splits(spec)
    n = len(train) + len(test)
    test.channels = cfg.backbone.in_chans
    read_s = decode_time(test)
    size, b = eval_size(cfg), 64
    backbone = trainer.method.backbone()
    x = torch.randn(b, cfg.backbone.in_chans, size, size, device=device)
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        infer_s = time_steps(lambda: backbone(x), 1, device) / b
        dim = backbone(x[:1]).shape[-1]
    backbone.train(was_training)
    per_pass = max(read_s, infer_s) if workers else read_s + infer_s
    knn_s = 2 * len(train) * len(test) * (2 * dim + 3 * size * size) / matmul_flops(device)
    return n * (2 * per_pass + read_s) + knn_s


def fit_memory(trainer, choose_batch: bool) -> list[str]:
    """Trial steps at growing batches, for the run's crops and for those of its high-resolution stage: each
    stage's batch checked (an error naming the largest that fits) or, when `choose_batch`, lowered to the largest
    power of two that fits. Returns the lines to print."""
    cfg = trainer.cfg
    start = max(2, 2 * cfg.moco.shuffle_bn) if cfg.method == "moco" else 2  # shuffling BN's groups need 2 each
    lines = [fit_stage(trainer, trainer.multicrop, cfg.optim.batch_size, "optim.batch_size", "--batch-size N",
                       choose_batch, start)]
    if trainer.highres is not None:
        chosen = fit_stage(trainer, trainer.highres_multicrop, trainer.batch_size(trainer.total_steps - 1),
                           "highres.batch_size", "highres.batch_size=N", choose_batch, start)
        lines.append(f"high-resolution stage ({trainer.highres.global_size} px): {chosen}")
    return lines


def fit_stage(trainer, multicrop, target: int, key: str, flag: str, choose_batch: bool, start: int) -> str:
    cfg, device = trainer.cfg, trainer.device
    budget = memory_budget(device, cfg.train.memory_fraction, cfg.train.memory_limit_gib, cfg.data.num_workers)
    fit = fit_batch(lambda b: trainer.train_step(synthetic_views(multicrop, b, channels=cfg.backbone.in_chans)), device,
                    target, budget, start)
    limit = f", train.memory_limit_gib {cfg.train.memory_limit_gib}" if cfg.train.memory_limit_gib else ""
    where = (f"{human_bytes(budget)} usable: train.memory_fraction {cfg.train.memory_fraction} of "
             f"{human_bytes(free_memory(device))} free{limit}")
    peak = human_bytes(fit.needed(target) if len(fit.peak_at) > 1 else max(fit.peak_at.values(), default=0))
    if fit.largest_batch >= target:
        return f"memory: batch {target} fits (peak ~{peak}, {where})"
    if not choose_batch or fit.largest_batch < 1:
        hint = f" ({flag.replace('N', str(fit.largest_batch))})" if fit.largest_batch else ""
        raise UserError(f"{key}={target} does not fit in memory (a step needs ~{peak}, {where}); "
                        f"the largest batch that fits is {fit.largest_batch}{hint}")
    chosen = 2 ** int(math.log2(fit.largest_batch))
    if key == "optim.batch_size":
        cfg.optim.batch_size = chosen
    else:
        cfg.highres.batch_size = chosen
    return f"memory: batch {target} would need ~{peak}, {where}: batch {chosen}"


def plan_run(trainer, choose_batch: bool, budget_s: float | None, started: float) -> list[str]:
    """Trial steps: the batch fitted to memory (`fit_memory`), the seconds per step and of the final evaluation,
    and with `budget_s` the number of steps that ends the command in time (`started`: the command's start, on
    the `time.monotonic` clock). Sets the trainer's batch, length, `step_s` and `eval_s`; returns the lines to
    print. The trainer's state is restored afterwards."""
    cfg = trainer.cfg
    saved = trainer.snapshot()
    try:
        trainer.step = trainer.first_full_step
        lines = fit_memory(trainer, choose_batch)
        batch, workers = cfg.optim.batch_size, cfg.data.num_workers
        step_s, load_s = stage_seconds(trainer, trainer.multicrop, batch)
        trainer.schedule()  # the batch may have changed: steps per epoch too
        if trainer.highres is not None:  # the mean step over both stages
            share = (trainer.total_steps - trainer.highres_start) / trainer.total_steps
            high_s, _ = stage_seconds(trainer, trainer.highres_multicrop, trainer.batch_size(trainer.total_steps - 1))
            step_s = (1 - share) * step_s + share * high_s
        step_s += epoch_seconds(trainer) / trainer.steps_per_epoch  # what each epoch adds, spread over its steps
        trainer.eval_s, trainer.step_s = eval_seconds(trainer, workers), step_s
    finally:
        trainer.restore(saved)
    if budget_s is not None:
        left = budget_s - (time.monotonic() - started) - trainer.eval_s
        steps = int(left * 0.97 / step_s)  # 3 %: the export, the loader's start, the exit
        if steps < 1:
            raise UserError(f"train.time={cfg.train.time}: too short; the set-up took "
                            f"{format_duration(time.monotonic() - started)}, the final evaluation needs "
                            f"~{format_duration(trainer.eval_s)} and one step {step_s:.2f}s")
        cfg.optim.steps = steps
        trainer.train_until = trainer.clock() + steps * step_s  # `Trainer.replan` keeps to it
        lines.append(f"time budget {cfg.train.time}: {steps:,} steps fit")
    trainer.schedule()
    loader = f"loader {1 / load_s:,.0f} img/s per worker x {workers}" if workers else "no loader workers"
    lines.append(f"speed: {step_s:.3f} s/step at batch {batch} ({batch / step_s:,.0f} img/s; {loader})")
    return lines
