"""`selfsup bench` and the measuring code behind it (no timing assertions: the machine is shared)."""
import json
from pathlib import Path

import pytest
import torch

from selfsup.bench import PeakMemory, time_variants
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
