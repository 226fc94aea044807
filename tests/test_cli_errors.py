"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""
import subprocess
import sys

import pytest


def selfsup(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfsup", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def empty(p):
    p.mkdir()


def broken_only(p):
    p.mkdir()
    (p / "a.jpg").write_text("this is text")
    (p / "b.png").write_bytes(b"")


@pytest.mark.parametrize("args, make, expected", [
    (["train", "--data", "{path}"], None, "no such file or directory"),
    (["train", "--data", "{path}"], empty, "no image files found"),
    (["train", "--data", "{path}"], broken_only, "no usable image among 2 file(s)"),
    (["train", "optim.lrr=0.1"], None, "unknown config key 'optim.lrr'"),
    (["train", "optim.batch_size=many"], None, "bad value for 'optim.batch_size'"),
    (["train", "--config", "nope"], None, "config 'nope' not found"),
    (["train", "--method", "nope"], None, "bad value for 'method': 'nope' (expected one of: simclr,"),
    (["eval", "knn", "--checkpoint", "{path}"], None, "no such file or directory"),
    (["eval", "knn", "--checkpoint", "{path}"], broken_only, "a folder without backbone.safetensors or checkpoint-*.pt"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, make, expected):
    path = tmp_path / "data"
    if make:
        make(path)
    r = selfsup(*[a.replace("{path}", str(path)) for a in args], "--out" if args[0] == "train" else "--json",
                *([str(tmp_path / "run")] if args[0] == "train" else []), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("selfsup: error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint-*"))
