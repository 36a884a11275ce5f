"""Releases as passes over the shards, each a step that any worker (a process, a Dagster partition on
its own machine) can run, with every intermediate in one folder (local or any store):

1. :func:`plan_releases` pins the table versions, checks every recipe against them and counts the
   scored rows per shard; :func:`write_plan` records that as ``plan.json`` (and the pinned duplicate
   groups once, for the shards to join);
2. pass 1, per shard, :func:`write_candidates`: the shard's rows with the columns every planned recipe
   reads, sorted by uid, into ``candidates/<index>.parquet`` (the exact per-shard score columns the
   global step ranks);
3. the global step, per recipe, :func:`resolve_recipe`: every stage becomes an exact per-row filter
   (:class:`~curation_platform.partitioned_selection.PartitionedPool`: cut-offs from sketches of the
   candidates plus a counting pass around the bracket, so ties resolve exactly; dedup and the global
   stages as uid sets), saved without pickles as ``recipes/<sha>/resolution.json`` and uid parquets;
4. pass 2, per shard and recipe, :func:`write_selection`: the shard's selected rows and its funnel counts;
5. :func:`assemble` gathers a recipe's per-shard results into a :class:`Selected`, which
   :func:`~curation_platform.releases.apply_recipe.write_samples` merges by streaming.

:func:`select` runs all of it for one recipe (``executor`` runs the per-shard steps); the Dagster
code location runs each step as its own asset, the per-shard ones partitioned by shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation_platform import lance_tables, storage
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.partitioned_selection import (
    SHARD,
    Cut,
    Membership,
    PartitionedPool,
    TopCount,
    _apply_and_write,
    split_partitionable,
)
from curation_platform.releases.apply_recipe import (
    SIZE_BOUNDS,
    Selected,
    ShardSelection,
    _cutoffs,
    release_columns,
)
from curation_platform.releases.inputs import (
    ReleaseSources,
    available_columns,
    check_duplicate_inputs,
    index_shards,
    pool_frame,
    read_duplicate_columns,
    score_provenance,
    shard_rows,
    table_versions,
)
from curation_platform.releases.recipe import Recipe, RecipeError
from curation_platform.selection import UID, FunnelStage, Policy, SelectionResult, label, run_selection
from curation_platform.storage import S3Settings

PLAN = "plan.json"
DUPLICATES = "duplicates.parquet"
RESOLUTION = "resolution.json"


@dataclass(frozen=True)
class PassFolder:
    """Where the passes of one plan keep their files (a local path or any storage URI)."""

    uri: str
    s3: S3Settings | None = field(default=None, compare=False)

    def join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def write_table(self, relative: str, table: pa.Table) -> None:
        """Written whole or not at all, so a retried step never leaves half a file for the next one."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes_atomic(self.join(relative), buffer.getvalue(), self.s3)

    def parquet(self, relative: str) -> pq.ParquetFile:
        filesystem, path = storage.filesystem_for(self.join(relative), self.s3)
        return pq.ParquetFile(filesystem.open_input_file(path))

    def read_table(self, relative: str, columns: Sequence[str] | None = None) -> pa.Table:
        return self.parquet(relative).read(columns=columns)

    def write_json(self, relative: str, value: Any) -> None:
        storage.write_bytes_atomic(self.join(relative), (json.dumps(value, indent=1, sort_keys=True) + "\n").encode(),
                                   self.s3)

    def read_json(self, relative: str) -> Any:
        return json.loads(storage.read_bytes(self.join(relative), self.s3))

    def exists(self, relative: str) -> bool:
        return storage.exists(self.join(relative), self.s3)

    def remove(self) -> None:
        filesystem, path = storage.filesystem_for(self.uri, self.s3)
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            filesystem.delete_dir(path)


# -- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReleasePlan:
    """What every pass of a set of recipes reads: pinned table versions, the score provenance, the
    scored rows per shard (a shard's index is its position in name order), the union of the recipes'
    columns, and the recipes by name with their sha256."""

    sources: ReleaseSources
    versions: dict[str, int]
    provenance: dict[str, Any]
    shard_rows: dict[str, int]
    columns: tuple[str, ...]
    duplicates: bool
    recipes: dict[str, str]

    @property
    def shards(self) -> list[str]:
        return list(self.shard_rows)

    @property
    def pool_rows(self) -> int:
        return sum(self.shard_rows.values())

    def index(self, shard: str) -> int | None:
        """The shard's position in the plan; None for a shard the plan does not hold (nothing scored)."""
        return self.shards.index(shard) if shard in self.shard_rows else None

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources.describe(), "versions": self.versions, "provenance": self.provenance,
                "shard_rows": self.shard_rows, "columns": list(self.columns), "duplicates": self.duplicates,
                "recipes": self.recipes}

    @property
    def plan_id(self) -> str:
        """A digest of everything above: the same inputs and recipes always plan into the same folder."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, value: dict[str, Any], s3: S3Settings | None = None) -> ReleasePlan:
        return cls(ReleaseSources(**value["sources"], s3=s3), value["versions"], value["provenance"],
                   value["shard_rows"], tuple(value["columns"]), value["duplicates"], value["recipes"])

    def check_recipe(self, recipe: Recipe) -> None:
        if self.recipes.get(recipe.name) != recipe.sha256:
            raise RecipeError(f"recipe {recipe.name!r} (sha256 {recipe.sha256[:12]}) is not in release plan "
                              f"{self.plan_id}: plan the releases again")


def plan_releases(recipes: Sequence[Recipe], sources: ReleaseSources,
                  versions: dict[str, int] | None = None) -> ReleasePlan:
    """Pin the tables (the current versions, after bringing the scores table's shard index up to date,
    unless ``versions`` are given: a derivation or a verification) and refuse, before any pass runs,
    a recipe that names a missing column, needs a NormSim target the scores lack, or needs duplicate
    groups or evaluation sets that are not there."""
    if versions is None:
        index_shards(sources)
        versions = table_versions(sources)
    provenance = score_provenance(sources, versions)
    available = available_columns(sources, versions)
    columns: list[str] = []
    for recipe in recipes:
        recipe.check_columns(available, [name for name in available if name.startswith("iw_")])
        if recipe.needs_target() and provenance["target_id"] is None:
            raise RecipeError(f"recipe {recipe.name!r} uses NormSim but the scores have no NormSim target: "
                              "score with a target first")
        if recipe.needs_duplicates():
            check_duplicate_inputs(recipe, sources, versions)
        columns += [name for name in recipe.scores_used() if name not in columns]
    return ReleasePlan(sources, versions, provenance, shard_rows(sources, versions), tuple(columns),
                       any(recipe.needs_duplicates() for recipe in recipes),
                       {recipe.name: recipe.sha256 for recipe in recipes})


def write_plan(plan: ReleasePlan, folder: PassFolder) -> None:
    """``plan.json`` and, when a recipe deduplicates, the pinned duplicate-group columns (read once here,
    not once per shard)."""
    if plan.duplicates:
        folder.write_table(DUPLICATES, read_duplicate_columns(plan.sources, plan.versions).to_arrow())
    folder.write_json(PLAN, plan.to_json())


def read_plan(folder: PassFolder) -> ReleasePlan:
    return ReleasePlan.from_json(folder.read_json(PLAN), folder.s3)


# -- pass 1 -------------------------------------------------------------------------------------

def candidates_file(index: int) -> str:
    return f"candidates/{index:08d}.parquet"


def write_candidates(plan: ReleasePlan, folder: PassFolder, shard: str) -> int:
    """Pass 1 of one shard: its rows with every planned column (and its duplicate-group columns), by uid."""
    index = plan.index(shard)
    if index is None:
        raise RecipeError(f"shard {shard!r} is not in release plan {plan.plan_id} (it has no scored rows)")
    frame = pool_frame(plan.sources, plan.versions, plan.columns, shard=shard)
    if plan.duplicates:
        duplicates = pl.from_arrow(folder.read_table(DUPLICATES))
        frame = frame.join(duplicates, on=UID, how="left", maintain_order="left")
    if frame.height != plan.shard_rows[shard]:
        raise RuntimeError(f"shard {shard!r} has {frame.height} scored rows, the plan counted "
                           f"{plan.shard_rows[shard]}: its validated samples changed since the plan")
    folder.write_table(candidates_file(index), frame.to_arrow())
    return frame.height


@dataclass(frozen=True)
class CandidateRows:
    """One shard's candidates, loaded by whichever worker runs a pass over it (picklable)."""

    folder: PassFolder
    index: int

    def load(self) -> pl.DataFrame:
        return pl.from_arrow(self.folder.read_table(candidates_file(self.index)))


# -- the global step ----------------------------------------------------------------------------

def recipe_folder(recipe: Recipe) -> str:
    return f"recipes/{recipe.sha256[:16]}"


@dataclass(frozen=True)
class Resolution:
    """A recipe's stages as exact per-row filters, with what the funnel needs of the global tail."""

    filters: list[Policy | Cut | Membership]
    prefix: int  # the recipe's leading stages that ran partition by partition
    bounded: int  # the filters up to and including the size bound (exclusions come after)
    tail_funnel: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    excluded: int


def _pool(plan: ReleasePlan, folder: PassFolder, executor: Executor | None) -> PartitionedPool:
    return PartitionedPool([CandidateRows(folder, index) for index in range(len(plan.shards))], executor)


def resolve_recipe(recipe: Recipe, plan: ReleasePlan, folder: PassFolder, exclude: Sequence[str] = (),
                   executor: Executor | None = None) -> Resolution:
    """The global step of one recipe: ranked and dedup stages of the partitionable prefix become cuts and
    uid sets over the candidates, the global rest runs on the prefix's survivors and becomes the uid set
    it kept, the size bound one more cut, the exclusions a uid set; saved under the recipe's folder."""
    plan.check_recipe(recipe)
    pool = _pool(plan, folder, executor)
    stages = recipe.policies(_embedding_fetcher(plan.sources, plan.versions.get(EMBEDDINGS_TABLE)))
    prefix, rest = split_partitionable(stages)
    filters = pool.resolve(prefix, plan.pool_rows)
    tail_funnel: list[dict[str, Any]] = []
    if rest:
        survivors = pl.concat([frame for _, frame in pool.apply(filters, write=_rows)], how="vertical_relaxed")
        tail = run_selection(survivors.sort(UID), rest, plan.pool_rows)
        kept = survivors.select(UID, SHARD).join(pl.DataFrame({UID: pl.Series(tail.uids, dtype=pl.String)}), on=UID)
        del survivors
        filters.append(Membership(kept[UID], keep=True, shards=kept[SHARD]))
        tail_funnel = [stage._asdict() for stage in tail.funnel[1:]]
    bounded = len(filters)
    if recipe.max_size is not None:
        filters = pool.resolve([TopCount(recipe.rank_by, recipe.max_size)], plan.pool_rows, filters)
        bounded += 1
    if exclude:
        filters.append(Membership(pl.Series(UID, sorted(set(exclude)), dtype=pl.String), keep=False))
    resolution = Resolution(filters, len(prefix), bounded, tail_funnel, [stage.describe() for stage in stages],
                            len(set(exclude)))
    _save_resolution(resolution, prefix, plan, folder, recipe_folder(recipe))
    return resolution


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


def _rows(index: int, rows: pl.DataFrame) -> pl.DataFrame:
    return rows


def _save_resolution(resolution: Resolution, prefix: Sequence[Policy], plan: ReleasePlan, folder: PassFolder,
                     base: str) -> None:
    """JSON and uid parquets only: a row filter is named by its position in the recipe (rebuilt from the
    recipe text, which the plan pins by sha256), a cut by its fields, a uid set by its files: one per
    shard where each uid's shard is known (a shard's pass 2 then reads only its own part), else one."""
    entries: list[dict[str, Any]] = []
    for position, item in enumerate(resolution.filters):
        if position < len(prefix) and item is prefix[position]:
            entries.append({"stage": position})
        elif isinstance(item, Cut):
            entries.append({"cut": asdict(item)})
        elif isinstance(item, Membership) and item.shards is None:
            name = f"{base}/uids_{position:03d}.parquet"
            folder.write_table(name, pa.table({UID: item.uids.to_arrow()}))
            entries.append({"uids": name, "keep": item.keep})
        elif isinstance(item, Membership):
            name = f"{base}/uids_{position:03d}"
            members = pl.DataFrame({UID: item.uids, SHARD: item.shards})
            for (shard,), part in members.partition_by(SHARD, as_dict=True).items():
                folder.write_table(f"{name}/{plan.index(shard):08d}.parquet", part.select(UID).sort(UID).to_arrow())
            entries.append({"uids_by_shard": name, "keep": item.keep})
        else:
            raise TypeError(f"cannot record filter {item!r}")
    folder.write_json(f"{base}/{RESOLUTION}", {
        "filters": entries, "prefix": resolution.prefix, "bounded": resolution.bounded,
        "tail_funnel": resolution.tail_funnel, "policies": resolution.policies, "excluded": resolution.excluded})


def load_resolution(recipe: Recipe, folder: PassFolder, index: int | None = None) -> Resolution:
    """The saved resolution; uid sets saved per shard are read for shard ``index`` only (none without)."""
    saved = folder.read_json(f"{recipe_folder(recipe)}/{RESOLUTION}")
    prefix, _ = split_partitionable(recipe.policies())  # row filters never fetch embeddings
    filters: list[Policy | Cut | Membership] = []
    for entry in saved["filters"]:
        if "stage" in entry:
            filters.append(prefix[entry["stage"]])
        elif "cut" in entry:
            filters.append(Cut(**entry["cut"]))
        else:
            part = entry.get("uids") or (f"{entry['uids_by_shard']}/{index:08d}.parquet" if index is not None else None)
            uids = pl.from_arrow(folder.read_table(part))[UID] if part and folder.exists(part) else pl.Series(UID, [])
            filters.append(Membership(uids.cast(pl.String), keep=entry["keep"]))
    return Resolution(filters, saved["prefix"], saved["bounded"], saved["tail_funnel"], saved["policies"],
                      saved["excluded"])


# -- pass 2 -------------------------------------------------------------------------------------

def selected_file(recipe: Recipe, index: int) -> str:
    return f"{recipe_folder(recipe)}/selected/{index:08d}.parquet"


def counts_file(recipe: Recipe, index: int) -> str:
    return f"{recipe_folder(recipe)}/counts/{index:08d}.json"


@dataclass(frozen=True)
class _WriteSelectedRows:
    """One shard's selected rows (sorted by uid) into the pass folder, in the worker."""

    folder: PassFolder
    recipe: Recipe
    columns: tuple[str, ...]

    def __call__(self, index: int, rows: pl.DataFrame) -> ShardSelection:
        weakest = {name: rows[name].fill_nan(None).min() for name in self.columns[3:]}
        if rows.height or index == 0:  # the first shard's file always exists: it carries the schema
            self.folder.write_table(selected_file(self.recipe, index), rows.select(self.columns).to_arrow())
        return ShardSelection(rows.height, weakest)


def write_selection(recipe: Recipe, plan: ReleasePlan, folder: PassFolder, shard: str) -> ShardSelection:
    """Pass 2 of one shard for one recipe: apply the resolution, write the selected rows and the funnel
    counts (``counts/<index>.json``, written last: its presence says the shard is done)."""
    index = plan.index(shard)
    if index is None:
        raise RecipeError(f"shard {shard!r} is not in release plan {plan.plan_id} (it has no scored rows)")
    resolution = load_resolution(recipe, folder, index)
    columns = ("uid", "shard", "key", *release_columns(recipe))
    counts, written = _apply_and_write(CandidateRows(folder, index), resolution.filters,
                                       _WriteSelectedRows(folder, recipe, columns), index)
    folder.write_json(counts_file(recipe, index), {"counts": counts, "rows": written.rows,
                                                   "weakest": written.weakest})
    return written


# -- the release step ---------------------------------------------------------------------------

def assemble(recipe: Recipe, plan: ReleasePlan, folder: PassFolder) -> Selected:
    """The recipe's selection from its per-shard results: funnel, files, cut-offs; refuses a selection
    below ``min_size`` and a shard whose pass 2 has not run."""
    plan.check_recipe(recipe)
    resolution = load_resolution(recipe, folder)
    missing = [shard for index, shard in enumerate(plan.shards) if not folder.exists(counts_file(recipe, index))]
    if missing:
        raise RecipeError(f"recipe {recipe.name!r}: pass 2 has not run for {len(missing)} shards of plan "
                          f"{plan.plan_id} (first: {missing[0]})")
    counts = np.zeros(len(resolution.filters), dtype=np.int64)
    shards: list[ShardSelection] = []
    for index in range(len(plan.shards)):
        saved = folder.read_json(counts_file(recipe, index))
        counts += np.asarray(saved["counts"], dtype=np.int64)
        shards.append(ShardSelection(saved["rows"], saved["weakest"]))
    prefix_stages, _ = split_partitionable(recipe.policies())
    funnel = [FunnelStage("pool", plan.pool_rows)]
    funnel += [FunnelStage(label(stage.describe()), int(count)) for stage, count in zip(prefix_stages, counts)]
    funnel += [FunnelStage(**stage) for stage in resolution.tail_funnel]
    bound = int(counts[resolution.bounded - 1]) if resolution.bounded else plan.pool_rows
    if bound < recipe.min_size:
        raise RecipeError(f"recipe {recipe.name!r} selects {bound} samples, fewer than min_size {recipe.min_size}")
    count = int(counts[-1]) if len(resolution.filters) else plan.pool_rows
    stages_funnel = [stage._asdict() for stage in funnel]
    if recipe.max_size is not None or resolution.excluded:
        stages_funnel.append({"stage": SIZE_BOUNDS, "rows": count})
    selection = SelectionResult(pa.array([], pa.large_string()), funnel, resolution.policies)
    files = [folder.join(selected_file(recipe, index)) for index, shard in enumerate(shards)
             if shard.rows or index == 0]
    return Selected(selection, stages_funnel, files, count, _cutoffs(shards), plan.shard_rows, folder.s3)


# -- all passes in one call ---------------------------------------------------------------------

def select(recipe: Recipe, sources: ReleaseSources, folder: PassFolder, versions: dict[str, int] | None = None,
           exclude: Sequence[str] = (), executor: Executor | None = None) -> tuple[ReleasePlan, Selected]:
    """Plan, pass 1, resolve, pass 2 and assemble one recipe (``executor`` runs the per-shard steps)."""
    plan = plan_releases([recipe], sources, versions)
    write_plan(plan, folder)
    _each_shard(executor, write_candidates, plan, folder)
    resolve_recipe(recipe, plan, folder, exclude, executor)
    _each_shard(executor, write_selection, recipe, plan, folder)
    return plan, assemble(recipe, plan, folder)


def _each_shard(executor: Executor | None, step: Callable[..., Any], *arguments: Any) -> list[Any]:
    """``step(*arguments, shard)`` for every shard of the plan (``arguments`` holds it: the plan is the
    first or the second), in this process or on ``executor``."""
    plan = next(argument for argument in arguments if isinstance(argument, ReleasePlan))
    if executor is None:
        return [step(*arguments, shard) for shard in plan.shards]
    return list(executor.map(step, *([argument] * len(plan.shards) for argument in arguments), plan.shards))
