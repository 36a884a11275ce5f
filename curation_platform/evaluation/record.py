"""Evaluation records and the leaderboard.

An evaluation never touches the immutable release folder. It publishes its own versioned,
checksummed record under ``<evaluations>/<release_id>/<version>/``::

    record.json          release id and URI, scale, seeds, benchmarks, every run's compute and metrics,
                         per-arm mean and sd, and the comparison with each baseline
    runs.parquet         one row per (arm, seed, metric): the table behind the leaderboard
    results/<arm>/seed<k>/<set>.json   clip_benchmark's own JSON for every run and set
    figures/metrics.png  headline metrics per arm, mean with sd bars
    report.md            the same, readable
    SHA256SUMS           written last; ``verify_evaluation`` checks it

The leaderboard (``leaderboard.parquet`` / ``.md`` / ``.png`` under ``<evaluations>``) ranks the latest
record of every evaluated release next to its baselines.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from curation_platform import storage
from curation_platform.analysis import panel_grid
from curation_platform.evaluation.arms import ARMS
from curation_platform.releases.artefacts import (
    CHECKSUMS,
    FolderCheck,
    check_checksums,
    next_version,
    publish_folder,
    versions_of,
    write_checksums,
)
from curation_platform.storage import S3Settings

RECORD = "record.json"
RUNS = "runs.parquet"
LEADERBOARD = "leaderboard"
NOISE_Z = 2.0  # a difference within NOISE_Z standard errors of the difference is "within seed noise"


@dataclass(frozen=True)
class ArmSummary:
    mean: float
    sd: float
    n: int


def summarise_arm(values: list[float]) -> ArmSummary:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else 0.0
    return ArmSummary(mean, sd, n)


def compare(release: ArmSummary, baseline: ArmSummary) -> dict[str, Any]:
    """Difference of means with its standard error (Welch); "within seed noise" below ``NOISE_Z`` of them."""
    difference = release.mean - baseline.mean
    standard_error = math.sqrt(release.sd ** 2 / release.n + baseline.sd ** 2 / baseline.n)
    if release.n < 2 or baseline.n < 2:
        verdict = "one seed: noise unknown"
    elif abs(difference) <= NOISE_Z * standard_error:
        verdict = "within seed noise"
    else:
        verdict = "better" if difference > 0 else "worse"
    return {"difference": difference, "standard_error": standard_error, "verdict": verdict}


def summarise_runs(runs: list[dict[str, Any]], metrics: list[str], baselines: list[str]) -> dict[str, Any]:
    """Per arm and metric mean / sd / n, and every baseline compared with the release."""
    arms = sorted({run["arm"] for run in runs}, key=ARMS.index)
    summary = {arm: {metric: summarise_arm([run["metrics"][metric] for run in runs if run["arm"] == arm])
                     for metric in metrics} for arm in arms}
    comparisons = {baseline: {metric: compare(summary["release"][metric], summary[baseline][metric])
                              for metric in metrics} for baseline in baselines if baseline in summary}
    return {"arms": {arm: {metric: vars(value) for metric, value in by_metric.items()}
                     for arm, by_metric in summary.items()},
            "comparisons": comparisons}


def publish_record(record: dict[str, Any], results: dict[tuple[str, int], dict[str, dict]], evaluations_uri: str,
                   s3: S3Settings | None = None) -> str:
    """Stage and publish one record (see the module docstring); returns its URI."""
    release_id = record["release_id"]
    version = next_version(evaluations_uri, release_id, s3)
    record = {**record, "version": version, "evaluation_id": f"{release_id}@{version}"}
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch)
        (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        for (arm, seed), by_set in sorted(results.items()):
            folder = staging / "results" / arm / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            for name, result in sorted(by_set.items()):
                (folder / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        runs_frame(record).write_parquet(staging / RUNS)
        (staging / "figures").mkdir()
        plot_arms(record, staging / "figures" / "metrics.png")
        (staging / "report.md").write_text(report_markdown(record))
        write_checksums(staging)
        return publish_folder(staging, evaluations_uri, release_id, version, s3)


def runs_frame(record: dict[str, Any]) -> pl.DataFrame:
    rows = [{"evaluation_id": record["evaluation_id"], "release_id": record["release_id"], "scale": record["scale"]["name"],
             "arm": run["arm"], "seed": run["seed"], "size": run["size"], "weighted": run["weighted"],
             "samples_seen": run["compute"]["samples_seen"], "metric": metric, "value": float(value)}
            for run in record["runs"] for metric, value in sorted(run["metrics"].items())]
    return pl.DataFrame(rows, schema={"evaluation_id": pl.String, "release_id": pl.String, "scale": pl.String,
                                      "arm": pl.String, "seed": pl.Int64, "size": pl.Int64, "weighted": pl.Boolean,
                                      "samples_seen": pl.Int64, "metric": pl.String, "value": pl.Float64})


def plot_arms(record: dict[str, Any], out: Path) -> Path:
    """Headline metrics per arm: bars at the mean over seeds, sd as error bars."""
    metrics = record["headline_metrics"]
    figure, axes = panel_grid(len(metrics), columns=len(metrics), size=(4.0, 3.0))
    arms = list(record["summary"]["arms"])
    for axis, metric in zip(axes, metrics, strict=False):
        values = [record["summary"]["arms"][arm][metric] for arm in arms]
        axis.bar(arms, [value["mean"] for value in values], yerr=[value["sd"] for value in values], capsize=4,
                 color=["#4c72b0", "#aaaaaa", "#777777"][: len(arms)])
        axis.set_title(metric, fontsize=9)
        axis.set_ylim(bottom=0)
    figure.suptitle(f"{record['release_id']} ({record['scale']['name']} scale, {len(record['seeds'])} seeds)",
                    fontsize=10)
    figure.savefig(out, dpi=110)
    return out


def _cell(summary: dict[str, float]) -> str:
    return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


def report_markdown(record: dict[str, Any]) -> str:
    metrics = record["headline_metrics"]
    compute = record["compute"]
    lines = [f"# Evaluation of {record['release_id']}", "",
             (f"Scale `{record['scale']['name']}`: {record['scale']['model']}, {compute['samples_seen']:,} samples seen "
             f"({compute['steps']} steps of {compute['batch_size']}) per run, seeds {record['seeds']}; "
             f"benchmarks: {', '.join(benchmark['name'] for benchmark in record['benchmarks'])}."), "",
             "| arm | size | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for arm, by_metric in record["summary"]["arms"].items():
        size = next(run["size"] for run in record["runs"] if run["arm"] == arm)
        lines.append(f"| {arm} | {size:,} | " + " | ".join(_cell(by_metric[metric]) for metric in metrics) + " |")
    lines += ["", "| release vs | metric | difference | standard error | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for baseline, by_metric in record["summary"]["comparisons"].items():
        for metric, comparison in by_metric.items():
            lines.append(f"| {baseline} | {metric} | {comparison['difference']:+.3f} | "
                         f"{comparison['standard_error']:.3f} | {comparison['verdict']} |")
    for metric in record["at_chance"]:
        lines.insert(3, f"**At chance:** every arm scores {metric} near chance "
                        f"({record['chance'][metric]:.3f}); this scale cannot rank the arms on it.\n")
    lines += ["", "![metrics](figures/metrics.png)", ""]
    return "\n".join(lines)


# -- reading, verifying, ranking ------------------------------------------------------------------

def open_record(record_uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    if not storage.exists(storage.join(record_uri, CHECKSUMS), s3):
        raise FileNotFoundError(f"{record_uri} is not a published evaluation record (no {CHECKSUMS})")
    return json.loads(storage.read_bytes(storage.join(record_uri, RECORD), s3))


def verify_evaluation(record_uri: str, s3: S3Settings | None = None) -> tuple[str, FolderCheck]:
    """The release id the record names, and its files against SHA256SUMS."""
    return open_record(record_uri, s3)["release_id"], check_checksums(record_uri, s3)


def latest_records(evaluations_uri: str, s3: S3Settings | None = None) -> list[str]:
    """The URI of the newest record of every evaluated release."""
    uris = []
    for release_id in sorted(storage.list_dirs(evaluations_uri, s3)):
        versions = versions_of(evaluations_uri, release_id, s3)
        if versions:
            uris.append(storage.join(evaluations_uri, release_id, str(versions[-1])))
    return uris


def leaderboard(evaluations_uri: str, s3: S3Settings | None = None) -> pl.DataFrame:
    """One row per (release, arm) of the latest records: every headline metric's mean and sd, ranked by the
    release arm's first headline metric (baselines sit next to the release they were drawn for)."""
    rows = []
    for uri in latest_records(evaluations_uri, s3):
        record = open_record(uri, s3)
        for arm, by_metric in record["summary"]["arms"].items():
            size = next(run["size"] for run in record["runs"] if run["arm"] == arm)
            row = {"release_id": record["release_id"], "evaluation_id": record["evaluation_id"], "arm": arm,
                   "size": size, "scale": record["scale"]["name"], "seeds": len(record["seeds"]),
                   "samples_seen": record["compute"]["samples_seen"], "weighted": arm == "release" and record["weighted"]}
            for metric, summary in by_metric.items():
                row[f"{metric}_mean"], row[f"{metric}_sd"] = summary["mean"], summary["sd"]
            rows.append(row)
    if not rows:
        return pl.DataFrame()
    frame = pl.DataFrame(rows, infer_schema_length=None)
    headline = next(name for name in frame.columns if name.endswith("_mean"))
    order = (frame.filter(pl.col("arm") == "release").sort(headline, descending=True)
             .with_row_index("rank", offset=1).select("release_id", "rank"))
    arm_order = pl.col("arm").replace_strict({arm: rank for rank, arm in enumerate(ARMS)}, return_dtype=pl.Int8)
    return frame.join(order, on="release_id").sort("rank", arm_order).select("rank", pl.exclude("rank"))


def write_leaderboard(evaluations_uri: str, s3: S3Settings | None = None) -> dict[str, str]:
    """leaderboard.parquet, .md and .png under ``evaluations_uri``; name -> URI."""
    frame = leaderboard(evaluations_uri, s3)
    if frame.is_empty():
        return {}
    metrics = [name.removesuffix("_mean") for name in frame.columns if name.endswith("_mean")]
    written = {}
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    written["parquet"] = storage.join(evaluations_uri, f"{LEADERBOARD}.parquet")
    storage.write_bytes_atomic(written["parquet"], buffer.getvalue(), s3)
    lines = ["| rank | release | arm | size | scale | seeds | " + " | ".join(metrics) + " |",
             "| ---: | --- | --- | ---: | --- | ---: |" + " ---: |" * len(metrics)]
    for row in frame.iter_rows(named=True):
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_sd']:.3f}" if row.get(f"{m}_mean") is not None else "--"
                 for m in metrics]
        lines.append(f"| {row['rank']} | {row['release_id']} | {row['arm']}{' (IWL)' if row['weighted'] else ''} | "
                     f"{row['size']:,} | {row['scale']} | {row['seeds']} | " + " | ".join(cells) + " |")
    written["markdown"] = storage.join(evaluations_uri, f"{LEADERBOARD}.md")
    storage.write_bytes_atomic(written["markdown"], ("\n".join(lines) + "\n").encode(), s3)
    written["png"] = storage.join(evaluations_uri, f"{LEADERBOARD}.png")
    storage.write_bytes_atomic(written["png"], _leaderboard_png(frame, metrics), s3)
    return written


def _leaderboard_png(frame: pl.DataFrame, metrics: list[str]) -> bytes:
    shown = [metric for metric in metrics if f"{metric}_mean" in frame.columns][:2]
    labels = [f"{row['release_id'].rsplit('-', 1)[0]}\n{row['arm']}" for row in frame.iter_rows(named=True)]
    figure, axes = panel_grid(len(shown), columns=1, size=(max(6.0, 0.55 * frame.height), 3.0))
    colours = frame["arm"].replace_strict({"release": "#4c72b0", "random": "#aaaaaa", "pool": "#777777"}).to_list()
    for axis, metric in zip(axes, shown, strict=False):
        axis.bar(range(frame.height), frame[f"{metric}_mean"].to_list(), yerr=frame[f"{metric}_sd"].to_list(),
                 color=colours, capsize=3)
        axis.set_xticks(range(frame.height), labels, fontsize=6, rotation=90)
        axis.set_title(metric, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
