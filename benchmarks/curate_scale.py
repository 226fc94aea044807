"""How long curation takes on a pool of 200,000 embeddings of dimension 384 (issue 15: at most 10 minutes on
2 cores): de-duplication (all pairs above the threshold, connected components), protection against 2,000
evaluation images, retrieval of the 4 nearest pool images of 1,000 curated ones, cluster retrieval with 1,000
clusters, and a 2-level hierarchical k-means (2,000 and 200 clusters, 10 resampling steps) with balanced
sampling of 50,000. The embeddings are synthetic: 2,000 Gaussian clusters on the sphere with 5,000 injected
near-duplicates, so the duplicate count is known.

    python benchmarks/curate_scale.py [--n 200000] [--dim 384] [--faiss | --torch]

Writes benchmarks/results/curate_scale_<backend>.json; prints each step's seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from selfsup import curate

RESULTS = Path(__file__).parent / "results"


def synthetic_pool(n: int, dim: int, n_dup: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(embeddings [n, dim], the indices of the injected duplicates' originals [n_dup]); the last n_dup rows are
    the duplicates."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(2000, dim, generator=g), dim=1)
    base = n - n_dup
    x = centres[torch.randint(0, 2000, (base,), generator=g)] + 0.08 * torch.randn(base, dim, generator=g)
    originals = torch.randperm(base, generator=g)[:n_dup]
    dups = x[originals] + 0.01 * torch.randn(n_dup, dim, generator=g)
    return torch.nn.functional.normalize(torch.cat([x, dups]), dim=1), originals.numpy()


def timed(name: str, times: dict, fn):
    t = time.perf_counter()
    out = fn()
    times[name] = round(time.perf_counter() - t, 1)
    print(f"  {name:<34} {times[name]:7.1f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=384)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--faiss", action="store_true", help="require faiss (error without it)")
    which.add_argument("--torch", action="store_true", help="the plain torch path even with faiss installed")
    args = p.parse_args()
    use_faiss = True if args.faiss else (False if args.torch else None)
    backend = "faiss" if (use_faiss or (use_faiss is None and curate.have_faiss())) else "torch"
    if args.faiss and not curate.have_faiss():
        raise SystemExit("--faiss: faiss is not installed (pip install faiss-cpu)")
    n_dup = args.n // 40
    x, originals = synthetic_pool(args.n, args.dim, n_dup)
    g = torch.Generator().manual_seed(1)
    protected = x[torch.randint(0, args.n - n_dup, (2000,), generator=g)]
    curated = x[torch.randint(0, args.n - n_dup, (1000,), generator=g)]
    print(f"{args.n:,} x {args.dim} embeddings, {backend}, {torch.get_num_threads()} threads", flush=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    groups = timed("dedup (pairs >= 0.95, components)", times, lambda: curate.duplicate_groups(x, 0.95))
    found = int(np.sum(groups[args.n - n_dup:] == groups[originals]))
    timed("protect (2,000 evaluation images)", times, lambda: curate.protect(x, protected, 0.95, use_faiss))
    timed("retrieve per query (1,000 x k=4)", times, lambda: curate.retrieve_per_query(curated, x, 4, use_faiss))
    timed("retrieve clusters (1,000 clusters)", times,
          lambda: curate.retrieve_clusters(curated, x, 1000, use_faiss=use_faiss))
    h = timed("hierarchical k-means 2,000 / 200", times,
              lambda: curate.hierarchical_kmeans(x, [2000, 200], use_faiss=use_faiss))
    timed("balanced sample of 50,000", times, lambda: curate.balanced_sample(h.labels, 50_000))
    total = round(time.perf_counter() - start, 1)
    print(f"  {'total':<34} {total:7.1f} s  ({found:,} of {n_dup:,} injected duplicates grouped with their original)")
    RESULTS.mkdir(exist_ok=True)
    out = {"n": args.n, "dim": args.dim, "backend": backend, "threads": torch.get_num_threads(),
           "cpus": len(os.sched_getaffinity(0)), "seconds": times, "total_s": total,
           "duplicates_found": found, "duplicates": n_dup}
    (RESULTS / f"curate_scale_{backend}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
