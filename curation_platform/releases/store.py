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
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curation_platform import __version__, storage
from curation_platform.pool import shard_file_uri
from curation_platform.processes import worker_context
from curation_platform.releases import inputs
from curation_platform.releases.apply_recipe import Selected, select, write_samples
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
    index_shards,
    pool_frame,
    score_provenance,
    table_versions,
)
from curation_platform.releases.recipe import Recipe
from curation_platform.scoring.pipeline import uid_sample_bound
from curation_platform.storage import S3Settings

PUBLISH_ATTEMPTS = 8  # concurrent creators of one recipe publish consecutive versions


@dataclass(frozen=True)
class Release:
    uri: str
    name: str
    version: int
    manifest: dict[str, Any]

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
    """Select shard by shard, write every file into a local staging folder, pin the table versions, publish.

    Without ``versions`` (a new selection, not a derivation), the scores table's shard index is brought up
    to date first, so the version the release pins reads one shard by index lookup."""
    if versions is None:
        index_shards(sources)
    versions = versions or table_versions(sources)
    provenance = score_provenance(sources, versions)
    with tempfile.TemporaryDirectory(prefix="release-selection-") as scratch, _executor(options.workers) as executor:
        selected = select(recipe, sources, versions, provenance, Path(scratch), options.exclude, executor)
        for attempt in range(PUBLISH_ATTEMPTS):
            version = next_version(releases_uri, recipe.name, sources.s3)
            try:
                uri, manifest = _stage_and_publish(recipe, sources, releases_uri, options, versions, provenance,
                                                   selected, version)
                break
            except FileExistsError:  # another writer published this version first: take the next one
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise
    return Release(uri, recipe.name, version, manifest)


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
                       version: int) -> tuple[str, dict[str, Any]]:
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
        _write_report(staging, recipe, selected, manifest, sources, versions, options.labels)
        write_checksums(staging)
        if options.fail_before_publish:
            options.fail_before_publish()
        _pin(sources, versions, recipe.name, version)
        return publish_folder(staging, releases_uri, recipe.name, version, sources.s3), manifest


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

def _write_report(staging: Path, recipe: Recipe, selected: Selected, manifest: dict[str, Any],
                  sources: ReleaseSources, versions: dict[str, int], labels: pl.DataFrame | None) -> None:
    """The report: its pool-wide figures read every column of a uniform uid sample of at most
    :data:`inputs.REPORT_MAX_ROWS` pool rows (all of them below that), so its memory stays bounded."""
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
    write_report(staging / "report", title=f"Release {manifest['release_id']}", pool=pool, selected_uids=shown,
                 funnel=stages, cutoffs=selected.cutoffs, load_images=_image_loader(pool, sources),
                 manifest_summary=summary)
    if labels is not None:
        _append_label_composition(staging / "report" / "report.md", pool, shown, labels)


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


def _append_label_composition(report: Path, frame: pl.DataFrame, uids: pl.Series, labels: pl.DataFrame) -> None:
    joined = frame.select("uid").join(labels.select("uid", "label"), on="uid", how="left").with_columns(
        pl.col("label").fill_null("unlabelled"), pl.col("uid").is_in(uids.implode()).alias("selected"))
    table = joined.group_by("label").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("release")).sort(
        "label")
    pool_total, release_total = max(joined.height, 1), max(uids.len(), 1)
    lines = ["", "## Evaluation labels (never used for selection)", "",
             "| label | pool | pool share | release | release share |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {label} | {pool} | {pool / pool_total:.3f} | {release} | {release / release_total:.3f} |"
              for label, pool, release in table.iter_rows()]
    with report.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


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
