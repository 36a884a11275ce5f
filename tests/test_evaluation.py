"""Release evaluation: equal-compute arms, reproducible random baselines, a tiny release trained end to end
with open_clip_train and evaluated with clip_benchmark on CPU, IWL, and checksummed records."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from curation_platform.evaluation.arms import pool_samples, random_subset, training_sets
from curation_platform.evaluation.benchmark_sets import build_demo_benchmarks, discover_benchmarks
from curation_platform.evaluation.evaluate import evaluate_release
from curation_platform.evaluation.record import compare, leaderboard, summarise_arm, verify_evaluation
from curation_platform.evaluation.scales import SCALES, get_scale
from curation_platform.evaluation.student import WeightedClipLoss
from tests.helpers.releases import releases_of_scored_demo
from tests.helpers.teachers import TINY_STUDENT

CLIP_TOP = """
name = "clip-top"
[[stage]]
type = "top_fraction"
score = "clip_score"
fraction = 0.3
"""
WEIGHTED = """
name = "clip-weighted"
[[stage]]
type = "top_fraction"
score = "clip_score"
fraction = 0.3

[weights]
prompt = "circles squares and triangles"
mode = "self_normalised"
"""


@pytest.fixture(scope="module")
def releases(scored_demo: dict, demo_pool_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return releases_of_scored_demo(scored_demo, demo_pool_dir, tmp_path_factory.mktemp("evaluated-releases"),
                                   {"plain": CLIP_TOP, "weighted": WEIGHTED})


@pytest.fixture(scope="module")
def benchmarks(demo_pool_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    out = tmp_path_factory.mktemp("benchmarks")
    build_demo_benchmarks(demo_pool_dir, out)
    return discover_benchmarks(out / "wds")


def test_scales_fix_compute_in_samples_seen() -> None:
    assert SCALES["small"].model == SCALES["medium"].model == "ViT-B-32"
    assert (SCALES["small"].samples_seen, SCALES["medium"].samples_seen) == (12_800_000, 128_000_000)
    assert SCALES["small"].steps == 12_800_000 // 4096
    with pytest.raises(ValueError, match="multiple of batch_size"):
        get_scale("demo", samples_seen=8_200)  # not a whole number of batches: arms could differ


def test_a_random_baseline_is_reproducible_from_its_seed(scored_demo: dict, demo_pool_dir: Path) -> None:
    shards = sorted({shard.name for shard, _ in scored_demo["jobs"]})
    pool = pool_samples(str(scored_demo["root"] / "validated"), shards)
    first, again, other = random_subset(pool, 50, seed=3), random_subset(pool.sample(fraction=1.0, shuffle=True,
                                                                                       seed=1), 50, seed=3), \
        random_subset(pool, 50, seed=4)
    assert first.equals(again)  # the same seed draws the same uids whatever order the pool came in
    assert first.height == 50 and first["uid"].n_unique() == 50 and set(first["uid"]) <= set(pool["uid"])
    assert not first.equals(other)
    with pytest.raises(ValueError, match="needs a pool"):
        random_subset(pool, pool.height + 1, seed=0)


def test_every_arm_is_at_equal_compute_and_the_random_arm_at_equal_size(releases: dict, scored_demo: dict) -> None:
    release = releases["weighted"]
    samples = pl.read_parquet(Path(release.uri) / "samples.parquet")
    pool = pool_samples(str(scored_demo["root"] / "validated"), sorted(set(samples["shard"])))
    sets = training_sets(samples, pool, [0, 1], weighted=True)
    assert [(s.arm, s.seed) for s in sets] == [("release", 0), ("release", 1), ("random", 0), ("random", 1),
                                               ("pool", 0), ("pool", 1)]
    assert {s.size for s in sets if s.arm != "pool"} == {samples.height}
    assert [s.weighted for s in sets] == [True, True, False, False, False, False]
    assert sets[0].set_sha256 == sets[1].set_sha256 != sets[2].set_sha256 != sets[3].set_sha256


def test_the_weighted_loss_is_clip_loss_under_uniform_weights_and_follows_the_weights() -> None:
    from open_clip.loss import ClipLoss

    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    uniform = WeightedClipLoss()(image, text, scale, sample_weight=torch.full((8,), 3.0, dtype=torch.float64))
    assert torch.allclose(uniform, ClipLoss()(image, text, scale))
    only_first = torch.zeros(8, dtype=torch.float64)
    only_first[0] = 1.0
    logits = scale * image @ text.T
    expected = (torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))
                + torch.nn.functional.cross_entropy(logits.T[:1], torch.tensor([0]))) / 2
    assert torch.allclose(WeightedClipLoss()(image, text, scale, sample_weight=only_first), expected)


def test_a_tiny_release_is_evaluated_end_to_end_and_its_record_verifies(releases: dict, benchmarks: list,
                                                                         tmp_path: Path) -> None:
    """open_clip_train trains every arm (the weighted release with IWL), clip_benchmark evaluates them, the
    record is checksummed, names the release and its compute, and a second evaluation reuses the runs."""
    evaluations = str(tmp_path / "evaluations")
    release = releases["weighted"]
    evaluated = evaluate_release(release.uri, evaluations, TINY_STUDENT, benchmarks, seeds=[0, 1], device="cpu")
    record = evaluated.record
    assert record["release_id"] == release.release_id and record["weighted"] is True
    assert {(run["arm"], run["seed"]) for run in record["runs"]} == {
        (arm, seed) for arm in ("release", "random", "pool") for seed in (0, 1)}
    seen = {(run["compute"]["samples_seen"], run["compute"]["steps"]) for run in record["runs"]}
    assert seen == {(64, 4)}  # what the trainer's own log says it saw: identical in every arm
    assert all(run["compute"]["weighted"] == (run["arm"] == "release") for run in record["runs"])
    assert record["headline_metrics"][:2] == ["zeroshot_mean_acc1", "retrieval_recall@5"]
    assert all(0.0 <= value <= 1.0 for run in record["runs"] for value in run["metrics"].values())
    assert set(record["summary"]["comparisons"]) == {"random", "pool"}
    results = Path(evaluated.uri) / "results" / "release" / "seed0" / "demo_retrieval.json"
    assert json.loads(results.read_text())["task"] == "zeroshot_retrieval"  # clip_benchmark's own JSON form

    release_id, check = verify_evaluation(evaluated.uri)
    assert release_id == release.release_id and check.ok and check.checked >= 10
    (Path(evaluated.uri) / "runs.parquet").write_bytes(b"tampered")
    assert verify_evaluation(evaluated.uri)[1].mismatched == ["runs.parquet"]

    again = evaluate_release(release.uri, evaluations, TINY_STUDENT, benchmarks, seeds=[0, 1], device="cpu")
    assert again.record["version"] == 2 and again.record["runs"] == record["runs"]  # cached runs, a new record
    board = leaderboard(evaluations)
    assert board.filter(pl.col("release_id") == release.release_id)["arm"].to_list() == ["release", "random", "pool"]


def test_the_cli_evaluates_and_ranks(releases: dict, benchmarks: list, tmp_path: Path, monkeypatch) -> None:
    from curation_platform.evaluation import scales
    from curation_platform_dagster.cli import main

    monkeypatch.setitem(scales.SCALES, "demo", TINY_STUDENT)
    bench_root = str(Path(benchmarks[0].root).parent)
    result = CliRunner().invoke(main, ["release", "evaluate", releases["plain"].uri, "--seeds", "1",
                                       "--baselines", "random", "--benchmarks", bench_root,
                                       "--evaluations", str(tmp_path / "ev"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "vs random" in result.output and "samples seen" in result.output
    board = CliRunner().invoke(main, ["release", "leaderboard", "--evaluations", str(tmp_path / "ev")])
    assert board.exit_code == 0 and releases["plain"].release_id in board.output


def test_noise_verdicts() -> None:
    steady, shifted = summarise_arm([0.50, 0.51, 0.49]), summarise_arm([0.60, 0.61, 0.59])
    assert compare(shifted, steady)["verdict"] == "better"
    assert compare(steady, summarise_arm([0.45, 0.55, 0.50]))["verdict"] == "within seed noise"
    assert compare(summarise_arm([0.5]), summarise_arm([0.4]))["verdict"] == "one seed: noise unknown"


def test_the_same_data_scale_and_seed_train_the_same_student(releases: dict, tmp_path: Path) -> None:
    """webdataset seeds its sample shuffle from the pid and the clock; the student's must not."""
    from curation_platform.evaluation.export import export_release
    from curation_platform.evaluation.student import train_student

    shards = export_release(releases["plain"].uri, str(tmp_path / "shards")).brace_pattern
    weights = []
    for attempt in ("first", "second"):
        run = train_student(shards, tmp_path / attempt, TINY_STUDENT, seed=5, device="cpu")
        weights.append(torch.load(run.checkpoint, weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_metrics_every_arm_scores_near_chance_are_flagged(benchmarks: list) -> None:
    """A scale too small to learn a task must say so, not rank arms by noise."""
    from curation_platform.evaluation.evaluate import at_chance, chance_levels

    chance = chance_levels(["zeroshot_mean_acc1", "retrieval_recall@5", "prompted/demo_shape/acc1"], benchmarks)
    retrieval = next(b for b in benchmarks if b.name == "demo_retrieval")
    assert chance["retrieval_recall@5"] == pytest.approx(min(1.0, 5 / retrieval.samples))
    assert chance["prompted/demo_shape/acc1"] == pytest.approx(1 / 7)
    summary = {"arms": {"release": {"retrieval_recall@5": {"mean": 0.9}, "prompted/demo_shape/acc1": {"mean": 0.15},
                                    "zeroshot_mean_acc1": {"mean": 0.9}},
                        "random": {"retrieval_recall@5": {"mean": 0.2}, "prompted/demo_shape/acc1": {"mean": 0.14},
                                   "zeroshot_mean_acc1": {"mean": 0.9}}}}
    assert at_chance(summary, chance) == ["prompted/demo_shape/acc1"]
