"""Making and reading releases under ``releases/<name>/<version>/``: :func:`create_release` applies a
recipe to the pinned inputs, stages every file in a local folder (``manifest.json``: what was selected
from exactly which inputs; ``samples.parquet``: uid, shard, key, the scores the recipe used, the
weight; ``subset.npy``; the recipe verbatim; the report; ``SHA256SUMS``), pins the table versions it
read and publishes the folder; this module owns the manifest and the report's orchestration, and
:func:`open_release`, :func:`read_samples` and :func:`list_releases` read published releases back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from curation_platform import __version__, storage
from curation_platform.layout import ShardOutputs
from curation_platform.pool import shard_file_uri
from curation_platform.processes import worker_context
from curation_platform.releases import inputs, passes
from curation_platform.releases.apply_recipe import Selected, write_samples
from curation_platform.releases.artefacts import (
    CHECKSUMS,
    EXCLUDED,
    MANIFEST,
    SAMPLES,
    SUBSET,
    _git_commit,
    next_version,
    publish_folder,
    sha256_file,
    sha256_hex,
    versions_of,
    write_checksums,
)
from curation_platform.releases.inputs import (
    ReleaseSources,
    _input_shards,
    _pin,
    _tag,
    duplicate_columns,
    pool_frame,
)
from curation_platform.releases.passes import PassFolder, ReleasePlan
from curation_platform.releases.recipe import Recipe
from curation_platform.scoring.pipeline import uid_sample_bound
from curation_platform.storage import S3Settings

if TYPE_CHECKING:
    from curation_platform.releases.report import ReportResult

PUBLISH_ATTEMPTS = 8  # concurrent creators of one recipe publish consecutive versions


@dataclass(frozen=True)
class Release:
    uri: str
    name: str
    version: int
    manifest: dict[str, Any]
    # what the report writer returned, for the orchestrator's UI (None for a release opened from storage)
    report: ReportResult | None = field(default=None, compare=False, repr=False)

    @property
    def release_id(self) -> str:
        return self.manifest["release_id"]


@dataclass(frozen=True)
class ReleaseOptions:
    """What a release records besides its inputs (set by the orchestrator)."""

    run_id: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    labels: pl.DataFrame | None = None  # evaluation-only labels (uid, label) shown in the report
    parent: dict[str, Any] | None = None
    exclude: tuple[str, ...] = ()
    workers: int = 1  # processes for the per-shard selection passes
    fail_before_publish: Callable[[], None] | None = None  # tests inject crashes here


# -- creating -----------------------------------------------------------------------------------

def create_release(recipe: Recipe, sources: ReleaseSources, releases_uri: str,
                   options: ReleaseOptions = ReleaseOptions(), versions: dict[str, int] | None = None) -> Release:
    """Plan, run the passes shard by shard (on ``options.workers`` processes) in a local scratch folder, then
    publish. Without ``versions`` (a new selection, not a derivation) the plan pins the current table
    versions, after bringing the scores table's shard index up to date so each shard is an index lookup."""
    with tempfile.TemporaryDirectory(prefix="release-passes-") as scratch, _executor(options.workers) as executor:
        plan, selected = passes.select(recipe, sources, PassFolder(scratch), versions, options.exclude, executor)
        return publish_release(recipe, plan, selected, releases_uri, options)


def publish_release(recipe: Recipe, plan: ReleasePlan, selected: Selected, releases_uri: str,
                    options: ReleaseOptions = ReleaseOptions()) -> Release:
    """Stage every file of the recipe's next version and publish it; when another writer takes that version
    first, the next one (concurrent creators of one recipe publish consecutive versions)."""
    for _ in range(PUBLISH_ATTEMPTS - 1):
        try:
            return _publish_next(recipe, plan, selected, releases_uri, options)
        except FileExistsError:
            continue
    return _publish_next(recipe, plan, selected, releases_uri, options)


def _publish_next(recipe: Recipe, plan: ReleasePlan, selected: Selected, releases_uri: str,
                  options: ReleaseOptions) -> Release:
    version = next_version(releases_uri, recipe.name, plan.sources.s3)
    uri, manifest, report = _stage_and_publish(recipe, plan.sources, releases_uri, options, plan.versions,
                                               plan.provenance, selected, version)
    return Release(uri, recipe.name, version, manifest, report)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor | None]:
    """Worker processes for the per-shard selection passes (None: run them in this process)."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=worker_context()) as executor:
        yield executor


def _stage_and_publish(recipe: Recipe, sources: ReleaseSources, releases_uri: str, options: ReleaseOptions,
                       versions: dict[str, int], provenance: dict[str, Any], selected: Selected,
                       version: int) -> tuple[str, dict[str, Any], ReportResult]:
    """Write every file of ``version`` into a local staging folder, pin the tables, publish in one step."""
    with tempfile.TemporaryDirectory(prefix="release-") as scratch:
        staging = Path(scratch)
        write_samples(recipe, selected, staging / SAMPLES, staging / SUBSET)
        recipe_file = f"recipe{'.yaml' if recipe.text.lstrip().startswith(('name:', '---')) else '.toml'}"
        (staging / recipe_file).write_text(recipe.text)
        if options.exclude:
            (staging / EXCLUDED).write_text("\n".join(sorted(options.exclude)) + "\n")
        manifest = _manifest(recipe, recipe_file, sources, versions, provenance, selected, version,
                             sha256_file(staging / SAMPLES), options)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        report = _write_report(staging, recipe, selected, manifest, sources, versions, options.labels)
        write_checksums(staging)
        if options.fail_before_publish:
            options.fail_before_publish()
        _pin(sources, versions, recipe.name, version)
        return publish_folder(staging, releases_uri, recipe.name, version, sources.s3), manifest, report


def _manifest(recipe: Recipe, recipe_file: str, sources: ReleaseSources, versions: dict[str, int],
              provenance: dict[str, Any], selected: Selected, version: int, samples_sha256: str,
              options: ReleaseOptions) -> dict[str, Any]:
    exclude_text = "\n".join(sorted(options.exclude)) + "\n" if options.exclude else None
    return {
        "release_id": f"{recipe.name}-{version}-{samples_sha256[:12]}",
        "name": recipe.name,
        "version": version,
        "description": recipe.description,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "recipe": {"file": recipe_file, "text": recipe.text, "sha256": recipe.sha256},
        "teacher_id": sources.teacher_id,
        **provenance,
        "sources": sources.describe(),
        "lancedb_tables": {name: {"version": number, "tag": _tag(recipe.name, version)}
                           for name, number in sorted(versions.items())},
        "input_shards": _input_shards(selected.shard_rows, sources),
        "package_version": __version__,
        "git_commit": _git_commit(),
        "run_id": options.run_id,
        "policies": selected.selection.policies,
        "funnel": selected.funnel,
        "selected": selected.count,
        "pool_rows": selected.pool_rows,
        "weights": None if recipe.weights is None else {"prompt": recipe.weights.prompt,
                                                          "column": recipe.weights.column,
                                                          "mode": recipe.weights.mode,
                                                          "clip_at": recipe.weights.clip_at},
        "samples_sha256": samples_sha256,
        "data_quality_checks": options.checks,
        "parent": options.parent,
        "exclusions": None if exclude_text is None else {"file": EXCLUDED, "count": len(options.exclude),
                                                           "sha256": sha256_hex(exclude_text.encode())},
    }


# -- the report ---------------------------------------------------------------------------------

PROVENANCE_FIELDS = ("git_commit", "created_at", "package_version", "run_id")  # the manifest's, in the report


def _write_report(staging: Path, recipe: Recipe, selected: Selected, manifest: dict[str, Any],
                  sources: ReleaseSources, versions: dict[str, int], labels: pl.DataFrame | None) -> ReportResult:
    """The report: its pool-wide figures read every column of a uniform uid sample of at most
    :data:`inputs.REPORT_MAX_ROWS` pool rows (all of them below that), so its memory stays bounded; the
    ingestion funnel sums the validation reports of the input shards, the check results and provenance
    come from the manifest, and the evaluation labels (when given) are a section of both pages."""
    from curation_platform.releases.report import write_report

    uid_below = uid_sample_bound(selected.pool_rows, inputs.REPORT_MAX_ROWS)
    pool = pool_frame(sources, versions, uid_below=uid_below)
    if recipe.needs_duplicates():
        pool = pool.join(duplicate_columns(recipe, sources, versions), on="uid", how="left", maintain_order="left")
    shown = pl.read_parquet(staging / SAMPLES, columns=["uid"])["uid"]
    if uid_below is not None:
        shown = shown.filter(shown < uid_below)
    stages = [{"stage": stage["stage"], "rows_in": previous["rows"], "rows_out": stage["rows"]}
              for previous, stage in itertools.pairwise(selected.funnel)]
    summary = {key: manifest[key] for key in ("release_id", "teacher_id", "reference_id", "target_id",
                                              "pool_rows", "selected")}
    summary["recipe_sha256"] = manifest["recipe"]["sha256"]
    if uid_below is not None:
        summary["figures_from"] = (f"a uniform sample of {pool.height:,} pool rows (uid < '{uid_below}'), "
                                   f"{shown.len():,} of them selected")
    provenance = {key: manifest.get(key) for key in PROVENANCE_FIELDS}
    provenance["input_shards"] = manifest["input_shards"]
    extra = [] if labels is None else [_label_composition(pool, shown, labels)]
    return write_report(staging / "report", title=f"Release {manifest['release_id']}", pool=pool,
                        selected_uids=shown, funnel=stages, cutoffs=selected.cutoffs,
                        load_images=_image_loader(pool, sources), manifest_summary=summary,
                        ingestion=_ingestion_totals(selected.shard_rows, sources),
                        checks=manifest["data_quality_checks"], provenance=provenance, extra_sections=extra)


def _ingestion_totals(shards: Iterable[str], sources: ReleaseSources) -> dict[str, Any] | None:
    """The validation reports of ``shards`` summed (samples the shards mention, accepted, quarantined by
    reason code), read concurrently like :func:`inputs._input_shards` and keeping only those counts;
    None when no shard has a report."""
    def counts(shard: str) -> tuple[int, int, dict[str, int]] | None:
        report_uri = ShardOutputs.of(sources.validated_uri, shard).report
        if not storage.exists(report_uri, sources.s3):
            return None
        report = json.loads(storage.read_bytes(report_uri, sources.s3))
        if "total" not in report or "accepted" not in report:
            return None  # a report without the counts: the shard is listed as without one
        return int(report["total"]), int(report["accepted"]), dict(report.get("by_reason") or {})

    with ThreadPoolExecutor(max_workers=inputs.REPORT_READERS) as pool:
        found = list(pool.map(counts, shards))
    read = [entry for entry in found if entry is not None]
    if not read:
        return None
    quarantined: dict[str, int] = {}
    for _, _, reasons in read:
        for reason, count in reasons.items():
            quarantined[reason] = quarantined.get(reason, 0) + int(count)
    return {"samples": sum(entry[0] for entry in read), "accepted": sum(entry[1] for entry in read),
            "quarantined": dict(sorted(quarantined.items())), "shards": len(read),
            "shards_without_report": len(found) - len(read)}


def _image_loader(frame: pl.DataFrame, sources: ReleaseSources) -> Callable[[list[str]], dict[str, bytes]]:
    """Read a few images by their recorded tar offsets (for the report's example grids)."""
    def load(uids: list[str]) -> dict[str, bytes]:
        if sources.pool_uri is None:
            return {}
        rows = frame.filter(pl.col("uid").is_in(uids)).select("uid", "shard", "image_offset", "image_bytes")
        images = {}
        for uid, shard, offset, size in rows.iter_rows():
            try:
                filesystem, path = storage.filesystem_for(shard_file_uri(sources.pool_uri, shard), sources.s3)
                with filesystem.open_input_file(path) as tar:
                    images[uid] = tar.read_at(size, offset)
            except OSError:
                continue  # the report shows a placeholder
        return images

    return load


def _label_composition(frame: pl.DataFrame, uids: pl.Series, labels: pl.DataFrame) -> str:
    """The report section (Markdown) comparing the evaluation labels' shares in the pool and the release."""
    from curation_platform.releases.report import _cell

    joined = frame.select("uid").join(labels.select("uid", "label"), on="uid", how="left").with_columns(
        pl.col("label").cast(pl.String).fill_null("unlabelled"), pl.col("uid").is_in(uids.implode()).alias("selected"))
    table = joined.group_by("label").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("release")).sort(
        "label")
    pool_total, release_total = max(joined.height, 1), max(uids.len(), 1)
    lines = ["| label | pool | pool share | release | release share |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {_cell(label)} | {pool} | {pool / pool_total:.3f} | {release} | {release / release_total:.3f} |"
              for label, pool, release in table.iter_rows()]
    return "## Evaluation labels (never used for selection)\n\n" + "\n".join(lines)


# -- reading ------------------------------------------------------------------------------------

def open_release(release_uri: str, s3: S3Settings | None = None) -> Release:
    if not storage.exists(storage.join(release_uri, CHECKSUMS), s3):
        raise FileNotFoundError(f"{release_uri} is not a published release (no {CHECKSUMS})")
    manifest = json.loads(storage.read_bytes(storage.join(release_uri, MANIFEST), s3))
    return Release(release_uri, manifest["name"], manifest["version"], manifest)


def read_samples(release: Release, s3: S3Settings | None = None) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(storage.read_bytes(storage.join(release.uri, SAMPLES), s3)))


def list_releases(releases_uri: str, s3: S3Settings | None = None) -> list[Release]:
    return [open_release(storage.join(releases_uri, name, str(version)), s3)
            for name in storage.list_dirs(releases_uri, s3) if not name.startswith(".")
            for version in versions_of(releases_uri, name, s3)]
