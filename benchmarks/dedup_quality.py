"""Duplicate detection on a demo home, against its ground truth: exact, near (SemDeDup and the vector
index) at several eps, the index's recall against exact search, and decontamination.

    python benchmarks/dedup_quality.py --home curation_home --eps 0.02 0.05 0.1 --out dedup_quality.json

Run it after ``curation-platform demo`` (it reads the home's LanceDB embeddings, validated samples and
``demo/ground_truth.parquet``, and writes nothing into the home: the index is built on a copy).

* Truth pairs: two samples of one ``duplicate_group`` (a clean original and its exact or near copies).
  Precision is the share of predicted pairs that are truth pairs; recall the share of truth pairs
  (both samples accepted, so embedded) predicted; groups are connected components, so every pair
  inside a predicted group counts.
* ``index_recall``: the share of the exhaustive search's near pairs (cosine >= 1 - eps over every
  pair of the pool) that the vector-index queries find.
* Decontamination: precision and recall of the flagged samples against the ``eval_copy`` labels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from curation_platform import lance_tables
from curation_platform.dedup import ExactDuplicateIndex, read_image_embeddings, semdedup
from curation_platform.dedup.contamination import EvaluationSet, copies_in_shard, embed_evaluation_set
from curation_platform.dedup.index import NearSearch, ensure_vector_index, near_matches
from curation_platform.dedup.tables import connected_components
from curation_platform.embedding.engine import EmbedConfig
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE
from curation_platform.layout import ProjectLayout
from curation_platform.teachers import TeacherSpec, load_teacher


def _pairs(groups: pl.DataFrame, column: str = "group_id") -> set[frozenset[str]]:
    pairs: set[frozenset[str]] = set()
    for members in groups.group_by(column).agg("uid")["uid"].to_list():
        pairs.update(frozenset(pair) for pair in itertools.combinations(sorted(members), 2))
    return pairs


def _score(predicted: set[frozenset[str]], truth: set[frozenset[str]],
           attributes: dict[str, str] | None = None) -> dict[str, float | int]:
    """Precision and recall; with ``attributes``, also the share of the false pairs whose two images
    render the same attribute set (semantic duplicates the demo does not label)."""
    hits = len(predicted & truth)
    scored = {"predicted_pairs": len(predicted), "truth_pairs": len(truth), "true_pairs": hits,
              "precision": hits / len(predicted) if predicted else float("nan"),
              "recall": hits / len(truth) if truth else float("nan")}
    if attributes is not None:
        false = [tuple(pair) for pair in predicted - truth]
        same = sum(attributes.get(a) is not None and attributes.get(a) == attributes.get(b) for a, b in false)
        scored["false_pairs_same_attributes"] = same / len(false) if false else float("nan")
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default="curation_home")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--out", default="dedup_quality.json")
    args = parser.parse_args()
    layout = ProjectLayout.resolve(args.home)
    teacher = load_teacher(TeacherSpec(checkpoint=layout.teacher))
    truth = pl.read_parquet(layout.demo_ground_truth).filter(pl.col("split") == "pool")
    samples = pl.read_parquet(Path(layout.validated) / "samples", columns=["uid", "shard", "image_sha256", "caption"])
    accepted = set(samples["uid"])
    grouped = truth.filter(pl.col("duplicate_group").is_not_null(), pl.col("uid").is_in(list(accepted)))
    truth_pairs = _pairs(grouped, "duplicate_group")
    attributes = dict(truth.select("uid", "attributes").iter_rows())
    exact_truth = _pairs(grouped.filter(pl.col("corruption").is_in(["clean", "exact_duplicate"])), "duplicate_group")
    result: dict = {"machine": platform.processor() or platform.machine(), "date": dt.date.today().isoformat(),
                    "teacher_id": teacher.teacher_id, "embed_dim": teacher.embed_dim, "pool_accepted": len(accepted),
                    "truth_pairs": len(truth_pairs), "exact_truth_pairs": len(exact_truth)}

    with tempfile.TemporaryDirectory() as scratch:
        exact = ExactDuplicateIndex(str(Path(scratch) / "exact"))
        for shard, rows in samples.partition_by("shard", as_dict=True).items():
            exact.add_shard(shard[0], rows)
        image_pairs = _pairs(exact.groups("image"))
        result["exact_image"] = _score(image_pairs, exact_truth)
        result["exact_caption"] = _score(_pairs(exact.groups("caption")), truth_pairs)

        embedded = list(read_image_embeddings(layout.lancedb, teacher.teacher_id))
        lance = str(Path(scratch) / "lance")
        shutil.copytree(Path(layout.lancedb) / f"{EMBEDDINGS_TABLE}.lance", Path(lance) / f"{EMBEDDINGS_TABLE}.lance")
        shards = sorted(samples["shard"].unique().to_list())
        started = time.perf_counter()
        state = ensure_vector_index(lance, NearSearch(min_index_rows=256, rows_per_partition=512))
        result["index"] = {"action": state.action, "indexed_rows": state.indexed_rows, "partitions": state.partitions,
                           "build_seconds": round(time.perf_counter() - started, 3)}
        evaluation = embed_evaluation_set(teacher, EvaluationSet("demo-eval", layout.demo_split("eval")),
                                          EmbedConfig(device="cpu", workers=0))
        planted = set(truth.filter(pl.col("corruption") == "eval_copy", pl.col("uid").is_in(list(accepted)))["uid"])
        result["near"], result["decontamination"] = {}, {}
        for eps in args.eps:
            started = time.perf_counter()
            exhaustive = _pairs(semdedup(iter(embedded), clusters=1, eps=eps))
            semdedup_seconds = time.perf_counter() - started
            clustered = _pairs(semdedup(iter(embedded), clusters=args.clusters, eps=eps))
            search = NearSearch(eps=eps, min_index_rows=256, rows_per_partition=512)
            started = time.perf_counter()
            found = [near_matches(lance, teacher.teacher_id, shard, search) for shard in shards]
            query_seconds = time.perf_counter() - started
            edges = pl.concat([item.pairs for item in found])
            indexed = {frozenset(pair) for pair in edges.select("uid", "matches_uid").iter_rows()}
            every_edge = _edges(embedded, eps)
            index_components = _pairs(connected_components(edges)) if edges.height else set()
            result["near"][str(eps)] = {
                "exhaustive": _score(exhaustive, truth_pairs, attributes),
                f"semdedup_{args.clusters}_clusters": _score(clustered, truth_pairs),
                "index": _score(index_components, truth_pairs),
                "index_recall_of_exhaustive_edges": len(indexed & every_edge) / max(1, len(every_edge)),
                "index_groups_equal_exhaustive": index_components == exhaustive,
                "index_queries": sum(item.queries for item in found), "saturated": sum(item.saturated for item in found),
                "exhaustive_seconds": round(semdedup_seconds, 3), "index_query_seconds": round(query_seconds, 3),
            }
            flagged = set()
            for uids, rows in embedded:
                flagged |= set(copies_in_shard(uids, rows, [evaluation], eps)["uid"])
            hits = len(flagged & planted)
            result["decontamination"][str(eps)] = {
                "planted": len(planted), "flagged": len(flagged), "true": hits,
                "precision": hits / len(flagged) if flagged else float("nan"),
                "recall": hits / len(planted) if planted else float("nan")}
        index = lance_tables.connect(lance).open_table(EMBEDDINGS_TABLE).list_indices()
        result["index"]["type"] = index[0].index_type if index else None
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _edges(embedded: list, eps: float) -> set[frozenset[str]]:
    uids = [uid for batch, _ in embedded for uid in batch]
    rows = np.concatenate([rows for _, rows in embedded]).astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    cosines = rows @ rows.T
    left, right = np.nonzero(np.triu(cosines >= 1 - eps - 1e-6, k=1))
    return {frozenset((uids[a], uids[b])) for a, b in zip(left.tolist(), right.tolist())}


if __name__ == "__main__":
    main()
