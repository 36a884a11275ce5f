"""Whole per-shard scoring at the defaults: scores/s of ``score_rows`` (every SCORES.md column at once).

    python benchmarks/shard_scoring.py --rows 2000 --out shard_scoring.json     # ~1 min on 2 cores

The shard is random unit-norm float32 embeddings (seeded), scored against the defaults of
``ScoreParams``: a reference of N = 25,000 pairs, negCLIPLoss B = 32,768 and K = 10 (so each
sample's batch is itself plus the whole reference), a NormSim target of 10,000 images, two domain
prompts, a = 100, d = 512. One warm-up shard of 64 rows, then the timed shard
(``time.perf_counter``). ``neg_clip_loss_path`` says whether negCLIPLoss was fused with the
density-ratio pass (B - 1 >= N) or drawn K times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pyarrow as pa
import torch

from curation_platform.embedding.sinks import embedding_schema
from curation_platform.scoring.pipeline import EmbeddingSet, ScoreParams, ScoringContext, score_rows

A = 100.0


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    values = rng.standard_normal((rows, dim), dtype=np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def _shard(rng: np.random.Generator, rows: int, dim: int) -> pa.Table:
    image, text = _unit(rng, rows, dim), _unit(rng, rows, dim)
    uids = [f"{index:032x}" for index in range(rows)]
    schema = embedding_schema(dim)
    return pa.table({
        "row_key": [f"t/{uid}" for uid in uids], "uid": uids, "shard": ["00000"] * rows, "teacher_id": ["t"] * rows,
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()), dim),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), dim),
    }).select(schema.names).cast(schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = ScoreParams()
    reference = EmbeddingSet("ref", "t", [str(i) for i in range(params.reference_size)],
                             _unit(rng, params.reference_size, args.dim), _unit(rng, params.reference_size, args.dim))
    target = EmbeddingSet("target", "t", [str(i) for i in range(10_000)], _unit(rng, 10_000, args.dim))
    prompts = {name: _unit(rng, 1, args.dim)[0] for name in ("a photo of a dog", "a diagram")}
    context = ScoringContext("t", A, params, reference, target, prompts)
    score_rows(_shard(rng, 64, args.dim), context)
    shard = _shard(rng, args.rows, args.dim)
    started = time.perf_counter()
    scored = score_rows(shard, context)
    seconds = time.perf_counter() - started
    result = {
        "rows": args.rows, "dim": args.dim, "seconds": round(seconds, 2),
        "scores_per_second": round(args.rows / seconds, 1), "columns": scored.num_columns,
        "neg_clip_loss_path": "fused" if params.neg_clip_batch_size - 1 >= params.reference_size else "repeated",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.backends.cpu.get_cpu_capability()}",
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
