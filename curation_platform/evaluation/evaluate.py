"""Evaluate a release: every arm and seed trained with open_clip_train and scored with clip_benchmark.

For each (arm, seed) of :func:`~curation_platform.evaluation.arms.training_sets` the training set is
exported as webdataset shards (:mod:`~curation_platform.evaluation.export`), a student is trained on it
at the scale's fixed compute (:mod:`~curation_platform.evaluation.student`) and evaluated on every
benchmark (:mod:`~curation_platform.evaluation.zeroshot`). A run is cached under
``<evaluations>/runs/<key>/`` by everything that determines it (scale, training set, seed, benchmark
files, the trainer's and evaluator's versions), so the same random baseline is trained once for every
release of that size, and an interrupted evaluation resumes. The record is then published
(:mod:`~curation_platform.evaluation.record`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from curation_platform import __version__, storage
from curation_platform.evaluation.arms import BASELINES, TrainingSet, pool_samples, training_sets
from curation_platform.evaluation.benchmark_sets import (
    CLASSIFICATION,
    DEMO_TASK_SETS,
    PROMPTED_DOMAIN_TASKS,
    RETRIEVAL,
    WDS_DIR,
    BenchmarkSet,
    build_demo_benchmarks,
    discover_benchmarks,
)
from curation_platform.evaluation.export import ExportedShards, export_samples
from curation_platform.evaluation.record import publish_record, summarise_runs
from curation_platform.evaluation.scales import EvalScale
from curation_platform.evaluation.student import train_student
from curation_platform.evaluation.zeroshot import evaluate_checkpoint, summarise
from curation_platform.layout import ProjectLayout
from curation_platform.precision import cpu_description
from curation_platform.releases.store import open_release, read_samples
from curation_platform.storage import S3Settings

MEAN_ACC1 = "zeroshot_mean_acc1"
RETRIEVAL_R5 = "retrieval_recall@5"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Evaluated:
    uri: str
    record: dict[str, Any]


def project_benchmarks(layout: ProjectLayout, benchmarks_uri: str | None = None) -> list[BenchmarkSet]:
    """The sets to evaluate on: every clip_benchmark wds set under ``benchmarks_uri`` (e.g. a local copy
    of the public ImageNet-1k and DataComp webdatasets), else the demo's eval split written as sets under
    ``<home>/evaluations/benchmarks``."""
    if benchmarks_uri:
        sets = discover_benchmarks(benchmarks_uri)
    elif Path(layout.demo_split("eval")).is_dir():
        out = Path(layout.evaluations) / "benchmarks"
        build_demo_benchmarks(Path(layout.demo), out)
        sets = discover_benchmarks(out / WDS_DIR)
    else:
        raise ValueError("no benchmarks: point --benchmarks at a folder of clip_benchmark webdatasets")
    if not sets:
        raise ValueError(f"no clip_benchmark webdatasets under {benchmarks_uri}")
    return sets


def headline_metrics(flat: dict[str, float], benchmarks: Sequence[BenchmarkSet],
                     prompted_sets: Sequence[str] = ()) -> dict[str, float]:
    """The metrics a leaderboard ranks by: mean zero-shot acc1 (of the demo's task sets when it has them,
    so the prompted-domain subset is not counted twice), mean image/text retrieval recall@5, and acc1 on
    each set measuring a weighting prompt's domain."""
    names = {benchmark.name for benchmark in benchmarks}
    classification = [b.name for b in benchmarks if b.task == CLASSIFICATION]
    task_sets = [name for name in classification if name in DEMO_TASK_SETS] or classification
    metrics: dict[str, float] = {}
    if task_sets:
        metrics[MEAN_ACC1] = sum(flat[f"{name}/acc1"] for name in task_sets) / len(task_sets)
    retrieval = [b.name for b in benchmarks if b.task == RETRIEVAL]
    if retrieval:
        values = [flat[f"{name}/{side}_retrieval_recall@5"] for name in retrieval for side in ("image", "text")]
        metrics[RETRIEVAL_R5] = sum(values) / len(values)
    for name in prompted_sets:
        if name in names:
            metrics[f"prompted/{name}/acc1"] = flat[f"{name}/acc1"]
    return metrics


AT_CHANCE_FACTOR = 1.5  # a metric every arm scores below this multiple of chance cannot rank the arms


def chance_levels(metrics: Sequence[str], benchmarks: Sequence[BenchmarkSet]) -> dict[str, float]:
    """What a student that learned nothing scores on each headline metric (1/classes; k/N for recall@k)."""
    by_name = {benchmark.name: benchmark for benchmark in benchmarks}
    classification = [b for b in benchmarks if b.task == CLASSIFICATION and b.classnames]
    task_sets = [b for b in classification if b.name in DEMO_TASK_SETS] or classification
    retrieval = [b for b in benchmarks if b.task == RETRIEVAL]
    levels: dict[str, float] = {}
    for metric in metrics:
        if metric == MEAN_ACC1 and task_sets:
            levels[metric] = sum(1 / len(b.classnames) for b in task_sets) / len(task_sets)
        elif metric == RETRIEVAL_R5 and retrieval:
            levels[metric] = sum(min(1.0, 5 / b.samples) for b in retrieval) / len(retrieval)
        elif metric.startswith("prompted/") and by_name.get(metric.split("/")[1], None) is not None:
            classes = by_name[metric.split("/")[1]].classnames
            if classes:
                levels[metric] = 1 / len(classes)
    return levels


def at_chance(summary: dict[str, Any], chance: dict[str, float]) -> list[str]:
    """Headline metrics on which every arm stays near chance: the scale is too small to measure them."""
    return [metric for metric, level in chance.items()
            if all(by_metric[metric]["mean"] <= AT_CHANCE_FACTOR * level for by_metric in summary["arms"].values())]


def benchmark_identity(benchmarks: Sequence[BenchmarkSet]) -> list[dict[str, Any]]:
    """Name, task, size and a fingerprint of each set's files (names, sizes and the sha256 of its small
    text files): a changed set never reuses a cached run."""
    identity = []
    for benchmark in benchmarks:
        digest = hashlib.sha256()
        for path in sorted(Path(benchmark.root).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(benchmark.root)}\0{path.stat().st_size}\0".encode())
                if path.suffix == ".txt":
                    digest.update(path.read_bytes())
        identity.append({"name": benchmark.name, "task": benchmark.task, "samples": benchmark.samples,
                         "fingerprint": digest.hexdigest()})
    return identity


def _run_key(scale: EvalScale, training: TrainingSet, benchmarks: list[dict[str, Any]]) -> str:
    determined_by = {"scale": scale.to_dict(), "set_sha256": training.set_sha256, "seed": training.seed,
                     "weighted": training.weighted, "benchmarks": benchmarks,
                     "open_clip": version("open_clip_torch"), "clip_benchmark": version("clip-benchmark"),
                     "torch": torch.__version__, "cpu": cpu_description()["cpu_capability"]}
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True).encode()).hexdigest()[:24]


def _one_run(training: TrainingSet, scale: EvalScale, benchmarks: Sequence[BenchmarkSet], identity: list[dict],
             prompted_sets: Sequence[str], pool_uri: str, validated_uri: str, cache_uri: str, work: Path,
             exports: dict[str, ExportedShards], device: str | None, s3: S3Settings | None) -> dict[str, Any]:
    """Train, evaluate and cache one (arm, seed); a cached run is read back instead."""
    key = _run_key(scale, training, identity)
    cached = storage.join(cache_uri, key, RUN_FILE)
    if storage.exists(cached, s3):  # headline metrics depend on the release's prompt: derive them anew
        run = json.loads(storage.read_bytes(cached, s3))
        return run | {"arm": training.arm, "metrics": headline_metrics(run["all_metrics"], benchmarks, prompted_sets)}
    if training.set_sha256 not in exports:  # the release arm's seeds share one export
        exports[training.set_sha256] = export_samples(
            training.samples, str(work / "sets" / training.set_sha256[:24]), pool_uri=pool_uri,
            validated_uri=validated_uri, provenance={"set_sha256": training.set_sha256})
    student = train_student(exports[training.set_sha256].brace_pattern, work / "runs" / key, scale, training.seed,
                            weighted=training.weighted, device=device)
    results = evaluate_checkpoint(scale.model, str(student.checkpoint), list(benchmarks), work / "results" / key,
                                  device=student.device)
    flat = summarise(results)
    run = {"arm": training.arm, "seed": training.seed, "size": training.size, "weighted": training.weighted,
           "set_sha256": training.set_sha256, "run_key": key, "compute": student.to_dict(),
           "metrics": headline_metrics(flat, benchmarks, prompted_sets), "all_metrics": flat, "results": results}
    storage.write_bytes_atomic(cached, json.dumps(run, sort_keys=True).encode(), s3)
    shutil.rmtree(work / "runs" / key, ignore_errors=True)  # checkpoints are scratch: the record keeps metrics
    return run


def evaluate_release(release_uri: str, evaluations_uri: str, scale: EvalScale, benchmarks: Sequence[BenchmarkSet], *,
                     seeds: Sequence[int] | None = None, baselines: Sequence[str] = BASELINES,
                     device: str | None = None, s3: S3Settings | None = None,
                     on_run: Callable[[dict[str, Any]], None] | None = None) -> Evaluated:
    """Train and evaluate every arm and seed of one release, then publish its record; ``on_run`` hears
    about each run as it finishes (progress)."""
    release = open_release(release_uri, s3)
    manifest = release.manifest
    sources = manifest["sources"]
    if not sources.get("pool_uri"):
        raise ValueError(f"release {release.release_id} records no pool_uri: it cannot be exported for training")
    seeds = list(range(scale.seeds)) if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("an evaluation needs at least one seed")
    weighted = manifest.get("weights") is not None
    samples = read_samples(release, s3)
    pool = pool_samples(sources["validated_uri"], [shard["shard"] for shard in manifest["input_shards"]], s3)
    sets = training_sets(samples, pool, seeds, weighted=weighted, baselines=tuple(baselines))
    prompts = [manifest["weights"]["prompt"]] if weighted else []
    prompted_sets = [name for prompt in prompts for name in PROMPTED_DOMAIN_TASKS.get(prompt, ())]
    identity = benchmark_identity(benchmarks)
    runs = []
    exports: dict[str, ExportedShards] = {}
    with tempfile.TemporaryDirectory(prefix="curation-evaluation-") as scratch:
        for training in sets:
            run = _one_run(training, scale, benchmarks, identity, prompted_sets, sources["pool_uri"],
                           sources["validated_uri"], storage.join(evaluations_uri, "runs"), Path(scratch), exports, device, s3)
            runs.append(run)
            if on_run:
                on_run(run)
    metrics = list(runs[0]["metrics"])
    results = {(run["arm"], run["seed"]): run.pop("results") for run in runs}
    compute = runs[0]["compute"]
    summary = summarise_runs(runs, metrics, list(baselines))
    chance = chance_levels(metrics, benchmarks)
    if {(run["compute"]["samples_seen"], run["compute"]["batch_size"]) for run in runs} != {
            (compute["samples_seen"], compute["batch_size"])}:
        raise RuntimeError("the arms did not see the same number of samples: not an equal-compute comparison")
    record = {
        "release_id": release.release_id, "release_uri": release.uri, "release_name": manifest["name"],
        "release_version": manifest["version"], "weighted": weighted, "prompts": prompts,
        "scale": scale.to_dict(), "seeds": seeds, "baselines": list(baselines), "benchmarks": identity,
        "headline_metrics": metrics, "compute": {"samples_seen": compute["samples_seen"], "steps": compute["steps"],
                                                 "batch_size": compute["batch_size"]},
        "runs": runs, "summary": summary, "chance": chance, "at_chance": at_chance(summary, chance),
        "machine": cpu_description() | {"device": compute["device"]}, "package_version": __version__,
        "trainer": f"open_clip_train {version('open_clip_torch')}",
        "evaluator": f"clip_benchmark {version('clip-benchmark')}",
    }
    uri = publish_record(record, results, evaluations_uri, s3)
    return Evaluated(uri, json.loads(storage.read_bytes(storage.join(uri, "record.json"), s3)))
