"""The README's "From Python" example runs as it stands (in a temporary folder) and gives what it says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def example() -> str:
    section = README.read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example(), "README.md (From Python)", "exec"), scope)
    run = scope["run"]
    assert run.exit_code == 0 and run.results["steps"] == 60
    assert run.config.optim.lr == 1e-3 and run.config.crops.n_local == 4
    assert (tmp_path / "runs/api-demo/digits.safetensors").exists() and (tmp_path / "runs/api-demo/backbone.onnx").exists()
    printed = capsys.readouterr().out.split()
    assert 0 < float(printed[0]) <= 100 and 0 < float(printed[-1]) <= 100  # the k-NN and the linear top-1
    assert scope["backbone"].training is False
