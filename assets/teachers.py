"""The teacher: trained by the platform on the trusted reference split, or a configured model."""

import dagster as dg

from assets.automation import once_available
from assets.resources import PlatformResource, TeacherResource
from curation_platform.teachers import load_teacher
from curation_platform.training import TrainingConfig, train_teacher


@dg.asset(
    group_name="teacher",
    code_version="teacher-v1",
    kinds={"pytorch"},
    automation_condition=once_available(),
    description="The CLIP-like teacher whose logits estimate density ratios; its teacher_id tags every embedding.",
)
def teacher(context: dg.AssetExecutionContext, platform: PlatformResource,
            teacher_config: TeacherResource) -> dg.MaterializeResult:
    metadata: dict = {}
    if teacher_config.trains_its_own:
        report = train_teacher(platform.reference_uri, platform.trained_teacher_uri, TrainingConfig(),
                               progress=lambda event: context.log.info(str(event)), s3=platform.s3)
        held_out = report.held_out
        metadata |= {
            "reference_uri": platform.reference_uri,
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
