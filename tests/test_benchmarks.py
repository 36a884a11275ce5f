"""clip_benchmark evaluation sets from the demo's eval split, and zero-shot evaluation of a checkpoint with them."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation_platform.demo.evaluation import EVAL_TASKS
from curation_platform.evaluation.benchmark_sets import (
    CLASSIFICATION,
    DEMO_RETRIEVAL,
    DEMO_TASK_SETS,
    PROMPTED_DOMAIN_TASKS,
    RETRIEVAL,
    BenchmarkSet,
    build_demo_benchmarks,
    discover_benchmarks,
)
from tests.helpers.demo import build_small_demo_pool

EVAL_SAMPLES = 400  # the demo's default eval size: 80 per task, enough for a chance-level check
TINY_MODEL = "cp-test-benchmarks-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
EXPECTED_SETS = {*DEMO_TASK_SETS, "demo_domain_shapes", DEMO_RETRIEVAL}


@pytest.fixture(scope="module")
def eval_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo pool with a full-size eval split (three shards of 150) and almost nothing else (~2 s)."""
    return build_small_demo_pool(tmp_path_factory.mktemp("bench_demo"), shards=1, samples_per_shard=150, seed=11,
                                 reference_samples=0, target_samples=0, eval_samples=EVAL_SAMPLES)


@pytest.fixture(scope="module")
def benchmarks_dir(tmp_path_factory: pytest.TempPathFactory, eval_demo: Path) -> Path:
    out = tmp_path_factory.mktemp("benchmarks")
    build_demo_benchmarks(eval_demo, out)
    return out


def _tar_samples(root: Path) -> dict[str, dict[str, bytes]]:
    """key -> ext -> bytes over every shard that nshards.txt names."""
    nshards = int((root / "test" / "nshards.txt").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for index in range(nshards):
        with tarfile.open(root / "test" / f"{index}.tar") as archive:
            for info in archive:
                key, ext = info.name.split(".", 1)
                handle = archive.extractfile(info)
                assert handle is not None and info.mtime == 1_600_000_000
                samples.setdefault(key, {})[ext] = handle.read()
    return samples


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_demo_benchmarks_have_clip_benchmark_wds_layout(eval_demo: Path, benchmarks_dir: Path) -> None:
    labels = {row["key"]: row for row in pq.read_table(eval_demo / "eval_labels.parquet").to_pylist()}
    captions = {row["key"]: row["caption"] for shard in sorted((eval_demo / "eval").glob("*.parquet"))
                for row in pq.read_table(shard).to_pylist() if row["status"] == "success"}
    assert len(labels) == len(captions) == EVAL_SAMPLES
    wds = benchmarks_dir / "wds"
    assert {path.name for path in wds.iterdir()} == EXPECTED_SETS  # no temporary folders left behind

    for task, classes in EVAL_TASKS.items():
        root = wds / f"demo_{task}"
        classnames = (root / "classnames.txt").read_text().splitlines()
        templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert len(classnames) == len(classes) and len(set(classnames)) == len(classes)
        assert len(templates) >= 3 and all("{c}" in template for template in templates)
        assert all(template.format(c="x") for template in templates)  # no stray braces
        assert (root / "dataset_type.txt").read_text().strip() == "classification"
        samples = _tar_samples(root)
        assert len(samples) == EVAL_SAMPLES // len(EVAL_TASKS)
        counts = Counter()
        for key, members in samples.items():
            assert set(members) in ({"jpg", "cls"}, {"png", "cls"})
            label = int(members["cls"])
            assert 0 <= label < len(classes)
            assert labels[key]["task"] == task and classes[label] == labels[key]["label"]
            counts[label] += 1
        assert max(counts.values()) - min(counts.values()) <= 1  # the eval split is class-balanced

    shapes = _tar_samples(wds / "demo_domain_shapes")
    assert set(shapes) == {key for key, row in labels.items() if (row["task"], row["label"]) == ("domain", "shapes")}
    assert {int(members["cls"]) for members in shapes.values()} == {EVAL_TASKS["domain"].index("shapes")}

    retrieval = wds / DEMO_RETRIEVAL
    assert (retrieval / "dataset_type.txt").read_text().strip() == "retrieval"
    samples = _tar_samples(retrieval)
    assert set(samples) == set(captions)
    assert all(members["txt"].decode() == captions[key] for key, members in samples.items())

    found = {benchmark.name: benchmark for benchmark in discover_benchmarks(str(wds))}
    assert set(found) == EXPECTED_SETS
    assert found["demo_shape"] == BenchmarkSet("demo_shape", str(wds / "demo_shape"), CLASSIFICATION, 80,
                                               classnames=EVAL_TASKS["shape"])
    assert found["demo_domain"].classnames[0] == "geometric shape"
    assert found[DEMO_RETRIEVAL].task == RETRIEVAL and found[DEMO_RETRIEVAL].samples == EVAL_SAMPLES
    assert found["demo_domain_shapes"].samples == EVAL_SAMPLES // len(EVAL_TASKS) // len(EVAL_TASKS["domain"])


def test_rebuild_is_byte_identical(eval_demo: Path, benchmarks_dir: Path, tmp_path: Path) -> None:
    before = _file_hashes(benchmarks_dir)
    first = build_demo_benchmarks(eval_demo, tmp_path)
    again = build_demo_benchmarks(eval_demo, tmp_path)  # over the first build, in place
    assert first == again == {name: tmp_path / "wds" / name for name in first}
    assert set(first) == EXPECTED_SETS
    assert _file_hashes(tmp_path) == before
    assert {path.name for path in (tmp_path / "wds").iterdir()} == EXPECTED_SETS


def test_discover_reads_public_style_folders(benchmarks_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(benchmarks_dir / "wds" / "demo_texture", tmp_path / "wds_vtab-dtd")
    (tmp_path / "wds_vtab-dtd" / "dataset_type.txt").unlink()  # public classification sets have none
    shutil.copytree(benchmarks_dir / "wds" / DEMO_RETRIEVAL, tmp_path / "wds_flickr8k")
    (tmp_path / "notes").mkdir()
    found = discover_benchmarks(str(tmp_path))
    assert [(b.name, b.task, b.samples) for b in found] == [
        ("flickr8k", RETRIEVAL, EVAL_SAMPLES), ("vtab-dtd", CLASSIFICATION, EVAL_SAMPLES // len(EVAL_TASKS))]
    assert found[1].dataset == "wds/vtab-dtd" and found[1].root == str(tmp_path / "wds_vtab-dtd")
    assert [b.name for b in discover_benchmarks(tmp_path / "wds_flickr8k")] == ["flickr8k"]  # a set itself

    (tmp_path / "wds_vtab-dtd" / "classnames.txt").unlink()
    with pytest.raises(ValueError, match="classnames.txt"):
        discover_benchmarks(str(tmp_path))


def test_prompted_domain_tasks_name_built_sets() -> None:
    assert PROMPTED_DOMAIN_TASKS == {"a photo of a geometric shape": ("demo_shape", "demo_domain_shapes")}
    assert {name for names in PROMPTED_DOMAIN_TASKS.values() for name in names} <= EXPECTED_SETS


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised tiny open_clip CLIP, registered as a custom config, saved as open_clip_train does."""
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / f"{TINY_MODEL}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL)
    checkpoint = root / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": model.state_dict()}, checkpoint)
    return str(checkpoint)


def test_clip_benchmark_defaults_come_from_its_parser() -> None:
    from curation_platform.evaluation.zeroshot import clip_benchmark_defaults

    argv = list(sys.argv)
    args = clip_benchmark_defaults()
    assert sys.argv == argv
    assert (args.which, args.task, args.recall_k, args.split, args.model_type) == (
        "eval", "auto", [5], "test", "open_clip")


def test_evaluate_untrained_checkpoint_end_to_end(benchmarks_dir: Path, tiny_checkpoint: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from curation_platform.evaluation.zeroshot import MEAN_ACC1, evaluate_checkpoint, summarise

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    benchmarks = discover_benchmarks(benchmarks_dir / "wds")
    results = evaluate_checkpoint(TINY_MODEL, tiny_checkpoint, benchmarks, tmp_path / "results", batch_size=64)

    assert set(results) == EXPECTED_SETS
    for benchmark in benchmarks:
        result = results[benchmark.name]
        written = json.loads((tmp_path / "results" / f"{benchmark.name}.json").read_text())
        assert json.dumps(written, sort_keys=True) == json.dumps(result, sort_keys=True)  # NaN compares as text
        assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert (result["dataset"], result["model"], result["pretrained"], result["task"]) == (
            benchmark.dataset, TINY_MODEL, tiny_checkpoint, benchmark.task)
        metrics = result["metrics"]
        if benchmark.task == CLASSIFICATION:
            assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
            if len(benchmark.classnames) < 5:  # clip_benchmark writes acc5 = NaN below five classes
                assert math.isnan(metrics.pop("acc5"))
        else:
            assert set(metrics) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5)}
        assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics

    # Untrained: near chance (1/7 on shapes, 5/400 for retrieval recall@5).
    assert results["demo_shape"]["metrics"]["acc1"] < 3 / len(EVAL_TASKS["shape"])
    assert results[DEMO_RETRIEVAL]["metrics"]["image_retrieval_recall@5"] < 0.1

    summary = summarise(results, mean_over=DEMO_TASK_SETS)
    assert set(summary) == {
        *(f"{name}/{key}" for name in (*DEMO_TASK_SETS, "demo_domain_shapes")
          for key in ("acc1", "mean_per_class_recall")),
        *(f"{DEMO_RETRIEVAL}/{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5)),
        MEAN_ACC1,
    }
    assert summary["demo_shape/acc1"] == results["demo_shape"]["metrics"]["acc1"]
    assert summary[MEAN_ACC1] == pytest.approx(
        sum(results[name]["metrics"]["acc1"] for name in DEMO_TASK_SETS) / len(DEMO_TASK_SETS))
    everything = summarise(results)[MEAN_ACC1]  # default: every classification set, the subset included
    assert everything == pytest.approx(
        sum(r["metrics"]["acc1"] for r in results.values() if r["task"] == CLASSIFICATION) / (len(EXPECTED_SETS) - 1))


def test_evaluate_refuses_what_would_download(benchmarks_dir: Path, tiny_checkpoint: str, tmp_path: Path) -> None:
    from curation_platform.evaluation.zeroshot import evaluate_checkpoint

    benchmarks = discover_benchmarks(benchmarks_dir / "wds")[:1]
    with pytest.raises(ValueError, match="not a registered open_clip config"):
        evaluate_checkpoint("hf-hub:someone/some-clip", tiny_checkpoint, benchmarks, tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained tag would download"):
        evaluate_checkpoint(TINY_MODEL, "laion400m_e32", benchmarks, tmp_path)
    with pytest.raises(ValueError, match="device"):
        evaluate_checkpoint(TINY_MODEL, tiny_checkpoint, benchmarks, tmp_path, device="tpu")
