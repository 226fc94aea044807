"""`selfsup report`: one self-contained HTML page for a run (figures embedded; the PNGs also lie beside it)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..bench import run_summary, run_table
from ..core.io import read_metrics
from .plots import PANELS, curve


def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else esc(v)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(png: Path, caption: str, half: bool = False) -> str:
    """A PNG embedded in the page; `half` puts two side by side (trained beside random init)."""
    data = base64.b64encode(png.read_bytes()).decode()
    return (f'<figure{" class=half" if half else ""}><img src="data:image/png;base64,{data}" alt="{esc(png.name)}">'
            f"<figcaption>{esc(caption)} ({esc(png.name)})</figcaption></figure>")


def metrics(run: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl: losses, k-NN during training, warnings of the trainer."""
    return read_metrics(run / "metrics.jsonl")


def curves(rows: list[dict], folder: Path) -> list[tuple[Path, str]]:
    """The training curves as PNGs in `folder`: (path, title) of each one the run logged. Each panel takes
    the rows holding its keys (a k-NN or warning row has no loss)."""
    out = []
    for title, keys in PANELS:
        path = folder / f"curve-{keys[0]}.png"
        if curve(rows, title, keys, path):
            out.append((path, title))
    return out


def final_table(run: Path) -> str:
    """The k-NN table `selfsup train` wrote (results.json), then every `selfsup eval` result in eval/."""
    parts = []
    results = run / "results.json"
    saved = json.loads(results.read_text()) if results.exists() else {}
    knn, attention = saved.get("knn"), saved.get("attention_masks")
    if knn:
        names = {"trained": "trained backbone", "random_init": "same architecture, random init",
                 "raw_pixels": "raw pixels"}
        parts.append("<h3>k-NN at the end of training</h3>" + table(
            ["features", "top-1 %", "top-5 %"], [[names.get(k, k), v["top1"], v["top5"]] for k, v in knn.items()]))
    if attention:
        names = {"trained": "trained backbone", "random_init": "same architecture, random init"}
        parts.append("<h3>[CLS] attention masks against the objects of the test scenes (Jaccard, DINO Fig. 4)</h3>"
                     + table(["backbone", "best head %", "mean over heads %", "attention on the objects %"],
                             [[names[k], v["jaccard_best"], v["jaccard_mean"], v.get("object_mass", "")]
                              for k, v in attention.items()])
                     + "<p class=note>Attention on the objects: the largest share of one head's attention that falls "
                     "on object pixels; attention blind to the objects puts their share of the area there "
                     f"({next(iter(attention.values())).get('object_area', 0):.1f} %).</p>")
    rows, probes = [], []
    for f in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        r = json.loads(f.read_text())
        backbone = "random init" if r.get("random_init") else "trained"
        rows.append([r.get("protocol"), r.get("data"), backbone, r.get("features") or "", headline(r)])
        if r.get("protocol") == "linear":
            probes.append(f"<h3>Linear probe on <code>{esc(r.get('data'))}</code>, {backbone} backbone</h3>"
                          + linear_table(r))
    if rows:
        parts.append("<h3>Evaluations (selfsup eval)</h3>" + table(
            ["protocol", "data", "backbone", "features", "result"], rows))
    parts += probes
    return "".join(parts) or "<p>No evaluation yet: run <code>selfsup eval knn --checkpoint RUN</code>.</p>"


def linear_table(r: dict) -> str:
    """One `selfsup eval linear` result: each feature kind at its best lr, the one chosen on val marked."""
    rows = [[f"{kind}{' (chosen on val)' if kind == r['best'] else ''}", f"{k['lr']:g}", k["val_top1"], k["top1"],
             k["top5"]] for kind, k in r["kinds"].items()]
    return table(["features", "lr", "val top-1 %", "test top-1 %", "test top-5 %"], rows)


def warnings_box(rows: list[dict]) -> str:
    """The trainer's warnings in metrics.jsonl (collapse, ...) in a highlighted box; empty without any."""
    warned = [r for r in rows if "warning" in r]
    if not warned:
        return ""
    items = "".join(f"<li><b>step {esc(r.get('step', '?'))}</b>, {esc(r['warning'])}: "
                    f"{esc(r.get('message', r.get('monitor', '')))}</li>" for r in warned)
    return (f"<div class=warn><b>{len(warned)} training warning{'s' if len(warned) > 1 else ''}</b> "
            f"(metrics.jsonl)<ul>{items}</ul></div>")


def bench_section(run: Path) -> str:
    """`selfsup bench --checkpoint RUN`'s timing (bench.json): FlashAttention on vs off, training and inference."""
    path = run / "bench.json"
    if not path.exists():
        return "<p>Not timed yet: run <code>selfsup bench --checkpoint RUN</code>.</p>"
    try:
        result = json.loads(path.read_text())
        header, rows = run_table(result)
        summary = run_summary(result)
    except (ValueError, KeyError, TypeError) as e:
        return (f"<p>{esc(path)}: unreadable ({esc(type(e).__name__)}); run <code>selfsup bench --checkpoint "
                "RUN</code> again.</p>")
    return table(header, rows) + (
        f"<p class=note>{esc(summary)}. Images/s counts source images: a training step crops each into its global "
        "and local views; peak memory is CUDA's max allocated, or on the CPU the process's peak RSS.</p>")


def headline(r: dict) -> str:
    """The figures of one evaluation result on one line."""
    p = r.get("protocol")
    if p == "knn":
        return "; ".join(f"k={k}: top-1 {v['top1']:.2f} %" for k, v in r["k"].items())
    if p == "linear":
        return f"top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} % ({r['best']}, lr {r['kinds'][r['best']]['lr']:g})"
    if p == "lowshot":
        return "; ".join(f"{k}: {v['mean']:.2f} +/- {v['std']:.2f} %" for k, v in r["fractions"].items()) + (
            f" (lambda {r['lambd']:g})" if "lambd" in r else "")
    if p in DENSE:
        return DENSE[p](r)
    keys = [k for k in ("acc", "nmi", "ari", "fmi", "map", "recall@1", "recall@5") if k in r]
    return ", ".join(f"{k.upper()} {r[k]:.2f} %" for k in keys)


DENSE = {  # the dense protocols' headlines (`selfsup eval attention-masks|segment|depth|video|copydetect`)
    "attention-masks": lambda r: f"Jaccard best head {r['jaccard_best']:.2f} %, mean over heads {r['jaccard_mean']:.2f} %",
    "segment": lambda r: f"mIoU {r['miou']:.2f} % (last {r['layers']} block(s) + [CLS])",
    "depth": lambda r: f"RMSE {r['rmse']:.3f} m (constant guess {r['mean_baseline']:.3f} m)",
    "video": lambda r: f"J&F {r['jf']:.2f} % (J {r['j']:.2f}, F {r['f']:.2f})",
    "copydetect": lambda r: f"mAP {r['map']:.2f} %, recall@1 {r['recall1']:.2f} %",
}
HEADLINE = {"attention-masks": "jaccard_best", "segment": "miou", "depth": "rmse", "video": "jf", "copydetect": "map"}


def dense_section(run: Path) -> str:
    """The dense protocols side by side, trained against random init, and their pictures (trained backbone)."""
    found: dict[tuple[str, str], dict] = {}
    for f in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        r = json.loads(f.read_text())
        if r.get("protocol") in DENSE:
            found.setdefault((r["protocol"], r.get("data")), {})["random" if r.get("random_init") else "trained"] = r
    if not found:
        return ("<p>Not measured yet: <code>selfsup eval attention-masks|segment|depth|video|copydetect --checkpoint "
                "RUN</code> (each with and without <code>--random-init</code>).</p>")
    rows, pictures = [], []
    for (protocol, data), by in found.items():
        key = HEADLINE[protocol]
        cells = [by[b][key] if b in by else "" for b in ("trained", "random")]
        rows.append([protocol, data, key, *cells])
        if "png" in by.get("trained", {}) and Path(by["trained"]["png"]).exists():
            pictures.append(figure(Path(by["trained"]["png"]), f"{protocol} on {data}, trained backbone"))
    lower = "<p class=note>Higher is better, except RMSE (metres).</p>"
    return table(["protocol", "data", "figure", "trained", "random init"], rows) + lower + "".join(pictures)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}figure.half{width:48%}figcaption{font-size:.8em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
.warn{background:#fff4e5;border:1px solid #f0a040;border-left:6px solid #e07000;padding:.6em 1em;margin:1em 0}
.warn ul{margin:.4em 0 0;padding-left:1.2em}.note{font-size:.85em;color:#555}"""


def page(title: str, summary: str, sections: list[tuple[str, str]], notice: str = "") -> str:
    """The whole page; `notice` (warnings) stands out under the summary, above every section."""
    body = "".join(f"<h2>{esc(h)}</h2>{content}" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{esc(title)}</h1><p>{summary}</p>{notice}{body}</body></html>")
