"""The teacher quality gate: an under-trained teacher fails and blocks embeddings, a trained one passes,
an external teacher is evaluated on the trusted split, and the bar's arithmetic is exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest

from curation_platform.teacher_quality import TeacherBar, evaluate_teacher, judge_teacher
from curation_platform.teachers import TeacherSpec, load_teacher
from curation_platform.training import RetrievalMetrics, train_teacher
from curation_platform_dagster.definitions import build_definitions
from curation_platform_dagster.defs.ingestion import shard_partitions
from curation_platform_dagster.defs.resources import PlatformResource, ScoringResource, TeacherResource
from tests.helpers.demo import build_small_demo_pool
from tests.helpers.teachers import TINY, tiny_teacher_dir


def _metrics(i2t5: float, t2i5: float, i2t1: float = 0.2, t2i1: float = 0.2, samples: int = 300) -> RetrievalMetrics:
    return RetrievalMetrics(samples=samples, loss=1.0, i2t_recall_at_1=i2t1, i2t_recall_at_5=i2t5,
                            t2i_recall_at_1=t2i1, t2i_recall_at_5=t2i5, chance_at_1=1 / samples,
                            chance_at_5=5 / samples)


def test_the_default_bar_fails_a_cut_short_teacher_and_passes_the_demo_teacher() -> None:
    bar = TeacherBar()
    assert bar.shortfalls(_metrics(0.666, 0.64)) == []  # the demo teacher (BENCHMARKS.md)
    assert bar.shortfalls(_metrics(0.130, 0.12)) == ["i2t R@5 0.130 < minimum 0.300", "t2i R@5 0.120 < minimum 0.300"]
    at_chance = bar.shortfalls(_metrics(0.4, 0.4, i2t1=1 / 300, t2i1=0.01, samples=300))
    assert at_chance == ["i2t R@1 0.003 < 3 x chance 0.0033"]
    assert TeacherBar(min_recall_at_5=0.0, min_chance_multiple=0.0).shortfalls(_metrics(0.0, 0.0, 0.0, 0.0)) == []
    with pytest.raises(ValueError):
        TeacherBar(min_recall_at_5=1.5)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_demo_pool(tmp_path_factory.mktemp("gate-split"), shards=1, samples_per_shard=60, seed=3,
                                 reference_samples=600, target_samples=10, eval_samples=10)


@pytest.fixture(scope="module")
def two_step_teacher(split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-step") / "teacher"
    report = train_teacher(str(split / "reference"), str(out), replace(TINY, epochs=1, batch_size=200))
    assert report.steps == 2
    return out


def test_under_trained_teacher_fails_from_its_training_report(two_step_teacher: Path, split: Path) -> None:
    teacher = load_teacher(TeacherSpec(checkpoint=str(two_step_teacher)))
    verdict = judge_teacher(teacher, "ignored: the report names its split")
    assert not verdict.passed and verdict.evidence == "training report"
    assert verdict.split_uri == str(split / "reference")
    assert "i2t R@5" in verdict.advice and "--pretrained" in verdict.advice and "more" in verdict.advice


def test_external_teacher_is_evaluated_on_the_held_out_slice(split: Path, tmp_path: Path) -> None:
    teacher = load_teacher(TeacherSpec(checkpoint=str(tiny_teacher_dir(tmp_path / "random"))))
    metrics = evaluate_teacher(teacher, str(split / "reference"), max_pairs=40)
    assert metrics.samples == 40 and metrics.chance_at_5 == 5 / 40
    again = evaluate_teacher(teacher, str(split / "reference"), max_pairs=40)
    assert again == metrics  # the slice is chosen by uid hash, not by chance
    verdict = judge_teacher(teacher, str(split / "reference"), max_pairs=40)
    assert verdict.evidence == "evaluated" and not verdict.passed  # random weights are at chance


def _resources(home: Path, pool: Path, teacher: Path, gate: str) -> dict:
    return {
        "platform": PlatformResource(home_uri=str(home), pool_uri=str(pool), decode_workers=0),
        "teacher_config": TeacherResource(checkpoint=str(teacher), device="cpu", workers=0, batch_size=64, gate=gate),
        "scoring": ScoringResource(reference_size=50, neg_clip_batch_size=32, neg_clip_repeats=2),
    }


def test_failed_gate_blocks_embeddings_in_the_run_and_in_a_later_one(two_step_teacher: Path, split: Path,
                                                                      tmp_path: Path) -> None:
    graph = build_definitions({}, _resources(tmp_path / "home", split / "pool", two_step_teacher, "block"))
    instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    instance.add_dynamic_partitions(shard_partitions.name, ["00000"])
    everything = [*graph.assets, *graph.asset_checks]

    first = dg.materialize(everything, selection=["teacher"], instance=instance, resources=graph.resources,
                           raise_on_error=False)
    (evaluation,) = first.get_asset_check_evaluations()
    assert not first.success and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["i2t_recall_at_5"].value < 0.3 and "more epochs" in evaluation.description

    # Started by hand after the failed gate, the embeddings refuse to run with that teacher.
    later = dg.materialize(everything, selection=["validated_samples", "embeddings"], partition_key="00000",
                           instance=instance, resources=graph.resources, raise_on_error=False)
    assert not later.success
    assert {event.asset_key.to_user_string() for event in later.get_asset_materialization_events()} == {
        "validated_samples"}
    (failure,) = later.get_step_failure_events()
    assert "failed its quality gate" in failure.step_failure_data.error.message

    # In warn mode the gate only warns, and embeddings go on.
    warned = build_definitions({}, _resources(tmp_path / "home", split / "pool", two_step_teacher, "warn"))
    result = dg.materialize([*warned.assets, *warned.asset_checks], selection=["teacher"], instance=instance,
                            resources=warned.resources, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert result.success and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
