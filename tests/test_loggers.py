"""train.loggers: TensorBoard and the CSV file read back against metrics.jsonl, before and after a resume; W&B and
MLflow through fakes that record their calls; rank 1 logs nothing; bad or missing loggers are one line, exit 2."""
from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from selfsup.cli import main
from selfsup.config import RULES, Config
from selfsup.training import loggers
from selfsup.training.loggers import KINDS, open_loggers
from tiny import ARGS, losses


def train(out: Path, steps: int, *overrides: str, resume: bool = False) -> None:
    assert main(["train", "--steps", str(steps), "--out", str(out), *(["--resume"] if resume else []), *ARGS,
                 *overrides]) == 0


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """A tag's (step, value) events as TensorBoard reads them, a restart's purge applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(x: float) -> float:
    """What TensorBoard keeps of a float."""
    return float(np.float32(x))


def read_csv(run: Path) -> tuple[list[str], list[dict]]:
    with (run / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_tensorboard_and_csv_log_metrics_jsonl_and_the_k_nn_and_a_resume_repeats_no_step(tmp_path):
    pytest.importorskip("tensorboard")  # selfsup[tensorboard]
    run = tmp_path / "run"
    extra = ["train.loggers=[tensorboard,csv]", "eval.every=3", "train.checkpoint_every=4", "eval.final=true"]
    train(run, 6, *extra)
    (run / "checkpoint-00000006.pt").unlink()  # killed after step 6 was logged, before its checkpoint
    train(run, 6, *extra, resume=True)  # steps 5 and 6 again, and the final k-NN

    ref = losses(run)  # metrics.jsonl, trimmed and continued: steps 1..6 once each
    assert list(ref) == [1, 2, 3, 4, 5, 6]
    assert scalars(run, "loss") == [(s, f32(v)) for s, v in ref.items()]
    knn = [r for r in rows(run) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [3]
    final = json.loads((run / "results.json").read_text())["knn"]  # the resumed run's
    assert scalars(run, "knn_top1") == [(3, f32(knn[0]["knn_top1"])), (6, f32(final["trained"]["top1"]))]
    assert scalars(run, "knn_raw_pixels_top5") == [(6, f32(final["raw_pixels"]["top5"]))]
    assert [s for s, _ in scalars(run, "lr")] == [1, 2, 3, 4, 5, 6]

    columns, table = read_csv(run)
    assert columns[:2] == ["step", "loss"] and "knn_random_init_top1" in columns
    assert (run / "metrics.csv").read_text().count("step,") == 1  # one header
    assert {int(r["step"]): float(r["loss"]) for r in table if r["loss"]} == ref  # equal, not just close
    assert [(int(r["step"]), float(r["knn_top1"])) for r in table if r["knn_top1"]] == [
        (3, knn[0]["knn_top1"]), (6, final["trained"]["top1"])]


def test_csv_widens_its_header_for_a_new_column_and_drops_the_steps_after_the_checkpoint(tmp_path):
    log = loggers.Csv(tmp_path, Config(), 0, {})
    log.log({"loss": 1.5}, 1)
    log.log({"loss": 1.25}, 2)
    log.log({"loss": 1.0, "knn_top1": 40.0}, 3)  # a new column: the file is rewritten once
    assert read_csv(tmp_path) == (["step", "loss", "knn_top1"], [
        {"step": "1", "loss": "1.5", "knn_top1": ""}, {"step": "2", "loss": "1.25", "knn_top1": ""},
        {"step": "3", "loss": "1.0", "knn_top1": "40.0"}])
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("4,0.9")  # a row cut short by a kill
    log = loggers.Csv(tmp_path, Config(), 2, {})  # resumed at step 2
    log.log({"loss": 0.75, "koleo": 0.5}, 3)
    assert read_csv(tmp_path) == (["step", "loss", "knn_top1", "koleo"], [
        {"step": "1", "loss": "1.5", "knn_top1": "", "koleo": ""},
        {"step": "2", "loss": "1.25", "knn_top1": "", "koleo": ""},
        {"step": "3", "loss": "0.75", "knn_top1": "", "koleo": "0.5"}])


class FakeWandb(types.ModuleType):
    """`wandb.init(...)` returns a run with `id`, `log(values, step=)` and `finish()`; here the module is the run."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    @property
    def id(self) -> str:
        return self.inits[-1]["id"]

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished += 1


class FakeMlflow(types.ModuleType):
    """mlflow's fluent API: start_run (a new run gets an id), log_params, log_metrics, end_run."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.starts: list[dict] = []
        self.params: dict = {}
        self.logged: list[tuple[int, dict]] = []
        self.ended = 0

    def start_run(self, run_id=None, run_name=None):
        self.starts.append({"run_id": run_id, "run_name": run_name})
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "mlflow-run-1"))

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))

    def end_run(self) -> None:
        self.ended += 1


def test_wandb_and_mlflow_continue_their_run_on_resume(tmp_path, monkeypatch):
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = tmp_path / "run"
    extra = ["train.loggers=[wandb,mlflow]", "train.checkpoint_every=2"]
    train(run, 4, *extra)
    ref = losses(run)
    (wid,) = {i["id"] for i in wandb.inits}
    assert wandb.inits == [{"project": "selfsup", "name": "run", "dir": str(run), "config": wandb.inits[0]["config"],
                            "id": wid, "resume": "allow"}]
    assert wandb.inits[0]["config"]["optim"]["steps"] == 4 and wandb.finished == 1
    assert {s: v["loss"] for s, v in wandb.logged} == ref
    assert mlflow.starts == [{"run_id": None, "run_name": "run"}] and mlflow.ended == 1
    assert mlflow.params["optim.steps"] == 4 and mlflow.params["train.loggers"] == ["wandb", "mlflow"]
    assert {s: v["loss"] for s, v in mlflow.logged} == ref
    assert json.loads((run / "loggers.json").read_text()) == {"wandb": wid, "mlflow": "mlflow-run-1"}

    (run / "checkpoint-00000004.pt").unlink()
    wandb.logged.clear()
    mlflow.logged.clear()
    train(run, 4, *extra, resume=True)
    assert [i["id"] for i in wandb.inits] == [wid, wid] and wandb.inits[1]["resume"] == "allow"
    assert mlflow.starts[1] == {"run_id": "mlflow-run-1", "run_name": None}
    again = {s: v for s, v in losses(run).items() if s > 2}
    assert {s: v["loss"] for s, v in wandb.logged} == again == {s: v["loss"] for s, v in mlflow.logged}
    assert (wandb.finished, mlflow.ended) == (2, 2)


def test_a_rank_other_than_0_logs_nothing(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    logs = open_loggers(("tensorboard", "wandb", "csv"), tmp_path, Config(), 0, rank=1)
    logs.log({"step": 1, "loss": 2.0})
    logs.close()
    assert list(tmp_path.iterdir()) == [] and wandb.inits == [] and wandb.logged == []


def test_rank_0_logs_numbers_but_the_step(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    logs = open_loggers(("wandb",), tmp_path, Config(), 0, rank=0)
    logs.log({"step": 7, "loss": 2, "warning": "collapse", "flag": True})
    assert wandb.logged == [(7, {"loss": 2.0})]


def test_the_choices_are_the_loggers_implemented():
    assert next(rule.choices for rule in RULES["train.loggers"].rules) == tuple(KINDS)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("selfsup: error:")]


NAMES = "a list of distinct names among: tensorboard, wandb, mlflow, csv"


@pytest.mark.parametrize("value, expected", [
    ("[tensorboard,nope]", f"bad value for 'train.loggers': ['tensorboard', 'nope'] (expected {NAMES})"),
    ("[csv,csv]", f"bad value for 'train.loggers': ['csv', 'csv'] (expected {NAMES})"),
    ("csv", "command line: bad value for 'train.loggers': 'csv' (expected a list)"),
])
def test_an_unknown_logger_is_one_line_and_exit_2(tmp_path, capsys, value, expected):
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), f"train.loggers={value}"]) == 2
    assert error_lines(capsys.readouterr().err) == [f"selfsup: error: {expected}"]
    assert not out.exists()


def test_a_logger_not_installed_is_one_line_and_exit_2_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(loggers.MODULES, "wandb", "selfsup_no_such_module")  # wandb itself may be installed
    out = tmp_path / "run"
    assert main(["train", "--steps", "1", "--out", str(out), *ARGS, "train.loggers=[csv,wandb]"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "selfsup: error: train.loggers: wandb is not installed (pip install 'selfsup[wandb]')"]
    assert not out.exists()
