"""The Python API (`selfsup.api`): train, embed and evaluate do what their commands do, and the commands are
thin callers of them (same results, same records)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny import ARGS, losses

from selfsup.api import Run, embed, evaluate, train
from selfsup.cli import main
from selfsup.errors import UserError

# tiny.ARGS as the API's arguments: the flags by name, the key=value overrides as they are
FLAGS = dict(zip(ARGS[:4:2], ARGS[1:4:2]))
OVERRIDES = ARGS[4:]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("api") / "run"
    return train(FLAGS["--data"], "dino", out, steps=3, batch_size=int(FLAGS["--batch-size"]), overrides=OVERRIDES,
                 optim={"lr": 1e-3})


def test_train_returns_the_run_it_wrote(run, tmp_path):
    assert run.exit_code == 0 and run.path.is_dir() and run.results["steps"] == 3
    assert run.config.optim.lr == 1e-3 and run.config.optim.steps == 3  # a section dict and a named argument
    assert "run folder" in run.summary
    assert json.loads((run.path / "results.json").read_text())["steps"] == 3
    assert torch.equal(run.load().backbone.cls_token, run.load().backbone.cls_token)
    # the command gives the same losses for the same request
    cli = tmp_path / "cli"
    assert main(["train", "--steps", "3", "--out", str(cli), *ARGS, "optim.lr=1e-3"]) == 0
    assert losses(cli) == losses(run.path)


def test_bad_requests_are_one_clear_error_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="optim"):
        train("digits", out=tmp_path / "a", optim=1e-3)
    with pytest.raises(UserError, match="steps and time"):
        train("digits", out=tmp_path / "b", steps=3, time="1m")
    with pytest.raises(UserError, match="optim.lr"):
        train("digits", out=tmp_path / "c", optim={"lr": -1.0})
    assert not any(tmp_path.iterdir())


def test_evaluate_is_what_eval_prints_and_records(run, capsys):
    r = evaluate(run.path, "knn", "digits", k=[5, 20])
    assert set(r["k"]) == {"5", "20"} and r["text"][0].startswith("weighted k-NN")
    recorded = json.loads((run.path / "eval" / "knn-digits.json").read_text())
    assert recorded["k"] == r["k"] and "text" not in recorded
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run.path), "--data", "digits", "--k", "5,20", "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["k"] == r["k"] and printed[0] == r["text"][0]
    with pytest.raises(UserError, match="no option 'epochs'"):
        evaluate(run.path, "knn", "digits", epochs=3)
    with pytest.raises(UserError, match="protocol 'nope'"):
        evaluate(run.path, "nope")


def test_embed_writes_the_features_of_every_image(run, tmp_path):
    out = tmp_path / "digits.safetensors"
    r = embed(run.path, "digits", out, patch_mean=True)
    with safe_open(str(out), "pt") as f:
        feats, meta = f.get_tensor("features"), json.loads(f.metadata()["selfsup"])
        assert f.get_tensor("patch_mean").shape == feats.shape
    assert r["images"] == feats.shape[0] == 1797 and r["tensors"]["labels"] == [1797]
    assert meta["data"] == "digits" and len(meta["classes"]) == 10
    with pytest.raises(UserError, match=".safetensors"):
        embed(run.path, "digits", tmp_path / "x.npy")
