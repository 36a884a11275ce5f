"""The teacher: trained by the platform on the trusted split, or a configured model, and its quality gate."""

from collections.abc import Callable
from typing import Any

import dagster as dg

from curation_platform.teacher_quality import judge_teacher
from curation_platform.teachers import load_teacher
from curation_platform.training import TrainingTimeLimitExceeded, train_teacher
from curation_platform_dagster.defs.automation import once_available
from curation_platform_dagster.defs.resources import PlatformResource, TeacherResource
from curation_platform_dagster.defs.sources import reference_split

TrainingProgress = Callable[[dict], None]
LOGGED_STAGES = ("data", "epoch", "saved")


def no_progress(event: dict) -> None:
    """The default ``training_progress`` resource: step events only reach the run log (as epochs)."""


@dg.asset(
    deps=[reference_split],
    group_name="teacher",
    code_version="teacher-v2",
    kinds={"pytorch"},
    automation_condition=once_available(),
    description="The CLIP-like teacher whose logits estimate density ratios; its teacher_id tags every embedding.",
)
def teacher(context: dg.AssetExecutionContext, platform: PlatformResource, teacher_config: TeacherResource,
            training_progress: dg.ResourceParam[TrainingProgress]) -> dg.MaterializeResult:
    metadata: dict = {}
    if teacher_config.trains_its_own:
        split = teacher_config.trusted_split(platform)
        if split == platform.pool:
            context.log.warning(f"no trusted split configured: training the teacher on the pool itself ({split}); "
                                "its noisy pairs lower the teacher's quality (see README, 'Teachers')")

        def progress(event: dict) -> None:
            if event["stage"] in LOGGED_STAGES:
                context.log.info(str(event))
            training_progress(event)

        config = teacher_config.training_config()
        try:
            report = train_teacher(split, platform.trained_teacher_uri, config, progress=progress, s3=platform.s3)
        except TrainingTimeLimitExceeded as error:
            raise dg.Failure(str(error)) from error
        held_out = report.held_out
        metadata |= {
            "train_on": split,
            "training_config": dg.MetadataValue.json(report.config),
            "precision": report.precision,
            "cpu_capability": report.cpu["cpu_capability"],
            "steps": report.steps,
            "samples_train": report.samples_train,
            "samples_held_out": report.samples_held_out,
            "i2t_recall_at_1": dg.MetadataValue.float(held_out.i2t_recall_at_1),
            "i2t_recall_at_5": dg.MetadataValue.float(held_out.i2t_recall_at_5),
            "t2i_recall_at_1": dg.MetadataValue.float(held_out.t2i_recall_at_1),
            "t2i_recall_at_5": dg.MetadataValue.float(held_out.t2i_recall_at_5),
            "chance_at_1": dg.MetadataValue.float(held_out.chance_at_1),
            "chance_at_5": dg.MetadataValue.float(held_out.chance_at_5),
            "training_seconds": dg.MetadataValue.float(report.seconds_total),
            "loss_curve": dg.MetadataValue.json([epoch.train_loss for epoch in report.curve]),
        }
    loaded = load_teacher(teacher_config.spec(platform), s3=platform.s3)
    description = loaded.describe()
    metadata |= {
        "teacher_id": loaded.teacher_id,
        "source": description["source"],
        "embed_dim": loaded.embed_dim,
        "logit_scale": dg.MetadataValue.float(loaded.logit_scale),
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": dg.MetadataValue.json(description["preprocessing"]),
    }
    return dg.MaterializeResult(data_version=dg.DataVersion(loaded.teacher_id), metadata=metadata)


def latest_metadata(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, asset: dg.AssetsDefinition,
                    key: str) -> Any:
    """A metadata value of ``asset``'s latest materialisation (None when it has none by that key)."""
    event = context.instance.get_latest_materialization_event(asset.key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"{asset.key.to_user_string()} has not been materialised yet")
    value = event.asset_materialization.metadata.get(key)
    return None if value is None else value.value


def teacher_id_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> str:
    """The teacher_id the ``teacher`` asset recorded: no need to load the weights just to name them."""
    return latest_metadata(context, teacher, "teacher_id")


def embed_dim_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The embedding dimension the ``teacher`` asset recorded: checks size embeddings without loading weights."""
    return latest_metadata(context, teacher, "embed_dim")


TEACHER_GATE = "teacher_beats_the_bar"


def teacher_gate(blocking: bool = True) -> dg.AssetChecksDefinition:
    """The quality gate on ``teacher``; with ``gate = "warn"`` it is built non-blocking (a WARN that
    neither stops the run nor holds automation back), since whether a check blocks is part of its definition."""

    @dg.asset_check(asset=teacher, name=TEACHER_GATE, blocking=blocking,
                    description="On held-out pairs of the trusted split the teacher finds each image's caption and each "
                                "caption's image (recall@1 and @5) at least min_chance_multiple times as often as "
                                "chance, with recall@5 at least min_recall_at_5 both ways: a teacher below the bar "
                                "never embeds or scores the pool.")
    def teacher_beats_the_bar(platform: PlatformResource, teacher_config: TeacherResource) -> dg.AssetCheckResult:
        loaded = load_teacher(teacher_config.spec(platform), s3=platform.s3)
        verdict = judge_teacher(loaded, teacher_config.trusted_split(platform), teacher_config.bar(), s3=platform.s3)
        metrics = verdict.metrics
        return dg.AssetCheckResult(
            passed=verdict.passed,
            severity=dg.AssetCheckSeverity.ERROR if teacher_config.blocks else dg.AssetCheckSeverity.WARN,
            description=verdict.summary if verdict.passed else f"{verdict.summary}: {verdict.advice}",
            metadata={
                "teacher_id": verdict.teacher_id,
                "split": verdict.split_uri,
                "evidence": verdict.evidence,
                "held_out_pairs": metrics.samples,
                **{name: dg.MetadataValue.float(getattr(metrics, name)) for name in (
                    "i2t_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_1", "t2i_recall_at_5",
                    "chance_at_1", "chance_at_5")},
                "min_recall_at_5": dg.MetadataValue.float(verdict.bar.min_recall_at_5),
                "min_chance_multiple": dg.MetadataValue.float(verdict.bar.min_chance_multiple),
                "shortfalls": dg.MetadataValue.json(verdict.shortfalls),
                "gate": teacher_config.gate,
            },
        )

    return teacher_beats_the_bar


def require_passed_gate(context: dg.AssetExecutionContext, teacher_config: TeacherResource, teacher_id: str) -> None:
    """Refuse to embed with a teacher whose latest gate evaluation is missing, failed or for another teacher
    (automation already waits for the blocking check; this also covers a hand-started run)."""
    if not teacher_config.blocks:
        return
    key = dg.AssetCheckKey(teacher.key, TEACHER_GATE)
    record = context.instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    evaluation = record.evaluation if record is not None else None
    judged = evaluation.metadata.get("teacher_id") if evaluation is not None else None
    if evaluation is None or judged is None or judged.value != teacher_id:
        raise dg.Failure(f"teacher {teacher_id} has no quality-gate result: materialise `teacher` with its check "
                         f"{TEACHER_GATE} first")
    if not evaluation.passed:
        raise dg.Failure(f"teacher {teacher_id} failed its quality gate: {evaluation.description}")
