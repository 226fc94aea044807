"""`train.loggers`: TensorBoard, Weights & Biases, MLflow and a CSV file, beside metrics.jsonl.

They get the scalars of metrics.jsonl's rows (a step's losses and schedules, the periodic k-NN) and the final
k-NN table, from rank 0 only. Each but csv is an optional install (`pip install 'selfsup[tensorboard]'`),
imported only when asked for. A resumed run continues the logged run it began: W&B and MLflow by the ids kept
in RUN/loggers.json, TensorBoard (RUN/tensorboard/) and RUN/metrics.csv by dropping what was logged after the
checkpoint, as metrics.jsonl does; those steps are logged again.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sys
import uuid
from pathlib import Path

from ..config import Config, flat, to_dict
from ..core.errors import UserError
from ..core.io import atomic_write


class Logger:
    """Made with the run folder, its config, the step it continues from (0: a new run) and the ids kept in
    loggers.json (a logger adds its own)."""

    def __init__(self, out: Path, cfg: Config, step: int, ids: dict) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Written out (the end of training, before the final evaluation)."""

    def close(self) -> None:
        """Done."""


class TensorBoard(Logger):
    """Scalars in RUN/tensorboard/, one tag per key."""

    def __init__(self, out: Path, cfg: Config, step: int, ids: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events of steps >= step + 1 in earlier files (logged before a kill)
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Logger):
    """A W&B run named after the run folder, with the config; the project is $WANDB_PROJECT, else selfsup. Its id
    is kept in loggers.json and passed back on resume (W&B ignores steps it has logged already)."""

    def __init__(self, out: Path, cfg: Config, step: int, ids: dict) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "selfsup"), name=out.name, dir=str(out),
                              config=to_dict(cfg), id=ids.get("wandb") or uuid.uuid4().hex[:8], resume="allow")
        ids["wandb"] = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Logger):
    """An MLflow run (where $MLFLOW_TRACKING_URI and $MLFLOW_EXPERIMENT_NAME say) named after the run folder, the
    config as its parameters; its run_id is kept in loggers.json and continued on resume."""

    def __init__(self, out: Path, cfg: Config, step: int, ids: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        run_id = ids.get("mlflow")
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        if not run_id:
            mlflow.log_params(flat(to_dict(cfg)))
        ids["mlflow"] = run.info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Csv(Logger):
    """RUN/metrics.csv: a row per logged row, a column per key (empty where a row has none). A key not seen
    before (the first k-NN, a new metric after resume) widens the header: the file is rewritten once with the
    new column, so it always has one header that names every column."""

    def __init__(self, out: Path, cfg: Config, step: int, ids: dict) -> None:
        self.path = out / "metrics.csv"
        self.columns, rows = self.read()
        self.write([r for r in rows if int(r["step"]) <= step])

    def read(self) -> tuple[list[str], list[dict]]:
        """The header and the whole rows (a line cut short by a kill is dropped)."""
        if not self.path.exists():
            return [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), [r for r in reader if None not in r.values()]

    def write(self, rows: list[dict]) -> None:
        if self.columns:
            text = io.StringIO()
            writer = csv.DictWriter(text, self.columns, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write(self.path, text.getvalue())

    def log(self, values: dict[str, float], step: int) -> None:
        row = {"step": step, **values}
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self.write([*self.read()[1], row])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="", lineterminator="\n").writerow(row)


KINDS: dict[str, type[Logger]] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "csv": Csv}
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # what each needs installed


def require(names: tuple[str, ...]) -> None:
    """A UserError for the first logger whose package is not installed (checked before any training)."""
    for name in names:
        module = MODULES.get(name)
        if module and module not in sys.modules and importlib.util.find_spec(module) is None:
            raise UserError(f"train.loggers: {name} is not installed (pip install 'selfsup[{name}]')")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row, but its step."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_knn(table: dict) -> dict[str, float]:
    """The final k-NN table as scalars: the trained backbone's as knn_top1/5 (the periodic k-NN's tags), the
    baselines as knn_random_init_top1, knn_raw_pixels_top1, ..."""
    return {f"knn_{k}" if name == "trained" else f"knn_{name}_{k}": v for name, r in table.items() for k, v in r.items()}


class Loggers:
    """The run's loggers, as one."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, row: dict) -> None:
        """A metrics.jsonl row (with its step)."""
        values = scalars(row)
        for logger in self.loggers:
            logger.log(values, int(row["step"]))

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def open_loggers(names: tuple[str, ...], out: Path, cfg: Config, step: int, rank: int) -> Loggers:
    """The loggers `names` of the run folder `out`, continuing from `step` (0: a new run); on ranks other than
    0, none."""
    if rank != 0 or not names:
        return Loggers([])
    require(names)
    saved = out / "loggers.json"
    ids = json.loads(saved.read_text()) if saved.exists() else {}
    loggers = [KINDS[name](out, cfg, step, ids) for name in names]
    if ids:
        atomic_write(saved, json.dumps(ids, indent=2) + "\n")
    return Loggers(loggers)
