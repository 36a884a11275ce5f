"""Shared fixtures: a real S3-compatible server (SeaweedFS) on loopback, started and stopped here, a small
demo pool scored by a small trained teacher, and the ``sources`` a release of it reads. The helpers they call
live in ``tests/helpers/``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest

from curation_platform.storage import S3Settings
from tests.helpers.demo import build_small_demo_pool
from tests.helpers.processes import port_open
from tests.helpers.s3 import S3_PORT, running_seaweedfs, server_settings, wait_until_ready

if TYPE_CHECKING:
    from curation_platform.releases import ReleaseSources


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Settings]:
    """SeaweedFS ``weed mini`` on 127.0.0.1:8333 with its own credentials and a test bucket."""
    if port_open(S3_PORT):
        pytest.fail(f"port {S3_PORT} is busy: stop the other S3 server first")
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    settings = server_settings()
    with running_seaweedfs(settings, data_dir) as process:
        wait_until_ready(settings, process, data_dir / "weed.log")
        yield settings


@pytest.fixture(scope="session")
def demo_pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo pool (all splits) shared by the tests that only read it."""
    return build_small_demo_pool(tmp_path_factory.mktemp("demo"), shards=2, samples_per_shard=150, seed=7,
                                 reference_samples=200, target_samples=60, eval_samples=40)


@pytest.fixture(scope="session")
def scored_demo(tmp_path_factory: pytest.TempPathFactory, demo_pool_dir: Path) -> dict:
    """A small teacher trained on the demo reference split, the pool validated, embedded and scored."""
    from curation_platform.embedding.engine import EmbedConfig, embed_shards
    from curation_platform.embedding.sinks import LanceSink
    from curation_platform.ingest import ingest_shard, write_ingestion
    from curation_platform.pool import discover_shards
    from curation_platform.scoring.pipeline import ScoreParams
    from curation_platform.scoring.run import build_context, embed_target, score_pool
    from curation_platform.teachers import TeacherSpec, load_teacher
    from curation_platform.training import ModelConfig, TrainingConfig, train_teacher

    root = tmp_path_factory.mktemp("scored")
    model = ModelConfig(embed_dim=64, vision_width=64, vision_layers=2, text_width=64, text_layers=1,
                        image_size=32, patch_size=8)
    config = TrainingConfig(model=model, epochs=40, batch_size=50, warmup_steps=10, lr=2e-3, seed=0)
    train_teacher(str(demo_pool_dir / "reference"), str(root / "teacher"), config)
    teacher = load_teacher(TeacherSpec(checkpoint=str(root / "teacher")))
    lance = str(root / "lance")
    cpu = EmbedConfig(device="cpu", workers=0, batch_size=128)
    jobs = []
    for shard in discover_shards(str(demo_pool_dir / "pool")):
        ingestion = ingest_shard(shard)
        write_ingestion(ingestion, str(root / "validated"))
        jobs.append((shard, ingestion.accepted))
    embed_shards(teacher, jobs, LanceSink(lance), cpu)
    target = embed_target(teacher, str(demo_pool_dir / "target"), cpu)
    params = ScoreParams(reference_size=120, neg_clip_batch_size=64, neg_clip_repeats=3,
                         prompts=("circles squares and triangles",))
    context = build_context(teacher, lance, params, target)
    results = score_pool(context, lance)
    return {"root": root, "teacher": teacher, "lance": lance, "context": context, "results": results, "jobs": jobs,
            "truth": pl.read_parquet(demo_pool_dir / "ground_truth.parquet").filter(pl.col("split") == "pool")}


@pytest.fixture()
def sources(scored_demo: dict, demo_pool_dir: Path) -> ReleaseSources:
    """Where a release of the scored demo reads: its LanceDB, validated samples, teacher and pool."""
    from curation_platform.releases import ReleaseSources

    return ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                          scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
