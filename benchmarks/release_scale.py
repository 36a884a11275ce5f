"""Pool-wide steps at scale: wall time and peak memory of releases and score statistics vs pool size.

    python benchmarks/release_scale.py --rows 250000 1000000 2000000 --out release_scale.json

Per-shard work is bounded by the shard; the pool-wide steps (a release's global top fractions,
the statistics' quantiles and KL deciles) read the whole pool's score rows and caption metadata.
This measures what that costs on one machine, so the capacity model can say where it stops
fitting. For each size a synthetic pool is written the way the pipeline writes it: 10,000-sample
shards of validated-sample parquet (``samples/``, ``reports/``) and one LanceDB ``scores`` table
with every score column (seeded normal scores, 3-15 word captions from a 5,000-word Zipf
vocabulary). Then, each in a fresh interpreter so that its peak memory is its own:

* ``release:<recipe>``: :func:`create_release` of a demo recipe (the passes of
  :mod:`curation_platform.releases.passes` on ``--workers`` processes: plan, per-shard candidates, cut-offs,
  per-shard selections; then samples.parquet, subset.npy, manifest, report with plots; no example
  images, as no tars exist), published locally;
* ``single:<recipe>``: the recipe on one whole-pool frame in one process (``run_selection``), the
  reference the release's ``subset.npy`` must equal byte for byte (``subset_sha256``);
* ``statistics``: what the ``score_statistics`` asset computes (summary, histograms,
  correlations, text- and image-side KL-decile n-gram coverage) via :func:`write_pool_analysis`,
  on a uniform uid sample of at most 2,000,000 rows as the asset does by default.

``peak_rss_mb`` is the coordinating process's ``ru_maxrss`` and ``worker_peak_rss_mb`` the largest of its
worker processes' (the per-shard passes); ``baseline_rss_mb`` is the RSS after imports, so
``(peak - baseline) / rows`` is the memory each pool row costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `python benchmarks/...`
from tests.helpers.recipes import NEGCLIP_NORMSIM  # the recipe the release tests run

SHARD_ROWS = 10_000
TEACHER_ID = "bench-teacher"
# demo recipes as published, except that the negCLIPLoss -> NormSim chain runs without the demo's
# decontaminate and dedup stages (a synthetic pool has no duplicate tables)
RECIPES = {
    "clip-score-top30": None,
    "negclip-normsim": NEGCLIP_NORMSIM,
}
STATISTICS_MAX_ROWS = 2_000_000  # ScoringResource.statistics_max_rows


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _captions(rng: np.random.Generator, rows: int) -> list[str]:
    vocabulary = np.array([f"w{index}" for index in range(5000)])
    probabilities = 1.0 / np.arange(1, 5001)
    probabilities /= probabilities.sum()
    lengths = rng.integers(3, 16, size=rows)
    words = vocabulary[rng.choice(5000, size=int(lengths.sum()), p=probabilities)]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(words[bounds[i]:bounds[i + 1]]) for i in range(rows)]


def build_pool(root: Path, rows: int, seed: int = 0) -> dict[str, str]:
    """Write validated samples and a scores table for ``rows`` samples; returns the locations."""
    from curation_platform import lance_tables
    from curation_platform.ingest import ACCEPTED_SCHEMA
    from curation_platform.scoring.pipeline import SCORE_COLUMNS, SCORES_TABLE, score_schema

    rng = np.random.default_rng(seed)
    validated, lance_uri = root / "validated", str(root / "lance")
    (validated / "samples").mkdir(parents=True)
    (validated / "reports").mkdir()
    schema = score_schema([])
    params = json.dumps({"reference_size": 25_000, "batch_size": 32_768, "batches": 10})

    def shard_batches():
        for start in range(0, rows, SHARD_ROWS):
            count = min(SHARD_ROWS, rows - start)
            shard = f"{start // SHARD_ROWS:06d}"
            raw = rng.bytes(16 * count)
            uids = [raw[i * 16:(i + 1) * 16].hex() for i in range(count)]
            captions = _captions(rng, count)
            width = rng.integers(200, 1024, size=count).astype(np.int32)
            height = rng.integers(200, 1024, size=count).astype(np.int32)
            samples = {
                "uid": uids, "key": [f"{shard}{i:04d}" for i in range(count)], "shard": [shard] * count,
                "shard_id": [f"{shard}-bench"] * count, "url": [None] * count, "caption": captions,
                "width": width, "height": height, "aspect_ratio": (np.maximum(width, height)
                                                                  / np.minimum(width, height)).astype(np.float32),
                "original_width": width, "original_height": height, "image_format": ["jpeg"] * count,
                "image_member": [f"{shard}{i:04d}.jpg" for i in range(count)],
                "image_offset": np.arange(count, dtype=np.int64) * 40_960, "image_bytes": np.full(count, 35_000),
                "image_sha256": ["0" * 64] * count, "exif_transposed": np.zeros(count, bool),
                "caption_chars": np.array([len(c) for c in captions], np.int32),
                "caption_words": np.array([c.count(" ") + 1 for c in captions], np.int32),
                "language": ["en"] * count, "language_score": np.ones(count, np.float32),
            }
            pq.write_table(pa.table(samples, schema=ACCEPTED_SCHEMA), validated / "samples" / f"{shard}.parquet")
            (validated / "reports" / f"{shard}.json").write_text(json.dumps(
                {"shard": shard, "checksum": shard, "total": count, "accepted": count, "by_reason": {}}))
            scores = {
                "row_key": [f"{TEACHER_ID}/{uid}" for uid in uids], "uid": uids, "shard": [shard] * count,
                "teacher_id": [TEACHER_ID] * count,
                **{name: rng.normal(size=count) for name in SCORE_COLUMNS},
                "score_version": ["bench"] * count, "reference_id": ["reference-bench"] * count,
                "target_id": ["target-bench"] * count, "score_params": [params] * count,
            }
            scores["kl_text"] = np.abs(scores["kl_text"]) * 2
            scores["kl_image"] = np.abs(scores["kl_image"]) * 2
            yield pa.record_batch(scores, schema=schema)

    database = lance_tables.connect(lance_uri)
    table = lance_tables.open_or_create(database, SCORES_TABLE, schema, ["row_key"])
    table.add(pa.RecordBatchReader.from_batches(schema, shard_batches()))
    return {"lance_uri": lance_uri, "validated_uri": str(validated)}


def _recipe(name: str):
    from curation_platform.releases import load_recipe, parse_recipe

    return parse_recipe(RECIPES[name]) if RECIPES.get(name) else load_recipe(
        Path(__file__).resolve().parents[1] / "curation_platform" / "releases" / "demo_recipes" / f"{name}.toml")


def run_task(task: str, pool: dict[str, str], out: Path, workers: int) -> dict:
    """One measured step (in this interpreter, its per-shard passes in ``workers`` processes)."""
    import polars as pl

    from curation_platform.analysis import write_pool_analysis
    from curation_platform.ingest import read_captions
    from curation_platform.releases import ReleaseOptions, ReleaseSources, create_release
    from curation_platform.releases.artefacts import npy_bytes, subset_array
    from curation_platform.releases.inputs import pool_frame, table_versions
    from curation_platform.scoring.pipeline import SCORE_COLUMNS, uid_sample_bound
    from curation_platform.scoring.run import count_scores, read_scores
    from curation_platform.selection import run_selection

    baseline = _rss_mb()
    start = time.perf_counter()
    kind, _, name = task.partition(":")
    sources = ReleaseSources(pool["lance_uri"], pool["validated_uri"], TEACHER_ID)
    if kind == "release":
        release = create_release(_recipe(name), sources, str(out / "releases"), ReleaseOptions(workers=workers))
        detail = {"selected": release.manifest["selected"], "pool_rows": release.manifest["pool_rows"],
                  "workers": workers, "subset_sha256": hashlib.sha256((Path(release.uri) / "subset.npy").read_bytes()).hexdigest()}
    elif kind == "single":  # the former path: the whole pool frame in one process
        recipe = _recipe(name)
        if recipe.max_size is not None or recipe.needs_duplicates():
            raise SystemExit(f"single:{name}: the reference path covers recipes without max_size and dedup")
        frame = pool_frame(sources, table_versions(sources), recipe.scores_used())
        uids = run_selection(frame, recipe.policies()).uids.to_pylist()
        del frame
        detail = {"selected": len(uids), "subset_sha256": hashlib.sha256(npy_bytes(subset_array(uids))).hexdigest()}
    else:
        uid_below = uid_sample_bound(count_scores(pool["lance_uri"], TEACHER_ID), STATISTICS_MAX_ROWS)
        scores = pl.from_arrow(read_scores(pool["lance_uri"], TEACHER_ID,
                                           columns=["uid", "shard", "reference_id", *SCORE_COLUMNS],
                                           uid_below=uid_below))
        captions = pl.from_arrow(read_captions(pool["validated_uri"], uid_below=uid_below))
        written = write_pool_analysis(scores, list(SCORE_COLUMNS), out / "analysis", captions)
        detail = {"files": len(written), "rows_analysed": scores.height}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"task": task, "seconds": round(seconds, 2), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1), **detail,
            **({"worker_peak_rss_mb": round(workers_peak, 1)} if kind == "release" else {})}


def _check_identical(results: list[dict]) -> None:
    """A release's subset.npy must equal the one-process selection's, byte for byte."""
    by_task = {result["task"]: result for result in results}
    for task, result in by_task.items():
        single = by_task.get(task.replace("release:", "single:", 1))
        if task.startswith("release:") and single is not None:
            result["identical_to_single"] = result["subset_sha256"] == single["subset_sha256"]
            if not result["identical_to_single"]:
                raise SystemExit(f"{task} at {result['rows']:,} rows differs from the one-process selection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000])
    tasks = [f"{kind}:{name}" for name in RECIPES for kind in ("release", "single")]
    parser.add_argument("--tasks", nargs="+", default=[*tasks, "statistics"])
    parser.add_argument("--workers", type=int, default=2, help="processes for a release's per-shard passes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--task", help=argparse.SUPPRESS)  # internal: run one task in this interpreter
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        print(json.dumps(run_task(args.task, json.loads(args.pool), Path(args.workdir), args.workers)))
        return

    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="release-scale-") as scratch:
            started = time.perf_counter()
            pool = build_pool(Path(scratch), rows)
            print(f"{rows:,} rows: pool written in {time.perf_counter() - started:.0f} s", flush=True)
            for task in args.tasks:
                workdir = Path(scratch) / task.replace(":", "-")
                completed = subprocess.run(
                    [sys.executable, __file__, "--task", task, "--pool", json.dumps(pool), "--workdir", str(workdir),
                     "--workers", str(args.workers)],
                    capture_output=True, text=True, check=True)
                result = {"rows": rows, **json.loads(completed.stdout.strip().splitlines()[-1])}
                result["bytes_per_row"] = round((result["peak_rss_mb"] - result["baseline_rss_mb"]) * 2**20 / rows)
                result["us_per_row"] = round(result["seconds"] * 1e6 / rows, 2)
                results.append(result)
                print(json.dumps(result), flush=True)
            _check_identical([result for result in results if result["rows"] == rows])
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "date": dt.date.today().isoformat(), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
