"""Immutable, checksummed, re-derivable releases under ``releases/<name>/<version>/``.

A release folder holds ``manifest.json`` (what was selected from exactly which inputs),
``samples.parquet`` (uid, shard, key, the scores the recipe used, the weight), ``subset.npy``
(DataComp's sorted ``u8,u8`` uid pairs), the recipe verbatim, a report, and ``SHA256SUMS`` over
every other file. It is staged in full before it becomes visible: locally one ``rename`` publishes
the folder, on S3 ``SHA256SUMS`` is written last and versions without it are not releases. The
LanceDB table versions it read are pinned with tags, so ``verify`` can re-run the recipe on the
very same rows and compare uid sets.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from curation_platform import __version__, lance_tables, storage
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.releases.recipe import Recipe, RecipeError, parse_recipe
from curation_platform.scoring.pipeline import (
    REFERENCE_TABLE,
    SCORE_COLUMNS,
    SCORES_TABLE,
    TARGET_TABLE,
    score_filter,
    uid_sample_bound,
)
from curation_platform.selection import SelectionResult, run_selection
from curation_platform.storage import S3Settings

MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
SUBSET = "subset.npy"
CHECKSUMS = "SHA256SUMS"
EXCLUDED = "excluded_uids.txt"
SAMPLE_COLUMNS = ("uid", "key", "shard", "shard_id", "caption", "language", "caption_words", "caption_chars",
                  "width", "height", "aspect_ratio", "image_offset", "image_bytes")
TABLES = (SCORES_TABLE, REFERENCE_TABLE, TARGET_TABLE, EMBEDDINGS_TABLE)  # every table a release reads
REPORT_READERS = 32  # concurrent reads of per-shard validation reports
REPORT_MAX_ROWS = 2_000_000  # larger pools are drawn in the report from a uniform uid sample of this size


@dataclass(frozen=True)
class ReleaseSources:
    """Where a release reads from: the score tables of one teacher and the validated samples."""

    lance_uri: str
    validated_uri: str
    teacher_id: str
    pool_uri: str | None = None  # for example images in the report
    s3: S3Settings | None = field(default=None, compare=False)

    def describe(self) -> dict[str, Any]:
        return {"lance_uri": self.lance_uri, "validated_uri": self.validated_uri, "teacher_id": self.teacher_id,
                "pool_uri": self.pool_uri}


@dataclass(frozen=True)
class Release:
    uri: str
    name: str
    version: int
    manifest: dict[str, Any]

    @property
    def release_id(self) -> str:
        return self.manifest["release_id"]


# -- reading the inputs -------------------------------------------------------------------------

def table_versions(sources: ReleaseSources) -> dict[str, int]:
    """The current version of every table a release reads (those that exist)."""
    database = lance_tables.connect(sources.lance_uri, sources.s3)
    names = set(database.list_tables().tables)
    return {name: database.open_table(name).version for name in TABLES if name in names}


SCORE_PROVENANCE = ("score_version", "score_params", "reference_id", "target_id")


def _scores_at(sources: ReleaseSources, versions: dict[str, int]) -> Any:
    table = lance_tables.connect(sources.lance_uri, sources.s3).open_table(SCORES_TABLE)
    table.checkout(versions[SCORES_TABLE])
    return table.to_lance()


def score_provenance(sources: ReleaseSources, versions: dict[str, int]) -> dict[str, Any]:
    """The score version, parameters, reference and target that every one of the teacher's score rows
    was computed with, read batch by batch; a table that mixes them cannot be released from."""
    scanner = _scores_at(sources, versions).scanner(columns=list(SCORE_PROVENANCE),
                                                    filter=score_filter(sources.teacher_id))
    seen: set[tuple] = set()
    for batch in scanner.to_batches():
        distinct = pa.Table.from_batches([batch]).group_by(list(SCORE_PROVENANCE)).aggregate([])
        seen.update(tuple(row[name] for name in SCORE_PROVENANCE) for row in distinct.to_pylist())
    if not seen:
        raise RecipeError(f"no scores of teacher {sources.teacher_id} in {sources.lance_uri}")
    if len(seen) > 1:
        mixed = [name for index, name in enumerate(SCORE_PROVENANCE) if len({combo[index] for combo in seen}) > 1]
        raise RecipeError(f"the score rows of teacher {sources.teacher_id} differ in {mixed}: re-score the stale "
                          "shards against the current reference and target before releasing")
    (values,) = seen
    provenance = dict(zip(SCORE_PROVENANCE, values))
    provenance["score_params"] = json.loads(provenance["score_params"])
    return provenance


def _frame_of(batches: Any, schema: pa.Schema, columns: list[str]) -> pl.DataFrame:
    """Arrow batches into one polars frame, converting batch by batch so Arrow copies stay one batch large."""
    frames = [pl.from_arrow(batch) for batch in batches if batch.num_rows]
    if not frames:
        return pl.from_arrow(schema.empty_table().select(columns))
    return pl.concat(frames, rechunk=False)


def pool_frame(sources: ReleaseSources, versions: dict[str, int], columns: Sequence[str] | None = None,
               uid_below: str | None = None) -> pl.DataFrame:
    """One row per scored sample of the teacher at the given table versions, joined with its metadata,
    sorted by uid.

    ``columns`` (besides uid, shard, key and shard_id, always read) projects the score and sample
    columns, so a selection holds only what its recipe reads; ``uid_below`` reads a uniform sample
    (:func:`curation_platform.scoring.pipeline.uid_sample_bound`). The per-table constants come from
    :func:`score_provenance`. Memory per row: BENCHMARKS.md, "Pool-wide steps".
    """
    dataset = _scores_at(sources, versions)
    score_columns = [name for name in dataset.schema.names
                     if name not in ("row_key", "teacher_id", *SCORE_PROVENANCE)
                     and (columns is None or name in ("uid", "shard", *columns))]
    condition = score_filter(sources.teacher_id, uid_below=uid_below)
    scores = _frame_of(dataset.to_batches(columns=score_columns, filter=condition), dataset.schema,
                       score_columns).sort("uid")
    if scores.height == 0 and uid_below is None:
        raise RecipeError(f"no scores of teacher {sources.teacher_id} in {sources.lance_uri}")
    filesystem, local = storage.filesystem_for(storage.join(sources.validated_uri, "samples"), sources.s3)
    parquet = ds.dataset(local, filesystem=filesystem, format="parquet")
    sample_columns = ["uid", *(name for name in SAMPLE_COLUMNS if name not in score_columns
                               and (columns is None or name in ("key", "shard_id", *columns)))]
    samples = _frame_of(parquet.to_batches(columns=sample_columns, filter=None if uid_below is None
                                           else ds.field("uid") < uid_below), parquet.schema, sample_columns)
    frame = scores.join(samples, on="uid", how="inner", maintain_order="left")
    if frame.height != scores.height:
        raise RecipeError(f"{scores.height - frame.height} scored samples have no validated metadata in "
                          f"{sources.validated_uri}: re-ingest or re-score")
    return frame


def available_columns(sources: ReleaseSources, versions: dict[str, int]) -> list[str]:
    """Every score column of the table version and every sample column a recipe may name."""
    return [*_scores_at(sources, versions).schema.names, *SAMPLE_COLUMNS]


def selection_frame(recipe: Recipe, sources: ReleaseSources, versions: dict[str, int]) -> pl.DataFrame:
    """The pool frame a recipe selects from, after checking that every column it names exists.

    Pools up to :data:`REPORT_MAX_ROWS` are read whole, once, and the report draws on the same frame;
    larger ones with only the recipe's columns (the report then reads its own uid sample).
    """
    available = available_columns(sources, versions)
    recipe.check_columns(available, [name for name in available if name.startswith("iw_")])
    rows = _scores_at(sources, versions).count_rows(filter=score_filter(sources.teacher_id))
    return pool_frame(sources, versions, None if rows <= REPORT_MAX_ROWS else recipe.scores_used())


def _input_shards(frame: pl.DataFrame, sources: ReleaseSources) -> list[dict[str, Any]]:
    """Each input shard with the content checksum it was validated from (reports read concurrently:
    one object-store round trip each, 128,000 of them at 1.28B samples)."""
    shards = frame.group_by("shard", "shard_id").agg(pl.len().alias("samples")).sort("shard")

    def checksum(shard: str) -> str | None:
        report_uri = storage.join(sources.validated_uri, "reports", f"{shard}.json")
        if not storage.exists(report_uri, sources.s3):
            return None
        return json.loads(storage.read_bytes(report_uri, sources.s3)).get("checksum")

    with ThreadPoolExecutor(max_workers=REPORT_READERS) as pool:
        checksums = list(pool.map(checksum, shards["shard"].to_list()))
    return [{"shard": shard, "shard_id": shard_id, "checksum": value, "samples": samples}
            for (shard, shard_id, samples), value in zip(shards.iter_rows(), checksums)]


# -- selecting ----------------------------------------------------------------------------------

def select(recipe: Recipe, frame: pl.DataFrame, sources: ReleaseSources, provenance: dict[str, Any],
           embeddings_version: int | None) -> tuple[SelectionResult, pl.Series]:
    """Run the recipe on its :func:`selection_frame`; returns the selection and the final uids (after size
    bounds)."""
    if recipe.needs_target() and provenance["target_id"] is None:
        raise RecipeError(f"recipe {recipe.name!r} uses NormSim but the scores have no NormSim target: "
                          "score with a target first")
    selection = run_selection(frame.lazy(), recipe.policies(_embedding_fetcher(sources, embeddings_version)))
    uids = pl.Series("uid", selection.uids).cast(pl.String)
    if recipe.max_size is not None and uids.len() > recipe.max_size:
        kept = (frame.filter(pl.col("uid").is_in(uids.implode()))
                .sort(pl.col(recipe.rank_by).fill_nan(None), "uid", descending=[True, False], nulls_last=True)
                .head(recipe.max_size))
        uids = kept["uid"].sort()
    if uids.len() < recipe.min_size:
        raise RecipeError(f"recipe {recipe.name!r} selects {uids.len()} samples, fewer than min_size "
                          f"{recipe.min_size}")
    return selection, uids


def _embedding_fetcher(sources: ReleaseSources, version: int | None) -> Callable[[pa.Array], np.ndarray]:
    """uids -> image embeddings (NormSim-D), read from the pinned embeddings table version (``None``
    only for releases made before the embeddings table was pinned: then the current version)."""
    def fetch(uids: pa.Array) -> np.ndarray:
        table = lance_tables.connect(sources.lance_uri, sources.s3).open_table(EMBEDDINGS_TABLE)
        if version is not None:
            table.checkout(version)
        rows = table.to_lance().to_table(
            columns=["uid", "image_embedding"],
            filter=f"teacher_id = {lance_tables.sql_string(sources.teacher_id)}")
        order = pl.from_arrow(rows.select(["uid"])).with_row_index().join(
            pl.DataFrame({"uid": pl.Series(uids).cast(pl.String)}).with_row_index("want"), on="uid").sort("want")
        if order.height != len(uids):
            raise RecipeError("some selected samples have no embeddings of the teacher")
        return vectors(rows, "image_embedding")[order["index"].to_numpy()]

    return fetch


def weights(recipe: Recipe, selected: pl.DataFrame) -> pl.Series:
    """Per-sample weight: 1, or the importance weight of the recipe's prompt in the recipe's mode."""
    if recipe.weights is None:
        return pl.Series("weight", np.ones(selected.height))
    log_weights = selected[recipe.weights.column].to_numpy().astype(np.float64)
    if recipe.weights.mode == "raw":
        return pl.Series("weight", np.exp(log_weights))
    log_mean = np.logaddexp.reduce(log_weights) - np.log(max(len(log_weights), 1))
    normalised = np.exp(log_weights - log_mean)
    if recipe.weights.mode == "clipped":
        normalised = np.minimum(normalised, recipe.weights.clip_at)
    return pl.Series("weight", normalised)


# -- artefacts ----------------------------------------------------------------------------------

_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def subset_array(uids: list[str]) -> np.ndarray:
    """DataComp's subset: sorted ``(int(uid[:16], 16), int(uid[16:32], 16))`` pairs, dtype ``u8,u8``.

    Decoded in numpy (a lookup table over the uids' ASCII bytes), not per uid in Python.
    """
    chars = np.frombuffer(np.asarray(uids, dtype="S33").tobytes(), np.uint8).reshape(len(uids), 33)
    nibbles = _NIBBLE[chars[:, :32]]
    if (nibbles == 255).any() or chars[:, 32].any():
        raise ValueError("DataComp subsets need uids of exactly 32 hexadecimal digits")
    halves = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(">u8")
    pairs = np.empty(len(uids), dtype=np.dtype("u8,u8"))
    pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
    pairs.sort(order=["f0", "f1"])
    return pairs


def subset_uids(subset: np.ndarray) -> list[str]:
    """The inverse of :func:`subset_array`."""
    return [f"{int(high):016x}{int(low):016x}" for high, low in subset.tolist()]


def _samples_table(recipe: Recipe, frame: pl.DataFrame, uids: pl.Series) -> pa.Table:
    selected = frame.filter(pl.col("uid").is_in(uids.implode())).sort("uid")
    used = [name for name in recipe.scores_used() if name in SCORE_COLUMNS or name.startswith("iw_")]
    table = selected.select("uid", "shard", "key", *used).with_columns(weights(recipe, selected))
    return table.to_arrow()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    return sink.getvalue()


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _tag(name: str, version: int) -> str:
    return f"release-{name}-{version}"


def _pin(sources: ReleaseSources, versions: dict[str, int], name: str, version: int) -> None:
    """Tag every table version the release read, so version cleanup cannot remove them."""
    database = lance_tables.connect(sources.lance_uri, sources.s3)
    tag = _tag(name, version)
    for table_name, table_version in versions.items():
        tags = database.open_table(table_name).tags
        existing = tags.list().get(tag)
        if existing is not None and existing["version"] != table_version:
            tags.delete(tag)  # left by an attempt that crashed before publishing
        if existing is None or existing["version"] != table_version:
            tags.create(tag, table_version)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the release folder -------------------------------------------------------------------------

def versions_of(releases_uri: str, name: str, s3: S3Settings | None = None) -> list[int]:
    """Published versions of a release name (folders with SHA256SUMS), ascending."""
    base = storage.join(releases_uri, name)
    found = []
    for entry in storage.list_dirs(base, s3):
        if entry.isdigit() and storage.exists(storage.join(base, entry, CHECKSUMS), s3):
            found.append(int(entry))
    return sorted(found)


def _next_version(releases_uri: str, name: str, s3: S3Settings | None) -> int:
    taken = [int(entry) for entry in storage.list_dirs(storage.join(releases_uri, name), s3) if entry.isdigit()]
    return max(taken, default=0) + 1


def _publish(staging: Path, releases_uri: str, name: str, version: int, s3: S3Settings | None) -> str:
    """Make the staged folder visible in one step (local rename; on S3, SHA256SUMS written last)."""
    final = storage.join(releases_uri, name, str(version))
    if storage.exists(storage.join(final, CHECKSUMS), s3):
        raise FileExistsError(f"release {name}/{version} exists and is never overwritten")
    if not storage.is_s3(releases_uri):
        parent = Path(final).parent
        parent.mkdir(parents=True, exist_ok=True)
        hidden = parent / f".staging-{version}-{uuid.uuid4().hex}"
        shutil.copytree(staging, hidden)
        try:
            os.rename(hidden, final)  # fails on an existing non-empty folder: never overwrites
        except OSError as error:
            shutil.rmtree(hidden, ignore_errors=True)
            raise FileExistsError(f"release {name}/{version} appeared meanwhile") from error
        return str(Path(final).resolve())
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in sorted(files, key=lambda path: path.name == CHECKSUMS):
        storage.write_bytes_atomic(storage.join(final, *path.relative_to(staging).parts), path.read_bytes(), s3)
    return final


def _write_checksums(staging: Path) -> None:
    lines = [f"{_sha256(path.read_bytes())}  {path.relative_to(staging).as_posix()}"
             for path in sorted(staging.rglob("*")) if path.is_file() and path.name != CHECKSUMS]
    (staging / CHECKSUMS).write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class ReleaseOptions:
    """What a release records besides its inputs (set by the orchestrator)."""

    run_id: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    labels: pl.DataFrame | None = None  # evaluation-only labels (uid, label) shown in the report
    parent: dict[str, Any] | None = None
    exclude: tuple[str, ...] = ()
    fail_before_publish: Callable[[], None] | None = None  # tests inject crashes here


def create_release(recipe: Recipe, sources: ReleaseSources, releases_uri: str,
                   options: ReleaseOptions = ReleaseOptions(), versions: dict[str, int] | None = None) -> Release:
    """Select, write every file into a local staging folder, pin the table versions, publish."""
    versions = versions or table_versions(sources)
    provenance = score_provenance(sources, versions)
    frame = selection_frame(recipe, sources, versions)
    selection, uids = select(recipe, frame, sources, provenance, versions.get(EMBEDDINGS_TABLE))
    if options.exclude:
        uids = uids.filter(~uids.is_in(list(options.exclude)))
    version = _next_version(releases_uri, recipe.name, sources.s3)
    samples = _samples_table(recipe, frame, uids)
    funnel = [stage._asdict() for stage in selection.funnel]
    if recipe.max_size is not None or options.exclude:
        funnel.append({"stage": "size bounds and exclusions", "rows": samples.num_rows})
    with tempfile.TemporaryDirectory(prefix="release-") as scratch:
        staging = Path(scratch)
        samples_bytes = _parquet_bytes(samples)
        (staging / SAMPLES).write_bytes(samples_bytes)
        (staging / SUBSET).write_bytes(_npy_bytes(subset_array(samples.column("uid").to_pylist())))
        recipe_file = f"recipe{'.yaml' if recipe.text.lstrip().startswith(('name:', '---')) else '.toml'}"
        (staging / recipe_file).write_text(recipe.text)
        if options.exclude:
            (staging / EXCLUDED).write_text("\n".join(sorted(options.exclude)) + "\n")
        manifest = _manifest(recipe, recipe_file, sources, versions, provenance, frame, selection, funnel, samples,
                             version, _sha256(samples_bytes), options)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _write_report(staging, recipe, frame, samples, funnel, manifest, sources, versions, options.labels)
        _write_checksums(staging)
        if options.fail_before_publish:
            options.fail_before_publish()
        _pin(sources, versions, recipe.name, version)
        uri = _publish(staging, releases_uri, recipe.name, version, sources.s3)
    return Release(uri, recipe.name, version, manifest)


def _manifest(recipe: Recipe, recipe_file: str, sources: ReleaseSources, versions: dict[str, int],
              provenance: dict[str, Any], frame: pl.DataFrame, selection: SelectionResult, funnel: list[dict],
              samples: pa.Table, version: int, samples_sha256: str, options: ReleaseOptions) -> dict[str, Any]:
    exclude_text = "\n".join(sorted(options.exclude)) + "\n" if options.exclude else None
    return {
        "release_id": f"{recipe.name}-{version}-{samples_sha256[:12]}",
        "name": recipe.name,
        "version": version,
        "description": recipe.description,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"file": recipe_file, "text": recipe.text, "sha256": recipe.sha256},
        "teacher_id": sources.teacher_id,
        **provenance,
        "sources": sources.describe(),
        "lancedb_tables": {name: {"version": number, "tag": _tag(recipe.name, version)}
                           for name, number in sorted(versions.items())},
        "input_shards": _input_shards(frame, sources),
        "package_version": __version__,
        "git_commit": _git_commit(),
        "run_id": options.run_id,
        "policies": selection.policies,
        "funnel": funnel,
        "selected": samples.num_rows,
        "pool_rows": frame.height,
        "weights": None if recipe.weights is None else {"prompt": recipe.weights.prompt,
                                                          "column": recipe.weights.column,
                                                          "mode": recipe.weights.mode,
                                                          "clip_at": recipe.weights.clip_at},
        "samples_sha256": samples_sha256,
        "data_quality_checks": options.checks,
        "parent": options.parent,
        "exclusions": None if exclude_text is None else {"file": EXCLUDED, "count": len(options.exclude),
                                                           "sha256": _sha256(exclude_text.encode())},
    }


def _write_report(staging: Path, recipe: Recipe, frame: pl.DataFrame, samples: pa.Table, funnel: list[dict],
                  manifest: dict[str, Any], sources: ReleaseSources, versions: dict[str, int],
                  labels: pl.DataFrame | None) -> None:
    """The report: its pool-wide figures read every column of a uniform uid sample of at most
    :data:`REPORT_MAX_ROWS` pool rows (all of them below that), so its memory stays bounded."""
    from curation_platform.releases.report import write_report

    uids = pl.Series("uid", samples.column("uid").to_pylist(), dtype=pl.String)
    uid_below = uid_sample_bound(frame.height, REPORT_MAX_ROWS)
    pool = frame if uid_below is None else pool_frame(sources, versions, uid_below=uid_below)
    shown = uids if uid_below is None else uids.filter(uids < uid_below)
    stages = [{"stage": stage["stage"], "rows_in": previous["rows"], "rows_out": stage["rows"]}
              for previous, stage in zip(funnel, funnel[1:])]
    summary = {key: manifest[key] for key in ("release_id", "teacher_id", "reference_id", "target_id",
                                              "pool_rows", "selected")}
    summary["recipe_sha256"] = manifest["recipe"]["sha256"]
    if uid_below is not None:
        summary["figures_from"] = (f"a uniform sample of {pool.height:,} pool rows (uid < '{uid_below}'), "
                                   f"{shown.len():,} of them selected")
    write_report(staging / "report", title=f"Release {manifest['release_id']}", pool=pool, selected_uids=shown,
                 funnel=stages, cutoffs=_cutoffs(recipe, frame, uids),
                 load_images=_image_loader(pool, sources), manifest_summary=summary)
    if labels is not None:
        _append_label_composition(staging / "report" / "report.md", frame, uids, labels)


def _cutoffs(recipe: Recipe, frame: pl.DataFrame, uids: pl.Series) -> dict[str, float]:
    """For each ranked or thresholded score, the weakest value that made it into the release."""
    selected = frame.filter(pl.col("uid").is_in(uids.implode()))
    cutoffs = {}
    for name in recipe.scores_used():
        if (name in SCORE_COLUMNS or name.startswith("iw_")) and selected.height:
            value = selected[name].fill_nan(None).min()
            if value is not None:
                cutoffs[name] = float(value)
    return cutoffs


def _image_loader(frame: pl.DataFrame, sources: ReleaseSources) -> Callable[[list[str]], dict[str, bytes]]:
    """Read a few images by their recorded tar offsets (for the report's example grids)."""
    def load(uids: list[str]) -> dict[str, bytes]:
        if sources.pool_uri is None:
            return {}
        rows = frame.filter(pl.col("uid").is_in(uids)).select("uid", "shard", "image_offset", "image_bytes")
        images = {}
        for uid, shard, offset, size in rows.iter_rows():
            filesystem, path = storage.filesystem_for(storage.join(sources.pool_uri, f"{shard}.tar"), sources.s3)
            try:
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


# -- reading, verifying, deriving, comparing ----------------------------------------------------

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


@dataclass(frozen=True)
class Verification:
    release_id: str
    files_checked: int
    mismatched: list[str]
    missing: list[str]
    unlisted: list[str]
    uids_identical: bool | None
    uids_added: int = 0
    uids_removed: int = 0
    pins_missing: list[str] = field(default_factory=list)  # "table@version" the release read that are gone

    @property
    def ok(self) -> bool:
        return (not (self.mismatched or self.missing or self.unlisted or self.pins_missing)
                and self.uids_identical is not False)


def verify_release(release_uri: str, s3: S3Settings | None = None, rederive: bool = True) -> Verification:
    """Check every file against SHA256SUMS, then (``rederive``) re-run the recipe on the pinned tables."""
    release = open_release(release_uri, s3)
    listed = dict(reversed(line.split("  ", 1)) for line in
                  storage.read_bytes(storage.join(release_uri, CHECKSUMS), s3).decode().splitlines() if line)
    mismatched, missing = [], []
    for name, digest in sorted(listed.items()):
        uri = storage.join(release_uri, *name.split("/"))
        if not storage.exists(uri, s3):
            missing.append(name)
        elif _sha256(storage.read_bytes(uri, s3)) != digest:
            mismatched.append(name)
    present = _files_under(release_uri, s3)
    unlisted = sorted(set(present) - set(listed) - {CHECKSUMS})
    same, added, removed = None, 0, 0
    pins_missing = _missing_pins(release, s3) if rederive else []
    if rederive and not pins_missing:
        stored = set(read_samples(release, s3)["uid"].to_list())
        derived = set(_rederive(release, s3))
        same, added, removed = stored == derived, len(stored - derived), len(derived - stored)
    return Verification(release.release_id, len(listed), mismatched, missing, unlisted, same, added, removed,
                        pins_missing)


def _missing_pins(release: Release, s3: S3Settings | None) -> list[str]:
    """The pinned table versions that can no longer be read (a dropped table, a cleaned-up version)."""
    manifest = release.manifest
    database = lance_tables.connect(manifest["sources"]["lance_uri"], s3)
    names = set(database.list_tables().tables)
    missing = []
    for name, entry in sorted(manifest["lancedb_tables"].items()):
        try:
            if name not in names:
                raise ValueError(name)
            database.open_table(name).checkout(entry["version"])
        except (ValueError, OSError, RuntimeError):
            missing.append(f"{name}@{entry['version']}")
    return missing


def _files_under(uri: str, s3: S3Settings | None) -> list[str]:
    filesystem, root = storage.filesystem_for(uri, s3)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(info.path[len(root.rstrip("/")) + 1:] for info in infos if info.type == pafs.FileType.File)


def _rederive(release: Release, s3: S3Settings | None) -> list[str]:
    manifest = release.manifest
    recipe = parse_recipe(manifest["recipe"]["text"], manifest["recipe"]["file"].endswith(".yaml"))
    sources = ReleaseSources(**manifest["sources"], s3=s3)
    versions = {name: entry["version"] for name, entry in manifest["lancedb_tables"].items()}
    frame = selection_frame(recipe, sources, versions)
    _, uids = select(recipe, frame, sources, score_provenance(sources, versions), versions.get(EMBEDDINGS_TABLE))
    excluded: set[str] = set()
    if manifest.get("exclusions"):
        excluded = set(storage.read_bytes(storage.join(release.uri, EXCLUDED), s3).decode().split())
    return [uid for uid in uids.to_list() if uid not in excluded]


def derive_release(parent_uri: str, exclude: list[str], releases_uri: str, s3: S3Settings | None = None,
                   options: ReleaseOptions = ReleaseOptions()) -> Release:
    """A new version of the parent's recipe on the parent's pinned tables, without the listed uids."""
    parent = open_release(parent_uri, s3)
    manifest = parent.manifest
    recipe = parse_recipe(manifest["recipe"]["text"], manifest["recipe"]["file"].endswith(".yaml"))
    sources = ReleaseSources(**manifest["sources"], s3=s3)
    versions = {name: entry["version"] for name, entry in manifest["lancedb_tables"].items()}
    inherited = set(manifest["exclusions"] and storage.read_bytes(
        storage.join(parent.uri, EXCLUDED), s3).decode().split() or [])
    exclusion = tuple(sorted(inherited | {uid.strip() for uid in exclude if uid.strip()}))
    lineage = {"release_id": parent.release_id, "uri": parent.uri, "samples_sha256": manifest["samples_sha256"]}
    options = ReleaseOptions(run_id=options.run_id, checks=options.checks, labels=options.labels,
                             parent=lineage, exclude=exclusion, fail_before_publish=options.fail_before_publish)
    return create_release(recipe, sources, releases_uri, options, versions)


def diff_releases(a_uri: str, b_uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """uids added and removed from A to B, and how each shared score's distribution moved."""
    a, b = open_release(a_uri, s3), open_release(b_uri, s3)
    samples_a, samples_b = read_samples(a, s3), read_samples(b, s3)
    uids_a, uids_b = set(samples_a["uid"].to_list()), set(samples_b["uid"].to_list())
    shared = [name for name in samples_a.columns if name in samples_b.columns and name not in ("uid", "shard", "key")]
    shift = {}
    for name in shared:
        left, right = samples_a[name].fill_nan(None), samples_b[name].fill_nan(None)
        shift[name] = {"mean_a": left.mean(), "mean_b": right.mean(), "median_a": left.median(),
                       "median_b": right.median(), "min_a": left.min(), "min_b": right.min()}
    return {"a": a.release_id, "b": b.release_id, "size_a": len(uids_a), "size_b": len(uids_b),
            "added": len(uids_b - uids_a), "removed": len(uids_a - uids_b), "kept": len(uids_a & uids_b),
            "added_sample": sorted(uids_b - uids_a)[:20], "removed_sample": sorted(uids_a - uids_b)[:20],
            "score_shift": shift}
