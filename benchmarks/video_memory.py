"""Peak memory of `selfsup eval video` on a DAVIS-sized folder, this tree beside an older revision.

Writes a synthetic DAVIS 2017 folder (480 x 854 JPEG frames with a moving disc, palette PNG masks, every frame
annotated, as DAVIS val is), then runs `selfsup eval video --random-init --no-cache` on it in a fresh process per
tree and reads that process's peak resident memory. `--size` keeps the ViT's share small on a CPU; the frames and
masks are held at their own 480 x 854 whatever the size, which is what the comparison is about. The old tree is
checked out with `git worktree` into a temporary folder.

    python benchmarks/video_memory.py --checkpoint RUN [--sequences 4] [--frames 30] [--size 240] [--rev d359b54]

Prints a table and writes benchmarks/results/video_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
H, W = 480, 854  # DAVIS 2017 480p


def write_davis(root: Path, sequences: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    palette = [c for k in range(256) for c in ((k * 37) % 256, (k * 91) % 256, (k * 151) % 256)]
    for s in range(sequences):
        name = f"seq{s:02d}"
        base = rng.uniform(0, 255, (6, 11, 3)).astype(np.uint8)
        backdrop = np.asarray(Image.fromarray(base).resize((W, H), Image.BICUBIC))
        for t in range(frames):
            cx, cy = 200 + 8 * t + 20 * s, 240 + 60 * np.sin(t / 5)
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 90**2
            frame = backdrop.copy()
            frame[disc] = (220, 60, 40)
            for kind, array, ext in (("JPEGImages", frame, "jpg"), ("Annotations", disc.astype(np.uint8), "png")):
                path = root / kind / "480p" / name / f"{t:05d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                im = Image.fromarray(array, mode="P" if ext == "png" else "RGB")
                if ext == "png":
                    im.putpalette(palette)
                im.save(path)


def peak_mib(src: Path, checkpoint: str, data: Path, size: int) -> tuple[float, float]:
    """(peak RSS in MiB, J&F) of one `selfsup eval video` in a fresh interpreter importing selfsup from `src`."""
    code = ("import resource, sys; from selfsup.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    args = ["eval", "video", "--checkpoint", checkpoint, "--data", str(data), "--size", str(size), "--random-init",
            "--no-cache", "--json"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    peak = next(int(x.split()[1]) for x in lines if x.startswith("PEAK"))
    result = json.loads(next(x for x in reversed(lines) if x.startswith("{")))
    return peak / 1024, result["jf"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run folder with a ViT (its random init is used)")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--rev", default="d359b54", help="the older revision to compare with")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, old = Path(tmp) / "davis", Path(tmp) / "old"
        write_davis(data, a.sequences, a.frames)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), a.rev], check=True,
                       capture_output=True)
        try:
            for label, src in ((a.rev, old / "src"), ("this tree", ROOT / "src")):
                start = time.monotonic()
                mib, jf = peak_mib(src, a.checkpoint, data, a.size)
                seconds = time.monotonic() - start
                rows.append({"tree": label, "peak_rss_mib": round(mib), "jf": round(jf, 2), "seconds": round(seconds)})
                print(f"{label:>10}: peak RSS {mib:7,.0f} MiB   J&F {jf:.2f}   {seconds:.0f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
            shutil.rmtree(old, ignore_errors=True)
    frames = a.sequences * a.frames
    RESULTS.mkdir(exist_ok=True)
    out = {"sequences": a.sequences, "frames": frames, "frame_size": [H, W], "size": a.size,
           "checkpoint": a.checkpoint, "rows": rows}
    (RESULTS / "video_memory.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'video_memory.json'} ({frames} frames of {W} x {H})")


if __name__ == "__main__":
    main()
