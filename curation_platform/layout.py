"""Where a project's files live: every path under a project home, and every override of one.

A *project home* (local folder or ``s3://`` prefix) holds everything the platform writes for one
pool. :class:`ProjectLayout` is the only place that joins paths to a home; the resources of the
code location, the CLI, ingestion and releases all ask it. Overrides come from explicit arguments
first, then from ``CURATION_*`` environment variables (read once, in :meth:`ProjectLayout.resolve`),
then from the embedded default (folders under the home; the demo's splits under ``<home>/demo``).

=====================  ==========================================  ===========================
path                   what it holds                               override
=====================  ==========================================  ===========================
``curation.json``      per-project settings (teacher, scoring)     --
``validated/``         per-shard samples, quarantine and reports   --
``lancedb/``           embeddings, scores, reference, target       ``CURATION_LANCEDB``
``releases/``          immutable releases ``name/version/``        --
``recipes/``           release recipes (local: reviewed as code)   ``CURATION_RECIPES``
``analysis/``          pool score statistics and plots             --
``evaluations/``       evaluation records, run cache, leaderboard  --
``teacher/``           the platform-trained teacher                --
``state/``             caches (shard checksums)                    --
``<tool>/``            an orchestrator's run records               --
``demo/``              the demo's pool, reference, target, eval    --
pool                   the shards to curate (default demo/pool)    ``CURATION_POOL``
trusted split          where the teacher learns (demo/reference,   ``CURATION_TEACHER_TRAIN_ON``
                       else the pool)
NormSim target         target images (demo/target, else none)      ``CURATION_TARGET``
=====================  ==========================================  ===========================
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from curation_platform import storage
from curation_platform.pool import partition_key_for
from curation_platform.storage import S3Settings

DEFAULT_HOME = "curation_home"
SETTINGS_FILE = "curation.json"
GROUND_TRUTH_FILE = "ground_truth.parquet"
DEMO_SPLITS = ("pool", "reference", "target", "eval")  # never reorder: an index seeds its random streams
DEMO_EVALUATION_SET = "demo-eval"  # the name decontamination gives the demo's eval split


@dataclass(frozen=True)
class ShardOutputs:
    """The files ingestion writes for one shard under a validated-samples root (named by partition key,
    so re-ingesting a shard overwrites exactly its files)."""

    samples: str
    quarantine: str
    report: str

    @classmethod
    def of(cls, validated_uri: str, shard_name: str) -> ShardOutputs:
        name = partition_key_for(shard_name)
        return cls(samples=storage.join(validated_uri, "samples", f"{name}.parquet"),
                   quarantine=storage.join(validated_uri, "quarantine", f"{name}.parquet"),
                   report=storage.join(validated_uri, "reports", f"{name}.json"))

    def files(self) -> dict[str, str]:
        """File kind (``samples``, ``quarantine``, ``report``) -> URI."""
        return {"samples": self.samples, "quarantine": self.quarantine, "report": self.report}

    @staticmethod
    def samples_root(validated_uri: str) -> str:
        """The folder holding every shard's accepted samples (one parquet dataset)."""
        return storage.join(validated_uri, "samples")

    @staticmethod
    def uid_registry(validated_uri: str) -> str:
        """The LanceDB database recording which shards hold each accepted uid (see uid_registry)."""
        return storage.join(validated_uri, "uids")


@dataclass(frozen=True)
class ProjectLayout:
    """Every location of one project; ``None`` overrides mean the default under :attr:`home`."""

    home: str
    pool_override: str | None = None
    lancedb_override: str | None = None
    recipes_override: str | None = None
    reference_override: str | None = None
    target_override: str | None = None

    @classmethod
    def resolve(cls, home: str | None = None, *, pool: str | None = None, lancedb: str | None = None,
                recipes: str | None = None, reference: str | None = None, target: str | None = None,
                environ: Mapping[str, str] | None = None) -> ProjectLayout:
        """Arguments first, then ``CURATION_HOME`` / ``_POOL`` / ``_LANCEDB`` / ``_RECIPES`` /
        ``_TEACHER_TRAIN_ON`` / ``_TARGET``, then the defaults; a local home becomes absolute."""
        env = os.environ if environ is None else environ
        return cls(home=storage.absolute(home or env.get("CURATION_HOME") or DEFAULT_HOME),
                   pool_override=pool or env.get("CURATION_POOL"),
                   lancedb_override=lancedb or env.get("CURATION_LANCEDB"),
                   recipes_override=recipes or env.get("CURATION_RECIPES"),
                   reference_override=reference or env.get("CURATION_TEACHER_TRAIN_ON"),
                   target_override=target or env.get("CURATION_TARGET"))

    def _under(self, *parts: str) -> str:
        return storage.join(self.home, *parts)

    @property
    def settings_file(self) -> str:
        return self._under(SETTINGS_FILE)

    def settings(self, s3: S3Settings | None = None) -> dict:
        """``curation.json`` if the home has one (per-project teacher and scoring defaults), else ``{}``."""
        return json.loads(storage.read_bytes(self.settings_file, s3)) if storage.exists(self.settings_file, s3) else {}

    @property
    def validated(self) -> str:
        return self._under("validated")

    def shard_outputs(self, shard_name: str) -> ShardOutputs:
        return ShardOutputs.of(self.validated, shard_name)

    @property
    def lancedb(self) -> str:
        return self.lancedb_override or self._under("lancedb")

    @property
    def releases(self) -> str:
        return self._under("releases")

    @property
    def recipes(self) -> Path:
        """Release recipes: local files, because they are code and reviewed like code."""
        return Path(self.recipes_override or self._under("recipes"))

    @property
    def analysis(self) -> str:
        return self._under("analysis")

    @property
    def evaluations(self) -> str:
        """Evaluation records (``<release_id>/<version>/``), the run cache, benchmarks and the leaderboard."""
        return self._under("evaluations")

    @property
    def teacher(self) -> str:
        """Where the platform writes the teacher it trains."""
        return self._under("teacher")

    @property
    def state(self) -> str:
        return self._under("state")

    @property
    def exact_duplicates(self) -> str:
        """The exact-duplicate index: one hash file per shard (:class:`curation_platform.dedup.ExactDuplicateIndex`)."""
        return self._under("duplicates", "exact")

    def evaluation_sets(self, registered: dict[str, str], s3: S3Settings | None = None) -> dict[str, str]:
        """The evaluation sets decontamination checks (name -> location): the registered ones, else the
        demo's eval split (as ``demo-eval``) when the home has one, else none."""
        if registered:
            return dict(registered)
        demo_eval = self.demo_split("eval")
        return {DEMO_EVALUATION_SET: demo_eval} if storage.exists(demo_eval, s3) else {}

    @property
    def checksum_cache(self) -> Path | None:
        """The shard-checksum cache of a local home (SQLite); a remote home (``s3://``, ``gs://``, ...) uses one
        per machine (:func:`curation_platform.pool.machine_checksum_cache`)."""
        return Path(self.state, "checksums.sqlite") if storage.is_local(self.home) else None

    def folders(self) -> dict[str, str]:
        """Every fixed entry of the home (name -> URI), as the README's layout table lists them (with the
        code location's :meth:`tool_home`)."""
        return {"curation.json": self.settings_file, "validated/": self.validated, "lancedb/": self._under("lancedb"),
                "releases/": self.releases, "recipes/": self._under("recipes"), "analysis/": self.analysis,
                "evaluations/": self.evaluations, "duplicates/": self._under("duplicates"),
                "teacher/": self.teacher, "state/": self.state, "demo/": self.demo}

    def tool_home(self, tool: str) -> str:
        """A folder for an orchestration tool's own records (the code location keeps its run history here)."""
        return self._under(tool)

    @property
    def demo(self) -> str:
        return self._under("demo")

    def demo_split(self, split: str) -> str:
        if split not in DEMO_SPLITS:
            raise ValueError(f"demo splits are {DEMO_SPLITS}, got {split!r}")
        return storage.join(self.demo, split)

    @property
    def demo_ground_truth(self) -> str:
        """What every demo row really is: for reports only, selection never reads it."""
        return storage.join(self.demo, GROUND_TRUTH_FILE)

    @property
    def pool(self) -> str:
        return self.pool_override or self.demo_split("pool")

    def reference_split(self, s3: S3Settings | None = None) -> str:
        """The trusted split a teacher learns on (or is judged on): the override, else the demo's
        reference split when the home has one, else the pool itself."""
        if self.reference_override:
            return self.reference_override
        demo_reference = self.demo_split("reference")
        return demo_reference if storage.exists(demo_reference, s3) else self.pool

    def target(self, s3: S3Settings | None = None) -> str | None:
        """The NormSim target: the override, else the demo's target split when present, else none."""
        if self.target_override:
            return self.target_override
        demo_target = self.demo_split("target")
        return demo_target if storage.exists(demo_target, s3) else None
