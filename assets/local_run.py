"""The main job: the whole asset graph over every shard of a pool, executed in this process.

Steps run in lineage order (teacher and its quality gate; per shard ingestion and embeddings;
reference sample and NormSim target; per shard scores; pool statistics; one release per recipe),
each as a Dagster run recorded in the instance, so ``dagster dev -w workspace.yaml`` afterwards
shows the same history, checks and metadata. A blocking check that fails skips what depends on it
and is reported with its reason; a failed step reports the first error of its run.

:func:`main_job_definitions` wires the graph for one pool from explicit settings (nothing is read
from or written to the environment, and the project's ``curation.json`` is read, never written);
:func:`materialize_graph` registers the pool's shard partitions and runs it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from curation_platform import storage
from curation_platform.layout import ProjectLayout
from curation_platform.processes import in_worker_import
from curation_platform.storage import S3Settings
from curation_platform.teachers import CONFIG_FILE
from curation_platform_dagster.definitions import build_definitions
from curation_platform_dagster.defs.evaluation import IN_MAIN_JOB
from curation_platform_dagster.defs.ingestion import shard_partitions
from curation_platform_dagster.defs.resources import (
    DuplicatesResource,
    EvaluationResource,
    PlatformResource,
    ScoringResource,
    TeacherResource,
)
from curation_platform_dagster.defs.teachers import TEACHER_GATE, no_progress

QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
TEACHER = dg.AssetKey("teacher")
INSTANCE_FOLDER = "dagster"  # under the project home, unless $DAGSTER_HOME says otherwise


@dataclass
class StepOutcome:
    assets: tuple[str, ...]
    partition: str | None
    success: bool
    seconds: float
    materialized: dict[str, dict] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)  # every check evaluated: passed, description, metadata
    error: str | None = None  # the first error of the run, or the first failed blocking check's reason


def instance_for(home: ProjectLayout | str | Path) -> dg.DagsterInstance:
    """The persistent instance of the project: ``$DAGSTER_HOME``, else ``<home>/dagster`` (SQLite)."""
    layout = home if isinstance(home, ProjectLayout) else ProjectLayout.resolve(str(home))
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or layout.tool_home(INSTANCE_FOLDER))
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():  # the embedded default: SQLite storage in this folder, nothing phoned home
        config.write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(dagster_home))


def main_job_definitions(home: str, *, pool: str | None = None, teacher: dict | None = None,
                         scoring: dict | None = None, evaluation: dict | None = None, recipes: str | None = None,
                         training_progress: Callable[[dict], None] | None = None) -> dg.Definitions:
    """The graph for one pool: ``teacher`` and ``scoring`` override the home's ``curation.json``
    sections field by field (``TeacherResource`` / ``ScoringResource`` fields), ``evaluation`` the
    ``EvaluationResource`` ones."""
    settings = ProjectLayout.resolve(home).settings(S3Settings.from_env())
    resources = {
        "platform": PlatformResource(home_uri=home, pool_uri=pool, recipes_uri=recipes),
        "teacher_config": TeacherResource(**(settings.get("teacher", {}) | (teacher or {}))),
        "scoring": ScoringResource(**(settings.get("scoring", {}) | (scoring or {}))),
        "evaluation": EvaluationResource(**(settings.get("evaluation", {}) | (evaluation or {}))),
        "duplicates": DuplicatesResource(**settings.get("duplicates", {})),
        "training_progress": training_progress or no_progress,
    }
    return build_definitions(settings, resources)


def materialize_graph(instance: dg.DagsterInstance, defs: dg.Definitions | None = None,
                      on_step: Callable[[StepOutcome], None] | None = None,
                      retrain_teacher: bool = False) -> list[StepOutcome]:
    """Discover the pool's shards, add their partitions and materialise every asset with its checks.

    A platform-trained teacher already materialised from the same split and training config is
    kept (its quality gate is evaluated again) unless ``retrain_teacher``; training is
    deterministic, so it would reproduce the same teacher_id. A failed global step (the teacher,
    its gate, the reference) ends the job: everything after it depends on it. Called at the top
    level of a script without a ``__main__`` guard, it does nothing in the worker processes that
    re-import the script (:func:`~curation_platform.processes.in_worker_import`).
    """
    if in_worker_import():  # a worker re-importing an unguarded script: the parent runs the job
        return []
    defs = defs or build_definitions()
    platform: PlatformResource = defs.resources["platform"]
    teacher_config: TeacherResource = defs.resources["teacher_config"]
    keys = [shard.partition_key for shard in platform.discover()]
    if not keys:
        raise dg.DagsterInvariantViolationError(f"no shards found in the pool {platform.pool}")
    new_keys = [key for key in keys if not instance.has_dynamic_partition(shard_partitions.name, key)]
    if new_keys:
        instance.add_dynamic_partitions(shard_partitions.name, new_keys)
    keep_teacher = not retrain_teacher and _teacher_is_current(instance, platform, teacher_config)
    outcomes: list[StepOutcome] = []
    skipped: set[str] = set()
    owners = job_owners(defs)
    for wave in lineage_waves(defs):
        partitions = keys if wave.per_shard else [None]
        for job, names in _by_job(wave.assets, owners):
            assets = [name for name in names if not (keep_teacher and name == TEACHER.to_user_string())]
            checks = [dg.AssetCheckKey(TEACHER, TEACHER_GATE)] if len(assets) < len(names) else []
            for partition in partitions:
                if partition in skipped:
                    continue
                outcome = _execute(defs, instance, job, assets, checks, partition)
                outcomes.append(outcome)
                if on_step:
                    on_step(outcome)
                if not outcome.success and partition is None:
                    return outcomes  # everything after a global step depends on it
                if not outcome.success:
                    skipped.add(partition)
    return outcomes


def job_owners(defs: dg.Definitions) -> dict[str, str]:
    """Each asset's named job (the first that selects it), so the runs list says what each run did."""
    owners: dict[str, str] = {}
    for job in defs.jobs or []:
        for key in defs.resolve_job_def(job.name).asset_layer.selected_asset_keys:
            owners.setdefault(key.to_user_string(), job.name)
    return owners


def _by_job(assets: tuple[str, ...], owners: dict[str, str]) -> list[tuple[str, list[str]]]:
    """A wave's assets as one run per job, in the order the jobs first appear (all are ready together)."""
    groups: dict[str, list[str]] = {}
    for name in assets:
        if name not in owners:
            raise dg.DagsterInvariantViolationError(f"asset {name} belongs to no job: add it to one in definitions.py")
        groups.setdefault(owners[name], []).append(name)
    return list(groups.items())


@dataclass(frozen=True)
class Wave:
    """Assets the main job materialises in one run (per shard, when ``per_shard``), in lineage order."""

    assets: tuple[str, ...]
    per_shard: bool


def lineage_waves(defs: dg.Definitions) -> list[Wave]:
    """The asset graph cut into runs, each after everything upstream of it: every unpartitioned asset
    whose inputs are done runs in one global run, then every shard's partitioned assets that become
    ready run together in one run per shard. A new asset finds its place from its deps alone. Assets
    tagged ``curation/main_job: false`` (evaluations not chosen for the main job) are left to the UI."""
    graph = defs.resolve_asset_graph()
    keys = sorted(key for key in graph.materializable_asset_keys
                  if graph.get(key).tags.get(IN_MAIN_JOB, "true") != "false")
    upstream = {key: set(graph.get(key).parent_keys) & set(keys) for key in keys}
    per_shard = {key: graph.get(key).is_partitioned for key in keys}
    done: set[dg.AssetKey] = set()
    waves: list[Wave] = []
    while len(done) < len(keys):
        ready = [key for key in keys if key not in done and not per_shard[key] and upstream[key] <= done]
        done |= set(ready)
        chain: list[dg.AssetKey] = []
        while grown := [key for key in keys if key not in done and per_shard[key] and upstream[key] <= done]:
            chain += grown
            done |= set(grown)
        if not ready and not chain:
            raise dg.DagsterInvariantViolationError(f"assets {sorted(set(keys) - done)} can never be ready")
        waves += [Wave(tuple(key.to_user_string() for key in group), partitioned)
                  for group, partitioned in ((ready, False), (chain, True)) if group]
    return waves


def _teacher_is_current(instance: dg.DagsterInstance, platform: PlatformResource,
                        teacher_config: TeacherResource) -> bool:
    """A kept teacher must be the platform's own, trained on the split and with the config asked for now."""
    event = instance.get_latest_materialization_event(TEACHER)
    if event is None or event.asset_materialization is None or not teacher_config.trains_its_own:
        return False
    metadata = {name: value.value for name, value in event.asset_materialization.metadata.items()}
    asked = json.loads(json.dumps(teacher_config.training_config().resolved().to_dict()))  # as the metadata holds it
    return (metadata.get("train_on") == teacher_config.trusted_split(platform)
            and metadata.get("training_config") == asked
            and storage.exists(storage.join(platform.trained_teacher_uri, CONFIG_FILE), platform.s3))


def _execute(defs: dg.Definitions, instance: dg.DagsterInstance, job: str, assets: list[str],
             checks: list[dg.AssetCheckKey], partition: str | None) -> StepOutcome:
    """One run of ``job``: ``assets`` with their checks, plus ``checks`` alone (a kept asset's checks)."""
    started = time.perf_counter()
    keys = {dg.AssetKey.from_user_string(name) for name in assets}
    resolved = defs.resolve_job_def(job)
    with_checks = {key for key in defs.resolve_asset_graph().asset_check_keys if key.asset_key in keys}
    subset = resolved.get_subset(asset_selection=keys, asset_check_selection=with_checks | set(checks))
    result = subset.execute_in_process(run_config=QUIET, instance=instance, partition_key=partition,
                                       raise_on_error=False, tags={"curation/main_job": "true"})
    materialized = {
        event.asset_key.to_user_string(): {name: value.value for name, value in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }
    evaluated = {
        evaluation.asset_check_key.to_user_string(): {
            "passed": evaluation.passed, "severity": evaluation.severity.value, "description": evaluation.description,
            "metadata": {name: value.value for name, value in evaluation.metadata.items()},
        }
        for evaluation in result.get_asset_check_evaluations()
    }
    failed = [name for name, check in evaluated.items() if not check["passed"] and check["severity"] == "ERROR"]
    success = result.success and not failed and len(materialized) == len(assets)
    error = _first_error(result) or next((f"{name}: {evaluated[name]['description'] or 'failed'}" for name in failed),
                                         None)
    if not success and error is None:
        error = "the run did not materialise every selected asset (see the run in the Dagster UI)"
    names = (*assets, *(check.to_user_string() for check in checks))
    return StepOutcome(names, partition, success, time.perf_counter() - started, materialized, failed, evaluated,
                       None if success else error)


def _first_error(result: dg.ExecuteInProcessResult) -> str | None:
    """The first step failure's message, without Dagster's wrapper (a ``Failure``'s own text, or the
    user code's exception)."""
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if error is None:
            continue
        if error.cls_name == "Failure":
            return error.message.split(": ", 1)[-1].strip()
        cause = error.cause or error
        return f"{event.step_key}: {cause.message.strip()}"
    return None
