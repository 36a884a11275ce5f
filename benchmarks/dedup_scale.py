"""Near-duplicate search at scale: cost per row of SemDeDup and of the incremental vector-index path.

    python benchmarks/dedup_scale.py --rows 100000 400000 --dim 256 --out dedup_scale.json

Synthetic unit vectors (seeded Gaussian) with 1% planted near copies (the original plus noise of
cosine about 0.99). For each size, in this process:

* ``semdedup``: the whole-pool pass (spill, k-means on a 100k sample, chunked pairwise cosines per
  cluster) with about ``rows_per_cluster`` rows per cluster, as SemDeDup sizes its clusters;
* ``index_build``: LanceDB IVF_HNSW_SQ (cosine) over the table, then ``index_extend`` for one new
  10,000-row shard (``optimize_indices``: no retraining);
* ``shard_queries``: the per-shard step for that new shard (one query per row against the pool);
* recall of the planted copies for both paths.

Time per row is what the capacity model in ``infra/README.md`` extrapolates from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

SHARD_ROWS = 10_000
NOISE = 0.01


def _vectors(rows: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows and, per row, the index of the row it copies (-1 for an original)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, dim), dtype=np.float32)
    copies = rng.choice(rows, size=rows // 100, replace=False)
    sources = np.full(rows, -1)
    sources[copies] = rng.integers(0, rows, size=len(copies))
    sources[sources == np.arange(rows)] = -1
    planted = sources >= 0
    data[planted] = data[sources[planted]] + NOISE * rng.standard_normal((int(planted.sum()), dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data, sources


def _table(uids: list[str], shard: list[str], data: np.ndarray) -> pa.Table:
    dim = data.shape[1]
    return pa.table({"row_key": [f"t/{uid}" for uid in uids], "uid": uids, "teacher_id": ["t"] * len(uids),
                     "shard": shard,
                     "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(data.ravel()), dim)})


def measure(rows: int, dim: int, rows_per_cluster: int, eps: float) -> dict:
    import lancedb

    from curation_platform.dedup import semdedup
    from curation_platform.dedup.index import NearSearch, ensure_vector_index, near_matches

    data, sources = _vectors(rows + SHARD_ROWS, dim, seed=rows)
    uids = [f"{index:012d}" for index in range(len(data))]
    planted = {frozenset((uids[i], uids[s])) for i, s in enumerate(sources) if s >= 0}
    result: dict = {"rows": rows, "dim": dim, "eps": eps}

    clusters = max(1, rows // rows_per_cluster)
    started = time.perf_counter()
    groups = semdedup(((uids[i:i + 65536], data[i:i + 65536]) for i in range(0, rows, 65536)),
                      clusters=clusters, eps=eps)
    seconds = time.perf_counter() - started
    members = groups.group_by("group_id").agg("uid")["uid"].to_list()
    found = {frozenset((a, b)) for group in members for a in group for b in group if a < b}
    old_planted = {pair for pair in planted if all(int(uid) < rows for uid in pair)}
    result["semdedup"] = {"clusters": clusters, "seconds": round(seconds, 2),
                          "us_per_row": round(1e6 * seconds / rows, 2),
                          "planted_recall": len(found & old_planted) / max(1, len(old_planted))}

    with tempfile.TemporaryDirectory() as folder:
        database = lancedb.connect(folder)
        table = database.create_table("embeddings", _table(uids[:rows], ["old"] * rows, data[:rows]))
        search = NearSearch(eps=eps, min_index_rows=1)
        started = time.perf_counter()
        state = ensure_vector_index(folder, search)
        build = time.perf_counter() - started
        table.add(_table(uids[rows:], ["new"] * SHARD_ROWS, data[rows:]))
        started = time.perf_counter()
        extended = ensure_vector_index(folder, search)
        extend = time.perf_counter() - started
        started = time.perf_counter()
        matches = near_matches(folder, "t", "new", search)
        query = time.perf_counter() - started
        pairs = {frozenset(pair) for pair in matches.pairs.select("uid", "matches_uid").iter_rows()}
        new_planted = {pair for pair in planted if any(int(uid) >= rows for uid in pair)}
        result["index"] = {
            "partitions": state.partitions, "build_seconds": round(build, 2),
            "build_us_per_row": round(1e6 * build / rows, 2), "extend_action": extended.action,
            "extend_seconds_per_shard": round(extend, 2), "shard_query_seconds": round(query, 2),
            "query_us_per_row": round(1e6 * query / SHARD_ROWS, 2), "queries": matches.queries,
            "saturated": matches.saturated, "planted_recall": len(pairs & new_planted) / max(1, len(new_planted)),
        }
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows-per-cluster", type=int, default=10_000)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--out", default="dedup_scale.json")
    args = parser.parse_args()
    import torch

    report = {"machine": platform.processor() or platform.machine(), "date": dt.date.today().isoformat(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "results": []}
    for rows in args.rows:
        report["results"].append(measure(rows, args.dim, args.rows_per_cluster, args.eps))
        print(json.dumps(report["results"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
