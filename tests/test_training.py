"""Teacher training on a small demo reference split: the teacher directory loads back bit-exactly,
its id is a function of the seed, and held-out retrieval is honest and beats chance."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from curation_platform import training
from curation_platform.embedding.loader import PixelNormaliser
from curation_platform.precision import cpu_precision
from curation_platform.teachers import CONFIG_FILE, Preprocessing, TeacherSpec, load_teacher
from curation_platform.training import (
    TrainingReport,
    TrainingTimeLimitExceeded,
    cosine_lr,
    held_out,
    load_reference,
    random_resized_crop,
    retrieval_metrics,
    torch_threads,
    train_teacher,
)
from tests.helpers.demo import build_small_demo_pool
from tests.helpers.teachers import TINY

REFERENCE_SAMPLES = 600


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("training-demo")
    build_small_demo_pool(root, shards=1, samples_per_shard=20, reference_samples=REFERENCE_SAMPLES, target_samples=10,
                          eval_samples=20)
    return str(root / "reference")


@pytest.fixture(scope="module")
def runs(reference: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, TrainingReport]]:
    """The reference split trained three times: seed 0 twice and seed 1 once."""
    root = tmp_path_factory.mktemp("teachers")
    configs = {"seed0": TINY, "seed0-again": TINY, "seed1": replace(TINY, seed=1)}
    return {name: (root / name, train_teacher(reference, str(root / name), config)) for name, config in configs.items()}


def test_teacher_directory_reproduces_the_trained_embeddings(runs: dict[str, tuple[Path, TrainingReport]]) -> None:
    out, report = runs["seed0"]
    teacher = load_teacher(TeacherSpec(checkpoint=str(out)))
    assert teacher.preprocessing == Preprocessing.from_open_clip(TINY.model.preprocess_cfg())
    assert teacher.context_length == TINY.model.context_length
    with torch_threads(TINY.threads):
        data = load_reference(report.reference_uri, teacher.preprocessing, teacher.tokenizer)
        evaluation = data.subset(held_out(data.uids, TINY.held_out_fraction, TINY.seed))
        pixels = PixelNormaliser(teacher.preprocessing)(evaluation.pixels)
        images, texts = teacher.encode_images(pixels), teacher.encode_texts(evaluation.tokens)
    # The report was computed from the in-memory model right after training: equal floats mean equal embeddings.
    assert retrieval_metrics(images, texts, evaluation.tokens, teacher.logit_scale) == report.held_out
    assert teacher.logit_scale == pytest.approx(report.logit_scale, rel=1e-6)
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["training"]["held_out"] == report.to_dict()["held_out"]


def test_teacher_id_is_stable_and_depends_on_the_seed(runs: dict[str, tuple[Path, TrainingReport]]) -> None:
    first, again, other = (load_teacher(TeacherSpec(checkpoint=str(runs[name][0])))
                           for name in ("seed0", "seed0-again", "seed1"))
    assert first.teacher_id == load_teacher(TeacherSpec(checkpoint=str(runs["seed0"][0]))).teacher_id
    assert first.teacher_id == runs["seed0"][1].teacher_id
    assert again.teacher_id == first.teacher_id  # same seed, same CPU: bit-identical weights
    assert other.teacher_id != first.teacher_id


def test_report_is_consistent_and_beats_chance(runs: dict[str, tuple[Path, TrainingReport]]) -> None:
    report = runs["seed0"][1]
    metrics = report.held_out
    assert report.samples_train + report.samples_held_out == REFERENCE_SAMPLES
    assert metrics.samples == report.samples_held_out
    assert 0.1 < report.samples_held_out / REFERENCE_SAMPLES < 0.3
    assert metrics.chance_at_1 == 1 / metrics.samples and metrics.chance_at_5 == 5 / metrics.samples
    recalls = [metrics.i2t_recall_at_1, metrics.i2t_recall_at_5, metrics.t2i_recall_at_1, metrics.t2i_recall_at_5]
    assert all(0.0 <= value <= 1.0 for value in recalls)
    assert metrics.i2t_recall_at_1 <= metrics.i2t_recall_at_5 and metrics.t2i_recall_at_1 <= metrics.t2i_recall_at_5
    assert report.epochs_run == TINY.epochs and len(report.curve) == TINY.epochs
    assert report.steps == TINY.epochs * (report.samples_train // TINY.batch_size)
    assert report.curve[-1].train_loss < report.curve[0].train_loss
    assert metrics.i2t_recall_at_5 >= 3 * metrics.chance_at_5
    assert metrics.t2i_recall_at_5 >= 3 * metrics.chance_at_5


def test_held_out_split_follows_uid_hash_not_position() -> None:
    uids = [f"{index:032x}" for index in range(4000)]
    mask = held_out(uids, 0.1, seed=0)
    assert 0.08 < mask.float().mean() < 0.12
    assert torch.equal(held_out(uids[::-1], 0.1, seed=0), mask.flip(0))
    assert torch.equal(held_out(uids[1000:], 0.1, seed=0), mask[1000:])  # growing the split moves nobody
    assert not torch.equal(held_out(uids, 0.1, seed=1), mask)


def test_retrieval_metrics_score_perfect_and_collapsed_models() -> None:
    tokens = torch.arange(40).view(20, 2)
    perfect = torch.eye(20)
    perfect_metrics = retrieval_metrics(perfect, perfect, tokens, logit_scale=100.0)
    assert perfect_metrics.i2t_recall_at_1 == perfect_metrics.t2i_recall_at_1 == 1.0
    collapsed = torch.nn.functional.normalize(torch.ones(20, 4), dim=-1)
    collapsed_metrics = retrieval_metrics(collapsed, collapsed, tokens, logit_scale=100.0)
    assert collapsed_metrics.i2t_recall_at_5 == collapsed_metrics.t2i_recall_at_5 == 0.0
    duplicated = tokens.clone()
    duplicated[1] = duplicated[0]  # two samples share a caption: either text is a correct match
    swapped = perfect[[1, 0, *range(2, 20)]]
    assert retrieval_metrics(swapped, perfect, duplicated, logit_scale=100.0).i2t_recall_at_1 == 1.0


def test_schedule_and_augmentation() -> None:
    assert cosine_lr(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(99, 100, 10, 1.0) < 0.01
    pixels = torch.rand(8, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    assert random_resized_crop(pixels, (1.0, 1.0), generator) is pixels
    cropped = random_resized_crop(pixels, (0.5, 1.0), generator)
    assert cropped.shape == pixels.shape and not torch.equal(cropped, pixels)
    assert cropped.min() >= pixels.min() and cropped.max() <= pixels.max()  # interpolation inside the image


def test_precision_follows_the_cpu_and_is_recorded(runs: dict[str, tuple[Path, TrainingReport]]) -> None:
    out, report = runs["seed0"]
    assert TINY.precision == "auto" and report.precision == cpu_precision() in ("bf16", "fp32")
    saved = json.loads((out / CONFIG_FILE).read_text())["training"]
    assert saved["config"]["precision"] == report.precision
    assert saved["cpu"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


class SlowClock:
    """``time.perf_counter`` for a machine so loaded that every reading is 1,000 s after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1000.0
        return self.now


def test_weights_do_not_depend_on_wall_time(reference: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            runs: dict[str, tuple[Path, TrainingReport]]) -> None:
    events: list[dict] = []
    monkeypatch.setattr(training.time, "perf_counter", SlowClock())
    slow = train_teacher(reference, str(tmp_path / "slow"), TINY, events.append)
    assert slow.teacher_id == runs["seed0"][1].teacher_id  # the same weights, however long each step took
    assert slow.steps == runs["seed0"][1].steps and slow.seconds_total > 10_000
    steps = [event for event in events if event["stage"] == "step"]
    assert steps[-1]["step"] == steps[-1]["total_steps"] == slow.steps
    assert all(event["steps_per_second"] > 0 and event["seconds_left"] >= 0 for event in steps)


def test_a_time_limit_that_cuts_training_short_publishes_nothing(reference: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training.time, "perf_counter", SlowClock())
    with pytest.raises(TrainingTimeLimitExceeded, match=r"after 1 of \d+ steps.*nothing was published"):
        train_teacher(reference, str(tmp_path / "capped"), replace(TINY, max_seconds=1500.0))
    assert not (tmp_path / "capped").exists()
