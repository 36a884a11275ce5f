"""Resources: where the pool and the project's outputs live, which teacher, how to score.

Every field falls back to an environment variable and then to the embedded default (local folders
under one project home), so the same code location serves a laptop and a production deployment.
S3 credentials come only from the standard ``AWS_*`` environment variables, never from config.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import dagster as dg

from curation_platform import storage
from curation_platform.dedup import DEFAULT_EPS
from curation_platform.dedup.contamination import EvaluationSet
from curation_platform.dedup.index import NearSearch
from curation_platform.embedding.engine import EmbedConfig
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE
from curation_platform.evaluation.scales import EvalScale, get_scale
from curation_platform.ingest import read_shard_ref
from curation_platform.layout import ProjectLayout
from curation_platform.pool import (
    ChecksumCache,
    ShardRef,
    discover_shards,
    machine_checksum_cache,
    pool_exists,
    shard_file_uri,
)
from curation_platform.scoring.pipeline import ScoreParams
from curation_platform.scoring.statistics import STATISTICS_MAX_ROWS
from curation_platform.storage import S3Settings
from curation_platform.teacher_quality import GATE_MODES, TeacherBar
from curation_platform.teachers import TeacherSpec
from curation_platform.training import TrainingConfig
from curation_platform.validation import ValidationLimits

PROFILES = ("local", "production")


def profile() -> str:
    """``$CURATION_PROFILE``: ``local`` (the embedded default) or ``production`` (everything on S3)."""
    name = os.environ.get("CURATION_PROFILE", "local")
    if name not in PROFILES:
        raise ValueError(f"CURATION_PROFILE must be one of {PROFILES}, got {name!r}")
    return name


class PlatformResource(dg.ConfigurableResource):
    """The pool to curate and the project home: every location comes from :attr:`layout`
    (:class:`~curation_platform.layout.ProjectLayout`: these fields, then ``CURATION_*``, then the
    folders under the home)."""

    home_uri: str | None = None
    pool_uri: str | None = None
    lancedb: str | None = None
    recipes_uri: str | None = None
    decode_workers: int = 2
    min_image_side: int = ValidationLimits.min_image_side
    max_pixels: int = ValidationLimits.max_pixels
    max_caption_chars: int = ValidationLimits.max_caption_chars
    max_quarantine_rate: float = 0.25

    @property
    def layout(self) -> ProjectLayout:
        return ProjectLayout.resolve(self.home_uri, pool=self.pool_uri, lancedb=self.lancedb, recipes=self.recipes_uri)

    @property
    def home(self) -> str:
        return self.layout.home

    def check_profile(self) -> None:
        """In production every location is on S3: a local default there would strand data on one worker."""
        if profile() != "production":
            return
        layout = self.layout
        local = {name: uri for name, uri in (("CURATION_HOME", layout.home), ("CURATION_POOL", layout.pool),
                                              ("CURATION_LANCEDB", layout.lancedb)) if storage.is_local(uri)}
        if local:
            raise dg.Failure(f"CURATION_PROFILE=production needs remote locations (s3://, gs://, az://, ...); "
                             f"local: {local}")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check_profile()

    @property
    def pool(self) -> str:
        return self.layout.pool

    @property
    def validated_uri(self) -> str:
        return self.layout.validated

    @property
    def lancedb_uri(self) -> str:
        return self.layout.lancedb

    @property
    def releases_uri(self) -> str:
        return self.layout.releases

    @property
    def recipes_dir(self) -> Path:
        return self.layout.recipes

    @property
    def analysis_uri(self) -> str:
        return self.layout.analysis

    @property
    def trained_teacher_uri(self) -> str:
        return self.layout.teacher

    @property
    def s3(self) -> S3Settings:
        return S3Settings.from_env()

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            min_image_side=self.min_image_side, max_pixels=self.max_pixels, max_caption_chars=self.max_caption_chars
        )

    def discover(self) -> list[ShardRef]:
        if not pool_exists(self.pool, self.s3):
            return []
        return discover_shards(self.pool, s3=self.s3, checksum_cache=self._checksum_cache())

    def _checksum_cache(self) -> ChecksumCache:
        """The home's cache; an ``s3://`` home's is on this machine (see ``machine_checksum_cache``)."""
        return ChecksumCache(self.layout.checksum_cache or machine_checksum_cache())

    def shard(self, partition_key: str) -> ShardRef:
        """The shard behind a partition, resolved from the pool (listed, hashed unless cached): for ingestion
        and discovery only; later steps read :meth:`recorded_shard`. Addressed directly, scanning the pool
        only for odd names."""
        for suffix in (".tar", ".parquet"):
            try:
                uri = shard_file_uri(self.pool, partition_key, suffix)
            except FileNotFoundError:
                continue
            if storage.exists(uri, self.s3):
                return discover_shards(uri, s3=self.s3, checksum_cache=self._checksum_cache())[0]
        for shard in self.discover():
            if shard.partition_key == partition_key:
                return shard
        raise dg.Failure(f"shard {partition_key!r} is no longer in the pool {self.pool}")

    def recorded_shard(self, partition_key: str) -> ShardRef:
        """The shard as ``validated_samples`` recorded it: nothing listed or hashed again, and the checksum
        (data versions) is the one the samples were validated from. A report from before reports recorded
        files falls back to the pool."""
        try:
            recorded = read_shard_ref(self.validated_uri, partition_key, self.s3)
        except FileNotFoundError as error:
            raise dg.Failure(f"{error}: materialise validated_samples first") from error
        return recorded or self.shard(partition_key)


class TeacherResource(dg.ConfigurableResource):
    """Which teacher embeds the pool: a checkpoint/teacher directory, or an open_clip tag.

    Falls back to ``$CURATION_TEACHER`` (checkpoint), ``$CURATION_TEACHER_ARCH`` and
    ``$CURATION_TEACHER_PRETRAINED``; with none of them set the platform trains its own teacher
    (the ``teacher`` asset) on the trusted split and uses it. The trusted split is ``train_on``
    (``$CURATION_TEACHER_TRAIN_ON``), else the demo's reference split when the home has one, else
    the pool itself. The quality gate (``min_recall_at_5``, ``gate``: ``block`` or ``warn``) judges
    every teacher on held-out pairs of that split before it may embed anything.
    """

    checkpoint: str | None = None
    architecture: str | None = None
    pretrained: str | None = None
    train_on: str | None = None
    epochs: int = TrainingConfig.epochs
    precision: str = TrainingConfig.precision
    threads: int = TrainingConfig.threads
    max_training_seconds: float | None = TrainingConfig.max_seconds
    min_recall_at_5: float = TeacherBar.min_recall_at_5
    min_chance_multiple: float = TeacherBar.min_chance_multiple
    gate: str = "block"
    device: str = EmbedConfig.device
    batch_size: int = EmbedConfig.batch_size
    workers: int = EmbedConfig.workers
    table: str = EMBEDDINGS_TABLE

    def trusted_split(self, platform: PlatformResource) -> str:
        """Where the teacher learns (or, for a given teacher, is judged): see the class docstring."""
        layout = platform.layout
        return replace(layout, reference_override=self.train_on or layout.reference_override).reference_split(platform.s3)

    def training_config(self) -> TrainingConfig:
        return TrainingConfig(epochs=self.epochs, precision=self.precision, threads=self.threads,
                              max_seconds=self.max_training_seconds)

    def bar(self) -> TeacherBar:
        return TeacherBar(min_recall_at_5=self.min_recall_at_5, min_chance_multiple=self.min_chance_multiple)

    @property
    def blocks(self) -> bool:
        if self.gate not in GATE_MODES:
            raise dg.Failure(f"teacher gate must be one of {GATE_MODES}, got {self.gate!r}")
        return self.gate == "block"

    @property
    def resolved(self) -> tuple[str | None, str | None, str | None]:
        env = os.environ.get
        return (self.checkpoint or env("CURATION_TEACHER"), self.architecture or env("CURATION_TEACHER_ARCH"),
                self.pretrained or env("CURATION_TEACHER_PRETRAINED"))

    @property
    def trains_its_own(self) -> bool:
        checkpoint, _, pretrained = self.resolved
        return not (checkpoint or pretrained)

    def spec(self, platform: PlatformResource) -> TeacherSpec:
        if self.trains_its_own:
            return TeacherSpec(checkpoint=platform.trained_teacher_uri)
        checkpoint, architecture, pretrained = self.resolved
        return TeacherSpec(architecture=architecture, pretrained=pretrained, checkpoint=checkpoint)

    def embed_config(self) -> EmbedConfig:
        return EmbedConfig(device=os.environ.get("CURATION_DEVICE", self.device), batch_size=self.batch_size,
                           workers=self.workers)


class ScoringResource(dg.ConfigurableResource):
    """Score parameters (SCORES.md defaults) and the NormSim target.

    ``target_uri`` is a folder of images or webdataset shards (local or s3://); when unset, the
    demo's target split under the home is used if present, else NormSim columns stay NaN.
    """

    reference_size: int = ScoreParams.reference_size
    reference_seed: int = ScoreParams.reference_seed
    neg_clip_batch_size: int = ScoreParams.neg_clip_batch_size
    neg_clip_repeats: int = ScoreParams.neg_clip_repeats
    neg_clip_seed: int = ScoreParams.neg_clip_seed
    importance_scale: float = ScoreParams.importance_scale
    prompts: list[str] = []
    target_uri: str | None = None
    statistics_max_rows: int = STATISTICS_MAX_ROWS

    def params(self) -> ScoreParams:
        return ScoreParams(
            reference_size=self.reference_size, reference_seed=self.reference_seed,
            neg_clip_batch_size=self.neg_clip_batch_size, neg_clip_repeats=self.neg_clip_repeats,
            neg_clip_seed=self.neg_clip_seed, importance_scale=self.importance_scale, prompts=tuple(self.prompts),
        )

    def target(self, platform: PlatformResource) -> str | None:
        layout = platform.layout
        return replace(layout, target_override=self.target_uri or layout.target_override).target(platform.s3)


class EvaluationResource(dg.ConfigurableResource):
    """How releases are evaluated (``curation.json`` ``{"evaluation": {...}}``): the scale (``demo`` on CPU;
    ``small`` / ``medium`` are DataComp's GPU recipes), seeds per arm (default: the scale's), baselines,
    the benchmarks (a folder of clip_benchmark webdatasets; default the demo's eval split), and which
    recipes the main job evaluates (``main_job``; every recipe has an evaluation asset in the UI)."""

    scale: str = "demo"
    seeds: int | None = None
    baselines: list[str] = ["random", "pool"]
    benchmarks_uri: str | None = None
    device: str | None = None
    main_job: list[str] = []

    def eval_scale(self) -> EvalScale:
        try:
            return get_scale(self.scale)
        except ValueError as error:
            raise dg.Failure(str(error)) from error

    def seed_list(self) -> list[int]:
        return list(range(self.seeds if self.seeds is not None else self.eval_scale().seeds))


class DuplicatesResource(dg.ConfigurableResource):
    """How duplicates are found (``curation.json`` ``{"duplicates": {...}}``): ``eps`` (near duplicates have
    image cosine >= 1 - eps), the vector index's search settings, and the evaluation sets decontamination
    checks (name -> location; default: the demo's eval split as ``demo-eval`` when the home has one), with
    ``decontamination_eps`` (default ``eps``): removing an evaluation copy matters more than keeping a
    look-alike, so it is often looser."""

    @property
    def contamination_eps(self) -> float:
        return self.eps if self.decontamination_eps is None else self.decontamination_eps

    eps: float = DEFAULT_EPS
    decontamination_eps: float | None = None  # the same definition with its own threshold; default eps
    neighbours: int = NearSearch.neighbours
    nprobes: int = NearSearch.nprobes
    min_index_rows: int = NearSearch.min_index_rows
    index_type: str = NearSearch.index_type
    evaluation_sets: dict[str, str] = {}

    def search(self) -> NearSearch:
        try:
            return NearSearch(eps=self.eps, neighbours=self.neighbours, nprobes=self.nprobes,
                              min_index_rows=self.min_index_rows, index_type=self.index_type)
        except ValueError as error:
            raise dg.Failure(f"duplicates settings: {error}") from error

    def sets(self, platform: PlatformResource) -> list[EvaluationSet]:
        registered = platform.layout.evaluation_sets(self.evaluation_sets, platform.s3)
        return [EvaluationSet(name, uri) for name, uri in sorted(registered.items())]
