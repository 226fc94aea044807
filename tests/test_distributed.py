"""Two processes (gloo, CPU) with batch B/2 each must train exactly like one process with batch B, stochastic
depth included (each sample draws its drop path by its row in the global batch).

All multi-process cases run in one spawn of two workers (process start-up is the slow part on a shared CPU);
each worker trains every case, then saves what its rank ended with, and the tests compare.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from selfsup.cli import main
from selfsup.config import Config, load_recipe
from selfsup.core import distributed
from selfsup.training.distributed import sync_batchnorm
from selfsup.training.trainer import Interrupted, Trainer
from tiny import ARGS, losses, tiny_config


def shipped_drop_path(recipe: str, depth: int = 2) -> dict:
    """The stochastic depth a recipe ships (rate, linear or uniform over depth), on the tiny ViT with `depth`
    blocks (DINO's linear rule gives the first block 0: one block would never drop)."""
    cfg = Config()
    load_recipe(cfg, recipe)
    return {"depth": depth, "drop_path": cfg.backbone.drop_path, "drop_path_uniform": cfg.backbone.drop_path_uniform}


DINO_DROP = shipped_drop_path("dino_imagenet")  # 0.1, linear: the last block's plain per-sample masks
DINOV2_DROP = shipped_drop_path("dinov2_imagenet")  # 0.3, uniform: above 0.1 the kept subset (efficient variant)
STEPS = 5
CASES = {
    # BatchNorm in the head: batch statistics over all ranks
    "dino": tiny_config("dino", STEPS, dino={"use_bn": True}, backbone=DINO_DROP),
    # the DINOv2 method with its recipe's drop path. Left out, as they depend on the rank's batch by the reference's
    # design: KoLeo (nearest neighbours within each rank's batch) and DINOv2's masking rule (over each rank's
    # batch, as dinov2/data/collate.py per GPU); iBOT's per-image rule masks the same crops on any number of ranks
    "dinov2": tiny_config("dinov2", STEPS, backbone={**DINOV2_DROP, "layerscale": 0.1, "n_registers": 1},
                          ibot={"separate_head": True, "masking": "ibot", "head_n_prototypes": 128,
                                "head_hidden_dim": 32, "head_bottleneck_dim": 16},
                          dinov2={"koleo_loss_weight": 0.0}),
    "simclr": tiny_config("simclr", STEPS, crops={"n_local": 0}),
    # FSDP2: each rank holds half of every parameter; checkpointed at step 3, resumed from it for steps 4-5 (the
    # resumed steps draw their drop path again alike); rate 0.4, uniform: the kept subset under FSDP
    "dino_fsdp": tiny_config("dino", STEPS, train={"distributed": "fsdp", "checkpoint_every": 3},
                             backbone={"depth": 2, "drop_path": 0.4, "drop_path_uniform": True}),
    # MoCo v2's shuffling BN on a ResNet: per-rank BatchNorm over 2 groups of 4, keys shuffled across the ranks
    "moco_shuffle_bn": tiny_config("moco", STEPS, crops={"n_local": 0}, backbone={"arch": "resnet18", "cifar_stem": True},
                                   moco={"version": 2, "shuffle_bn": 2, "hidden_dim": 32, "out_dim": 16, "queue_size": 32}),
}
LOCAL_BN = {"moco_shuffle_bn"}  # BatchNorm running statistics are per rank (only training-mode outputs agree)


def batchnorm_case(out: Path) -> None:
    """A conv + BatchNorm net: each rank holds half of a batch of 8; saves outputs, gradients, running stats."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    net = sync_batchnorm(net, torch.device("cpu"))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    share = x.chunk(distributed.world_size())[distributed.rank()]
    model = nn.parallel.DistributedDataParallel(net) if distributed.enabled() else net
    y = model(share)
    (y ** 2).mean().backward()
    torch.save({"y": distributed.all_gather(y.detach()), "grads": [p.grad for p in net.parameters()],
                "running": [net[1].running_mean, net[1].running_var]}, out / f"bn-{distributed.rank()}.pt")


def sinkhorn_case(out: Path) -> None:
    """DINOv2's Sinkhorn-Knopp targets of 12 teacher rows, each rank holding its share."""
    from selfsup.methods.dinov2 import sinkhorn_knopp

    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(2)) * 3
    share = logits.chunk(distributed.world_size())[distributed.rank()]
    q = distributed.all_gather(sinkhorn_knopp(share, temp=0.1, n_iterations=3))
    torch.save(q, out / f"sinkhorn-{distributed.rank()}.pt")


def signal_case(out: Path) -> None:
    """SIGTERM reaches rank 1 alone during step 3: both ranks stop after that step, rank 0 saves."""
    trainer = Trainer(tiny_config("dino", STEPS), out / "signal")
    make = trainer.batch

    def batch(views):
        if trainer.step == 2 and distributed.rank() == 1:
            trainer._on_signal(signal.SIGTERM, None)
        return make(views)

    trainer.batch = batch
    with pytest.raises(Interrupted):
        trainer.fit()
    (out / "signal" / f"stopped-{distributed.rank()}").write_text(str(trainer.step))


def worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init(torch.device("cpu"))
    for name, cfg in CASES.items():
        trainer = Trainer(cfg, out / name)
        trainer.fit()
        if name == "dino_fsdp":  # lose the last checkpoint, continue from the one at step 3
            if rank == 0:
                (out / name / f"checkpoint-{STEPS:08d}.pt").unlink()
            torch.distributed.barrier()
            trainer = Trainer(cfg, out / name, resume=True)
            trainer.fit()
        if trainer.method is not None:  # under FSDP, rank 0 alone gathers the whole method
            torch.save(trainer.method.state_dict(), out / name / f"state-{rank}.pt")
    batchnorm_case(out)
    sinkhorn_case(out)
    signal_case(out)
    trainer.close()
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(two ranks, one process) run folders of every case."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    mp.spawn(worker, args=(2, free_port(), two), nprocs=2, join=True)
    for name, cfg in CASES.items():
        trainer = Trainer(cfg, one / name)
        trainer.fit()
        torch.save(trainer.method.state_dict(), one / name / "state-0.pt")
    batchnorm_case(one)
    sinkhorn_case(one)
    return two, one


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_like_one_process(runs, name):
    two, one = runs
    l2, l1 = losses(two / name), losses(one / name)
    assert list(l1) == list(l2) == list(range(1, STEPS + 1))
    # issue 13's acceptance: 1e-5 of the loss. float32 sums reassociated by other BLAS kernels and CPUs drift by
    # ~2e-6 of it over the steps (1.55e-5 on a loss of ~7 on an AMD EPYC); a real difference (statistics or keys of
    # the wrong rank) is ~1e-2
    assert list(l2.values()) == pytest.approx(list(l1.values()), rel=1e-5, abs=1e-6)
    assert len(set(l1.values())) == STEPS  # the steps really differ (a constant would also "match")


def test_the_cases_drop_paths_plain_and_efficient():
    """The equivalence above covers stochastic depth: DINO's per-sample masks (rate <= 0.1) and the kept subset
    (rate > 0.1) of DINOv2 and of the FSDP case, on blocks that do drop (the tiny ViT has 2)."""
    from selfsup.nn import backbone_from_config

    rates = {name: [b.drop_path for b in backbone_from_config(CASES[name].backbone).blocks]
             for name in ("dino", "dinov2", "dino_fsdp")}
    assert 0 < max(rates["dino"]) <= 0.1
    assert min(rates["dinov2"]) > 0.1 and min(rates["dino_fsdp"]) > 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_end_identical_and_equal_to_one_process(runs, name):
    """The teacher EMA (and every buffer, e.g. DINO's centre) is bit-identical on every rank, and equal to
    one process's with the whole batch up to float noise (which the optimiser's normalisation amplifies on
    parameters whose gradients are near zero)."""
    two, one = runs
    ref = torch.load(one / name / "state-0.pt")
    states = [torch.load(p) for p in sorted((two / name).glob("state-*.pt"))]
    assert len(states) == (1 if name == "dino_fsdp" else 2)
    for k in ref:
        if name in LOCAL_BN and ("running_" in k or "num_batches_tracked" in k):
            continue
        for s in states:
            assert torch.equal(s[k], states[0][k]), k
        torch.testing.assert_close(states[0][k], ref[k], atol=1e-4, rtol=1e-4, msg=k)


def test_only_rank_zero_writes(runs):
    two, _ = runs
    run = two / "dino"
    assert (run / "metrics.jsonl").exists()  # the export is the command's (below)
    assert len(list(run.glob("checkpoint-*.pt"))) == 1
    assert not list(run.glob(".*tmp*"))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs):
    two, _ = runs
    assert [(two / "signal" / f"stopped-{r}").read_text() for r in range(2)] == ["3", "3"]
    assert [p.name for p in (two / "signal").glob("checkpoint-*.pt")] == ["checkpoint-00000003.pt"]


def test_sinkhorn_knopp_sums_over_ranks(runs):
    """Targets of rows split over 2 ranks equal those of one process with all rows; the per-rank version
    (no all-reduce) would not."""
    from selfsup.methods.dinov2 import sinkhorn_knopp

    two, one = runs
    ref = torch.load(one / "sinkhorn-0.pt")
    for r in range(2):
        torch.testing.assert_close(torch.load(two / f"sinkhorn-{r}.pt"), ref, atol=1e-6, rtol=1e-5)
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(2)) * 3
    per_rank = torch.cat([sinkhorn_knopp(h, temp=0.1, n_iterations=3) for h in logits.chunk(2)])
    assert not torch.allclose(per_rank, ref, atol=1e-3)


def test_global_batchnorm_matches_one_process_batch(runs):
    """BatchNorm statistics over the global batch: outputs, gradients (averaged by DDP) and running
    statistics of two ranks equal one process's with the whole batch."""
    two, one = runs
    ref = torch.load(one / "bn-0.pt")
    for r in range(2):
        got = torch.load(two / f"bn-{r}.pt")
        torch.testing.assert_close(got["y"], ref["y"], atol=1e-6, rtol=1e-5)
        for g, g_ref in zip(got["grads"], ref["grads"]):
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
        for s, s_ref in zip(got["running"], ref["running"]):
            torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=1e-5)


def test_per_rank_batchnorm_would_differ(runs):
    """The check above can fail: BatchNorm over each half alone gives other outputs."""
    _, one = runs
    ref = torch.load(one / "bn-0.pt")["y"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    halves = torch.cat([net(h) for h in x.chunk(2)]).detach()
    assert not torch.allclose(halves, ref, atol=1e-3)


def test_torchrun_trains_on_shards_and_only_rank_zero_reports(tmp_path):
    """The real entry point: `torchrun --nproc-per-node 2 -m selfsup train` on tar shards split over ranks."""
    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / "folder" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "folder" / f"c{i % 2}" / f"{i}.png")
    assert main(["shards", str(tmp_path / "folder"), "--out", str(tmp_path / "shards"), "--shard-size", "10"]) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "selfsup",
           "train", *ARGS, "--data", f"{tmp_path}/shards/{{000000..000003}}.tar", "--out", str(run), "--steps", "3",
           "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"steps": 3') == 1  # one JSON result, from rank 0
    assert sorted(losses(run)) == [1, 2, 3] and (run / "results.json").exists()
    assert (run / "backbone.safetensors").exists() and not list(run.glob(".*tmp*"))
