"""The training loop shared by every method: schedules, AMP, compile, checkpoints, resume, logs, and the periodic
evaluation its caller hands it (evaluation sits above training)."""
from __future__ import annotations

import copy
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..config import Config, highres_crops, parse_duration, run_dict, save
from ..core import distributed
from ..core.device import autocast, resolve_device
from ..core.errors import UserError
from ..core.io import atomic_write, read_metrics
from ..core.machine import free_memory, process_memory
from ..core.progress import format_duration
from ..core.seeds import rng_state, set_rng_state, step_seed
from ..data.builtin import open_source
from ..data.channels import fit_to_source
from ..data.loader import epoch_loader, make_batches
from ..data.views import MultiCrop, Photometric
from ..methods import build_method, method_class
from ..methods.base import Batch, Method
from ..nn.attention import set_attention_backend
from ..nn.sample_rng import sample_streams
from .checkpoint import last_before, latest, load_latest, read_run, save_checkpoint
from .distributed import full_state, load_full_state, sharded, sync_batchnorm, wrap
from .loggers import Loggers, final_knn, open_loggers, require
from .optim import build_optimizer, clip_gradients, set_schedule
from .plan import human_bytes, is_out_of_memory, plan_run
from .runlog import RunLog
from .schedules import Schedules, run_length
from .watchdog import Watchdog

log = logging.getLogger("selfsup")


class Interrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume` continues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class Collapsed(Exception):
    """The collapse watchdog fired with train.stop_on_collapse: the run stopped, its last good checkpoint kept."""

    exit_code = 3


def training_source(spec: str):
    """A labelled source trains on its train split (its test split is held out for evaluation)."""
    src = open_source(spec)
    return open_source(spec, "train") if src.labelled else src


EPOCH_END_STEPS = 100  # epoch ends are checkpointed and logged at least this many steps apart
REPLAN_STEPS = 100  # with train.time, the run length is fitted again to the measured speed this often
HIGHRES_EPOCH = 1_000_000  # the data epochs of the high-resolution stage count from here


def trim_metrics(path: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: drop them (and a line cut short by a kill)."""
    if path.exists():
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step))


Evaluate = Callable[[nn.Module, Config, torch.device], dict | None]  # backbone, config, device -> k-NN top-1/top-5


class Trainer:
    def __init__(self, cfg: Config, out: Path, resume: bool = False, run_log: RunLog | None = None,
                 evaluate: Evaluate | None = None):
        """`evaluate`: the k-NN every eval.every steps (`eval.run.knn_of_backbone`), logged to metrics.jsonl;
        without it there is none."""
        require(cfg.train.loggers)  # a logger that is not installed: an error before anything is built
        # the config that builds the method (a distillation's heads take its teacher's sizes) is the one saved
        cfg, networks = method_class(cfg.method).inputs(cfg, read_run)
        self.cfg, self.out, self.resume, self.evaluate = cfg, out, resume, evaluate
        self.device = distributed.init(resolve_device(cfg.train.device))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.source = training_source(cfg.data.source)
        fit_to_source(cfg, self.source)  # backbone.in_chans channels; auto crops.mean / crops.std computed
        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg, **networks)
        if not method.local_batchnorm:
            method = sync_batchnorm(method, self.device)
        self.method = method.to(self.device)
        set_attention_backend(self.method, cfg.train.attention, self.device)  # training and evaluation
        self.multicrop = MultiCrop(cfg.crops, cfg.train.seed, self.method.masking())
        self.highres = highres_crops(cfg)  # DINOv2's high-resolution stage, or None
        self.schedule()
        self.photometric = Photometric(cfg.crops, self.method.blur_kernel)
        self.model = wrap(self.method, cfg.train.distributed, self.device)  # what forward calls
        self.sharded = sharded(self.method)
        self.optimizer = build_optimizer(self.method.student_modules(), cfg, self.device, self.method.no_decay)
        self.run_log = run_log or RunLog()
        self.watchdog = Watchdog(self.method.collapse_checks(), cfg.train.collapse_patience)
        self.eval_s = 0.0  # the final evaluation's expected seconds (from the trial steps)
        self.step_s = 0.0  # seconds per step: from the trial steps, then measured
        self.train_until: float | None = None  # train.time: when the last step should end (`clock`), set by the plan
        self.clock = time.monotonic
        self.collapse_warnings: list[dict] = []
        self.loggers = Loggers([])  # train.loggers, opened by `fit`
        self.step = 0
        self.bad_steps = 0  # non-finite losses in a row
        self.skipped_steps = 0  # in all
        self._signal: int | None = None
        self.stop = False  # a signal reached some rank: every rank stops after this step

    def close(self) -> None:
        """Let go of the DDP/FSDP wrapper before `distributed.shutdown` (see there); `method` stays usable."""
        self.model = self.method

    def schedule(self) -> None:
        """Batches, run length and schedules from the config (again after the trial steps change them)."""
        cfg, o = self.cfg, self.cfg.optim
        self.batches = make_batches(self.source, self.multicrop, o.batch_size, self.rank, self.world, cfg.train.seed)
        self.steps_per_epoch = len(self.batches)  # a pass over the data: checkpoints and the loader's epochs
        self.lengths()

    def lengths(self) -> None:
        """The run length, the schedules over it and the high-resolution stage's start, from the config."""
        cfg, o = self.cfg, self.cfg.optim
        self.total_steps, schedule_epoch = run_length(o, self.steps_per_epoch)
        self.schedules = Schedules.build(cfg, self.method.schedules(), self.total_steps, schedule_epoch)
        self.highres_start = self.total_steps  # the step the high-resolution stage begins at
        if self.highres is not None:  # highres.steps, scaled to the run like the recipe's epoch counts
            steps = max(1, round(cfg.highres.steps * self.schedules.epoch_scale))
            self.highres_start = max(0, self.total_steps - steps)
            self.highres_multicrop = MultiCrop(self.highres, cfg.train.seed, self.method.masking(self.highres))
            self.highres_batches = make_batches(self.source, self.highres_multicrop,
                                                self.batch_size(self.total_steps - 1), self.rank, self.world,
                                                cfg.train.seed)

    def compile(self) -> None:
        """With train.compile, the training forward through torch.compile (after the trial steps)."""
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)

    @property
    def first_full_step(self) -> int:
        """The first step at which every parameter trains (after what the method's schedules hold back)."""
        return min(self.schedules.first_full_step, self.total_steps - 1)

    def batch_size(self, step: int) -> int:
        """The global batch of step `step` (0-based): highres.batch_size in the high-resolution stage."""
        if step >= self.highres_start and self.cfg.highres.batch_size:
            return self.cfg.highres.batch_size
        return self.cfg.optim.batch_size

    def position(self) -> tuple:
        """(batches, data epoch, first batch, the step this stretch ends at) for the current step. The
        high-resolution stage counts its own epochs from HIGHRES_EPOCH, so its crops differ from the first
        stage's and a resumed run finds them again."""
        if self.step < self.highres_start:
            return (self.batches, *divmod(self.step, self.steps_per_epoch), self.highres_start)
        epoch, start = divmod(self.step - self.highres_start, len(self.highres_batches))
        return self.highres_batches, HIGHRES_EPOCH + epoch, start, self.total_steps

    # ----- state -----
    def state(self) -> dict:
        """Everything a run needs to continue; under FSDP gathered from all ranks (every rank must call)."""
        method_state, optimizer = full_state(self.method, self.optimizer)
        return {"method_state": method_state, "optimizer": optimizer, "step": self.step, "config": run_dict(self.cfg, self.method.sections), "rng": rng_state(), "method": self.cfg.method,
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps}

    def load_state(self, state: dict) -> None:
        load_full_state(self.method, self.optimizer, state["method_state"], state["optimizer"])
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        set_rng_state(state["rng"])

    def snapshot(self) -> tuple:
        """The method's state, the RNG and the step, for `restore` after trial steps."""
        return copy.deepcopy(self.method.state_dict()), rng_state(), self.step

    def restore(self, saved: tuple) -> None:
        """Back to `snapshot`, with a fresh optimiser: as if the trial steps never ran."""
        method_state, rng, self.step = saved
        self.method.load_state_dict(method_state)
        set_rng_state(rng)
        self.optimizer = build_optimizer(self.method.student_modules(), self.cfg, self.device, self.method.no_decay)

    def checkpoint(self) -> Path | None:
        """Rank 0 writes; under FSDP every rank first helps gather the state. While a collapse monitor holds,
        the newest checkpoint from before it began is kept."""
        if not (distributed.is_main() or self.sharded):
            return None
        state = self.state()
        if not distributed.is_main():
            return None
        keep = (self.watchdog.onset - 1,) if self.watchdog.onset is not None else ()
        if 0 < self.highres_start < self.step:  # the first stage's last checkpoint: the high-resolution stage's start
            keep += (self.highres_start,)
        return save_checkpoint(self.out, self.step, state, self.cfg.train.keep_last, keep)

    def whole_method(self) -> Method | None:
        """The method with whole tensors, for evaluation and export: itself, or under FSDP a copy gathered
        from every rank (all ranks must call; None on ranks other than 0)."""
        if not self.sharded:
            return self.method
        state, _ = full_state(self.method)
        if not distributed.is_main():
            return None
        whole = build_method(self.cfg, **method_class(self.cfg.method).inputs(self.cfg, read_run)[1])
        whole.load_state_dict(state)
        return whole.to(self.device)

    # ----- one step -----
    def batch(self, views) -> Batch:
        views = views.to(self.device)
        local = self.photometric(views.local_crops) if views.local_crops is not None else None
        c = self.cfg.crops
        return Batch(self.photometric(views.global_crops), local, views.masks, views.labels, c.n_global,
                     c.n_local if local is not None else 0)

    def train_step(self, views) -> dict[str, float] | None:
        progress = self.schedules.progress(self.step)
        lr = float(self.schedules.lr[self.step])
        wd = float(self.schedules.weight_decay[self.step])
        backbone = float(self.schedules.backbone[self.step])
        set_schedule(self.optimizer, lr, wd, backbone)
        seed = step_seed(self.cfg.train.seed, self.step)
        torch.manual_seed(seed)
        batch = self.batch(views)
        saved = [b.detach().clone() for b in self.method.buffers()]  # DINO's centre, BatchNorm statistics
        # per-sample draws (drop path) by each sample's row in the global batch: any number of ranks, one run
        with sample_streams(seed, views.batch_size, self.rank, self.world), \
                autocast(self.device, self.cfg.train.precision):
            out = self.model(batch, progress)
        out["loss"].backward()  # on every rank, even for a non-finite loss: DDP averages the gradients of all
        metrics = self.reduce_metrics(out)
        if not math.isfinite(metrics["loss"]):  # skip the step: parameters, optimiser and buffers untouched
            self.optimizer.zero_grad(set_to_none=True)
            for b, old in zip(self.method.buffers(), saved):
                b.copy_(old)
            return None
        self.method.before_optimizer_step(progress)
        if backbone == 0.0:  # a continued backbone, frozen while its new heads learn: no update, no optimiser state
            for p in self.method.student_modules()["backbone"].parameters():
                p.grad = None
        if self.cfg.optim.clip_grad > 0:
            mode = self.cfg.optim.clip_mode
            clip_gradients(self.method.student_modules(), self.cfg.optim.clip_grad,
                           self.method.clip_mode if mode == "auto" else mode)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(progress)
        metrics.update(lr=lr, wd=wd, **progress.values())
        if self.cfg.init.mode == "backbone":
            metrics["backbone_lr"] = lr * backbone
        return metrics

    def reduce_metrics(self, out: dict) -> dict[str, float]:
        """The global means of the per-rank losses and metrics, in one all-reduce that also tells every rank
        whether any was signalled (so that all stop after the same step)."""
        values = [torch.as_tensor(v, dtype=torch.float32, device=self.device).detach().reshape(()) for v in out.values()]
        flag = torch.tensor(float(self._signal or 0), device=self.device)
        *means, signalled = distributed.mean_over_ranks(torch.stack([*values, flag])).tolist()
        if signalled:
            self._signal = self._signal or signal.SIGTERM
            self.stop = True
        return dict(zip(out, means))

    # ----- the run -----
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signal = signum

    def fit(self, choose_batch: bool = False, started: float | None = None) -> dict:
        """Train. Before a new run's first step, trial steps fit the batch to memory (`choose_batch`: pick a
        smaller one if needed, else an error naming the largest that fits) and, with train.time, the length to
        the time left since `started` (time.monotonic())."""
        cfg = self.cfg
        if self.resume:
            found = load_latest(self.out)
            if found is None:
                log.info("%s: nothing to resume, starting a new run", self.out)
            else:
                self.load_state(found[1])
                log.info("resumed from %s at step %d", found[0].name, self.step)
        elif latest(self.out) is not None:
            raise UserError(f"{self.out}: this run folder already has checkpoints (pass --resume to continue it, "
                            "or --out for a new run)")
        if self.step == 0 and self.world == 1:  # under torchrun the ranks would have to agree: no trial steps
            budget = parse_duration(cfg.train.time) if cfg.train.time else None
            for line in plan_run(self, choose_batch, budget, started if started is not None else time.monotonic()):
                log.info(line)
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            self.run_log.open(self.out)
            trim_metrics(self.out / "metrics.jsonl", self.step)  # steps of a run killed after its checkpoint
            save(cfg, self.out / "config.yaml", self.method.sections)  # as planned: a resumed run continues this plan
        self.loggers = open_loggers(cfg.train.loggers, self.out, cfg, self.step, self.rank)
        self.compile()
        passes = self.total_steps / self.steps_per_epoch
        epochs = f"{passes:.1f} epochs" if not cfg.optim.epoch_length else (
            f"{self.total_steps / cfg.optim.epoch_length:.1f} epochs of {cfg.optim.epoch_length} steps, "
            f"{passes:.1f} passes over the data")
        if self.highres is not None:
            epochs += f"; the last {self.total_steps - self.highres_start} at {self.highres.global_size} px"
        log.info("%s on %s: %d images, batch %d, %d steps (%s), device %s", cfg.method, self.source.name,
                 len(self.source), cfg.optim.batch_size, self.total_steps, epochs, self.device)
        if self.step_s:
            train_s = (self.total_steps - self.step) * self.step_s
            log.info("ETA %s: %d steps at %.0f img/s (%s) + final evaluation (~%s), ending about %s",
                     format_duration(train_s + self.eval_s), self.total_steps - self.step,
                     cfg.optim.batch_size / self.step_s, format_duration(train_s), format_duration(self.eval_s),
                     time.strftime("%H:%M", time.localtime(time.time() + train_s + self.eval_s)))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop()
        except Exception as e:
            self.loggers.close()
            if not is_out_of_memory(e):
                raise
            raise UserError(f"out of memory at step {self.step + 1} with batch {self.batch_size(self.step)} "
                            f"({human_bytes(process_memory(self.device))} in use, {human_bytes(free_memory(self.device))} "
                            f"free on {self.device}): lower --batch-size; the last checkpoint in {self.out} is "
                            "intact") from None
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        self.loggers.flush()  # open still for `log_final`
        return self._finish()

    def log_step(self, m: dict[str, float], ips: float) -> None:
        """Every train.log_every steps: on the terminal's bar, else one line (stderr and train.log)."""
        eta = (self.total_steps - self.step) * self.step_s + self.eval_s
        line = (f"step {self.step}/{self.total_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {ips:,.0f} img/s  "
                f"ETA {format_duration(eta)}")
        if "teacher_entropy" in m:
            line += f"  teacher entropy {m['teacher_entropy']:.2f}"
        if sys.stderr.isatty():
            self.run_log.write(line)
        else:
            log.info(line)

    def _loop(self) -> None:
        cfg = self.cfg
        metrics_file = open(self.out / "metrics.jsonl", "a", buffering=1) if distributed.is_main() else None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not sys.stderr.isatty() or not distributed.is_main(),
                   dynamic_ncols=True, desc=cfg.method)
        self.method.train()
        last_t = time.perf_counter()
        mark = (self.step, self.clock())  # `replan` measures the speed from here: the mean over the run so far
        try:
            while self.step < self.total_steps:
                batches, epoch, start, end = self.position()
                if self.step == self.highres_start:
                    c = self.highres
                    log.info("step %d: high-resolution stage, %d steps of %d x %d + %d x %d px crops, batch %d",
                             self.step, self.total_steps - self.step, c.n_global, c.global_size, c.n_local,
                             c.local_size, self.batch_size(self.step))
                images_per_step = self.batch_size(self.step)
                for views in epoch_loader(batches, epoch, start, cfg.data.num_workers):
                    m = self.train_step(views)
                    now = time.perf_counter()
                    dt, last_t = now - last_t, now
                    ips = images_per_step / max(dt, 1e-9)
                    # seconds per step, smoothed (the first step of an epoch also waits for the loader to start)
                    self.step_s = dt if not self.step_s else 0.95 * self.step_s + 0.05 * dt
                    self.step += 1
                    if m is None:
                        self.bad_steps += 1
                        self.skipped_steps += 1
                        log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step, self.bad_steps)
                        if self.bad_steps >= cfg.train.max_bad_steps:
                            raise UserError(f"{cfg.train.max_bad_steps} non-finite losses in a row at step {self.step}: "
                                            f"stopped; the last checkpoint in {self.out} is intact (lower optim.lr?)")
                    else:
                        self.bad_steps = 0
                        m.update(step=self.step, epoch=self.step / self.steps_per_epoch, images_per_s=ips)
                        self.record(m, metrics_file)
                        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", img_s=f"{ips:.0f}")
                        if distributed.is_main() and self.step % cfg.train.log_every == 0:
                            self.log_step(m, images_per_step / self.step_s)
                        self.watch(m, metrics_file)
                    bar.update(1)
                    if self.stop:
                        path = self.checkpoint()
                        raise Interrupted(self._signal, f"interrupted at step {self.step}: checkpoint saved to {path}; "
                                                        "continue with --resume")
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                        self.periodic_eval(metrics_file)
                    if self.train_until is not None and self.step % REPLAN_STEPS == 0:
                        self.replan(mark)
                        bar.total = self.total_steps
                    every = cfg.train.checkpoint_every
                    if (every and self.step % every == 0) or self.step == self.total_steps:
                        self.checkpoint()
                    if self.step >= min(end, self.total_steps):
                        break
                first_stage = batches is self.batches
                done = self.step - (0 if first_stage else self.highres_start)  # steps into this stage
                # an epoch's end, every few epochs where epochs are short (3-step epochs: one in 34)
                passed = done % (len(batches) * math.ceil(EPOCH_END_STEPS / len(batches))) == 0
                stage_end = self.step == self.highres_start  # checkpointed whatever train.checkpoint_every
                if self.step < self.total_steps and (stage_end or (passed and not cfg.train.checkpoint_every)):
                    self.checkpoint()
                if passed and first_stage:
                    log.info("epoch %d/%d done", self.step // self.steps_per_epoch,
                             math.ceil(self.total_steps / self.steps_per_epoch))
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()

    def replan(self, mark: tuple[int, float]) -> None:
        """train.time: fit the run's length again to the speed measured since `mark` (step, `clock`), so that the
        last step still ends at `train_until` when the machine runs slower (or faster) than the trial steps did
        (on 2 shared cores the loop ran at 0.14 s a step where the trial steps measured 0.10 s).
        The schedules stretch or shrink with the length as they would have been planned; config.yaml records it
        for --resume. A run with a high-resolution stage, whose steps have another speed, keeps its plan."""
        now = self.clock()
        steps, seconds = self.step - mark[0], now - mark[1]
        if steps <= 0 or seconds <= 0 or self.highres is not None or self.step >= self.total_steps:
            return
        total = self.step + max(1, int((self.train_until - now) * steps / seconds))
        if abs(total - self.total_steps) < max(1, 0.01 * self.total_steps):
            return
        log.info("step %d: %.3f s/step measured; %s steps now fit train.time=%s (planned %s)", self.step,
                 seconds / steps, f"{total:,}", self.cfg.train.time, f"{self.total_steps:,}")
        self.cfg.optim.steps = total
        self.lengths()
        if distributed.is_main():
            save(self.cfg, self.out / "config.yaml", self.method.sections)

    def watch(self, m: dict[str, float], metrics_file) -> None:
        """The collapse watchdog: a warning in the log and metrics.jsonl; with train.stop_on_collapse, the end."""
        warning = self.watchdog.observe(self.step, m)
        if warning is None:
            return
        log.warning(warning.message())
        self.collapse_warnings.append(warning.record())
        if metrics_file:
            metrics_file.write(json.dumps(warning.record()) + "\n")
            metrics_file.flush()
        if self.cfg.train.stop_on_collapse:
            good = last_before(self.out, warning.since - 1)
            kept = f"the last checkpoint before it, {good}, is kept" if good else "no checkpoint was saved before it"
            raise Collapsed(f"stopped at step {self.step} (train.stop_on_collapse): {warning.message()}; {kept}")

    def periodic_eval(self, metrics_file) -> None:
        if self.evaluate is None:
            return
        method = self.whole_method()
        if not distributed.is_main():
            return
        res = self.evaluate(method.backbone(), self.cfg, self.device)
        if res is not None:
            log.info("step %d: k-NN top-1 %.2f", self.step, res["top1"])
            self.record({"step": self.step, "knn_top1": res["top1"], "knn_top5": res["top5"]}, metrics_file)

    def record(self, row: dict, metrics_file) -> None:
        """A row of scalars (a step's, a k-NN result) to metrics.jsonl and train.loggers."""
        if metrics_file:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()  # a killed run keeps every step it logged
        self.loggers.log(row)

    def log_final(self, table: dict | None) -> None:
        """The final k-NN table (`eval.run.final_table`) to train.loggers at the last step; then they close."""
        if table is not None:
            self.loggers.log({"step": self.step, **final_knn(table)})
        self.loggers.close()

    def _finish(self) -> dict:
        self.method = self.whole_method()  # under FSDP: what callers evaluate and export after `fit`
        if not distributed.is_main():
            return {}
        return {"run": str(self.out), "steps": self.step, "skipped_steps": self.skipped_steps,
                "collapse_warnings": self.collapse_warnings}
