"""`selfsup bench` and the measuring code behind it (no timing assertions: the machine is shared)."""
import html
import json
from pathlib import Path

import pytest
import torch
from tiny import ARGS

from selfsup.bench import time_variants
from selfsup.core.machine import PeakMemory
from selfsup.cli import main

TINY = ["--arch", "vit_tiny", "--patch-size", "8", "--img-size", "32", "--depth", "1", "--batch-size", "2",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--json"]


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_both_backends_in_one_run(capsys, mode):
    r = run_json(capsys, ["bench", *TINY, "--mode", mode, "--attention", "both"])
    v = r["variants"]
    assert set(v) == {"flash", "math"} and r["mode"] == mode and r["machine"]["cpu_count"] >= 1
    for name, x in v.items():
        assert len(x["step_s"]) == 2 and x["images_per_s"] == pytest.approx(2 / x["median_step_s"], rel=1e-2)
        assert x["peak_memory_mib"] > 10 and x["setting"]["attention"] == name
    assert r["ratio_flash_math"] == pytest.approx(v["flash"]["images_per_s"] / v["math"]["images_per_s"], rel=1e-2)


def test_bench_method_step_bf16(capsys):
    r = run_json(capsys, ["bench", *TINY, "--method", "dino", "--attention", "math", "--dtype", "bf16",
                          "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "crops.n_local=2",
                          "crops.local_size=16"])
    assert r["method"] == "dino" and list(r["variants"]) == ["math"]
    assert r["variants"]["math"]["setting"]["dtype"] == "bf16"


def test_bench_bad_input_is_a_user_error(capsys):
    assert main(["bench", *TINY, "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert main(["bench", *TINY, "--attention", "efficient"]) == 2
    assert "no CPU kernel" in capsys.readouterr().err
    assert main(["bench", *TINY, "backbone.nope=1"]) == 2
    assert "unknown config key 'backbone.nope'" in capsys.readouterr().err


def test_variants_are_interleaved_after_warmup():
    order = []
    timed = time_variants({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, 2,
                          torch.device("cpu"))
    assert order == ["a", "b"] * 5
    assert all(len(t["step_s"]) == 3 for t in timed.values())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_memory_is_per_variant():
    def big() -> None:
        torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched

    timed = time_variants({"big": big, "small": lambda: None}, 1, 0, torch.device("cpu"))
    assert timed["big"]["peak_memory_mib"] - timed["small"]["peak_memory_mib"] > 200
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    assert memory.read() < timed["big"]["peak_memory_mib"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step DINO run of tests/tiny.py: config.yaml, backbone.safetensors, metrics.jsonl."""
    run = tmp_path_factory.mktemp("bench") / "run"
    assert main(["train", *ARGS, "--out", str(run), "--steps", "2"]) == 0
    return run


def test_bench_checkpoint_times_the_runs_model_and_the_report_shows_it(tiny_run, capsys):
    r = run_json(capsys, ["bench", "--checkpoint", str(tiny_run), "--steps", "2", "--warmup", "1", "--json"])
    assert json.loads((tiny_run / "bench.json").read_text()) == r
    assert not list(tiny_run.glob(".bench.json.tmp*"))
    assert r["method"] == "dino" and r["crops"] == {"n_global": 2, "global_size": 16, "n_local": 2, "local_size": 8}
    assert r["batch_size"] == 8 and r["device"] == "cpu" and r["weights"].endswith("backbone.safetensors")
    assert r["machine"]["cpu_count"] >= 1
    for mode in ("train", "infer"):
        v = r[mode]["variants"]
        assert set(v) == {"flash", "math"} and r[mode]["img_size"] == 16 and r[mode]["batch_size"] == 8
        assert all(x["images_per_s"] > 0 and x["setting"]["attention"] == k for k, x in v.items())
        assert r[mode]["ratio_flash_math"] > 0
    assert r["train"]["method"] == "dino" and r["infer"]["method"] is None

    assert main(["report", str(tiny_run), "--n", "1"]) == 0
    page = (tiny_run / "report.html").read_text()
    flash_math = page.split("<h2>FlashAttention on vs off</h2>")[1].split("<h2>")[0]
    for mode, row in (("train", "training step"), ("infer", "inference")):
        v = r[mode]["variants"]
        cells = [row, f"{v['flash']['images_per_s']:.1f}", f"{v['math']['images_per_s']:.1f}",
                 f"{r[mode]['ratio_flash_math']:.2f}x", f"{v['flash']['peak_memory_mib']:.0f}",
                 f"{v['math']['peak_memory_mib']:.0f}"]
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in flash_math
    assert "batch 8" in flash_math and "crops 2 x 16 px + 2 x 8 px" in flash_math
    assert html.escape(r["machine"]["cpu"]) in flash_math  # the machine it was measured on


def test_bench_checkpoint_flags_keep_their_meaning(tiny_run, capsys):
    r = run_json(capsys, ["bench", "--checkpoint", str(tiny_run), "--mode", "infer", "--attention", "math",
                          "--batch-size", "3", "--dtype", "bf16", "--steps", "1", "--warmup", "0", "--json"])
    assert "train" not in r and list(r["infer"]["variants"]) == ["math"] and r["batch_size"] == 3
    assert r["dtypes"] == ["bf16"] and "ratio_flash_math" not in r["infer"]


def test_bench_bad_checkpoint_is_one_line(tmp_path, tiny_run, capsys):
    for bad, says in ((tmp_path / "nope", "not a run folder"), (tmp_path, "not a run folder")):
        assert main(["bench", "--checkpoint", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and str(bad) in err[0]
    assert main(["bench", "--checkpoint", str(tiny_run), "--arch", "vit_small", "--img-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfsup: error: bench --checkpoint times the run's own model: drop --arch, --img-size (or bench "
                   "without --checkpoint)"]
