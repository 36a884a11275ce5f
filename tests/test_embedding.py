"""Teachers, the embedding engine and its sinks: identity, round trips, idempotent concurrent writes."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from curation_platform.embedding.engine import embed_shard, embed_shards
from curation_platform.embedding.precomputed import import_npz
from curation_platform.embedding.sinks import ArrowSink, LanceSink, NullSink, remove_orphaned_staging
from curation_platform.ingest import ingest_shard
from curation_platform.pool import ShardRef, discover_shards
from curation_platform.quality import embeddings_suite
from curation_platform.storage import S3Settings
from curation_platform.teachers import Teacher, TeacherSpec, load_teacher, save_teacher_directory
from tests.helpers.s3 import upload_directory
from tests.helpers.teachers import CPU, TINY_CONFIG, embed_in_child, tiny_teacher_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path) -> Teacher:
    return load_teacher(TeacherSpec(checkpoint=str(teacher_dir)))


@pytest.fixture(scope="module")
def validated(demo_pool_dir: Path) -> list[tuple[ShardRef, pa.Table]]:
    return [(shard, ingest_shard(shard).accepted) for shard in discover_shards(str(demo_pool_dir / "pool"))]


def test_teacher_id_is_stable_and_tracks_what_changes_embeddings(tmp_path: Path, teacher_dir: Path,
                                                                 teacher: Teacher) -> None:
    again = load_teacher(TeacherSpec(checkpoint=str(teacher_dir)))
    assert again.teacher_id == teacher.teacher_id and teacher.teacher_id.startswith("custom-w32-")
    other_weights = load_teacher(TeacherSpec(checkpoint=str(tiny_teacher_dir(tmp_path / "seed1", seed=1))))
    other_scale = load_teacher(TeacherSpec(checkpoint=str(tiny_teacher_dir(tmp_path / "scale", logit_scale=3.0))))
    no_draft = load_teacher(TeacherSpec(checkpoint=str(teacher_dir)), jpeg_draft=False)
    ids = {teacher.teacher_id, other_weights.teacher_id, other_scale.teacher_id, no_draft.teacher_id}
    assert len(ids) == 4
    assert other_scale.logit_scale == pytest.approx(np.exp(3.0), rel=1e-5)
    described = teacher.describe()
    assert described["embed_dim"] == 32 and described["logit_bias"] is None


def test_siglip_style_bias_is_part_of_the_identity(tmp_path: Path) -> None:
    config = {**TINY_CONFIG, "init_logit_bias": -10.0}
    model = open_clip.model.CLIP(**config)
    save_teacher_directory(model, config, {"size": 32}, str(tmp_path / "siglip"))
    loaded = load_teacher(TeacherSpec(checkpoint=str(tmp_path / "siglip")))
    assert loaded.logit_bias == pytest.approx(-10.0)
    model.logit_bias.data.fill_(-5.0)
    save_teacher_directory(model, config, {"size": 32}, str(tmp_path / "siglip2"))
    assert load_teacher(TeacherSpec(checkpoint=str(tmp_path / "siglip2"))).teacher_id != loaded.teacher_id


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_for_a_named_architecture(tmp_path: Path, teacher: Teacher, suffix: str) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "TinyTest.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(tmp_path / "configs")
    state = {name: tensor.contiguous() for name, tensor in teacher.model.state_dict().items()}
    checkpoint = tmp_path / f"weights{suffix}"
    save_file(state, checkpoint) if suffix == ".safetensors" else torch.save(state, checkpoint)
    loaded = load_teacher(TeacherSpec(architecture="TinyTest", checkpoint=str(checkpoint)))
    tokens = loaded.tokenize(["a red circle", "three blue squares"])
    assert torch.equal(loaded.encode_texts(tokens), teacher.encode_texts(tokens))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    checkpoint = tmp_path / "evil.pt"
    checkpoint.write_bytes(pickle.dumps({"state": Exploit()}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; what matters is that nothing ran
        load_teacher(TeacherSpec(architecture="ViT-B-32", checkpoint=str(checkpoint)))
    assert not (tmp_path / "pwned").exists()


def test_embeddings_are_unit_norm_and_match_a_direct_forward(tmp_path: Path, teacher: Teacher,
                                                             validated: list[tuple[ShardRef, pa.Table]]) -> None:
    shard, samples = validated[0]
    sink = LanceSink(str(tmp_path / "lance"))
    report = embed_shard(teacher, shard, samples, sink, CPU)
    rows = sink.read_shard(shard.name, teacher.teacher_id, 32)
    quality = embeddings_suite(rows, samples.column("uid").to_pylist(), 32)
    assert quality.success, quality.to_metadata()
    assert report.rows == samples.num_rows == rows.num_rows

    # the engine's device-side normalisation matches open_clip's own transform on the same image
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, force_image_size=32)
    first = samples.sort_by("image_offset").slice(0, 1).to_pylist()[0]
    with open(shard.tar.uri, "rb") as handle:
        handle.seek(first["image_offset"])
        image_bytes = handle.read(first["image_bytes"])
    from PIL import Image

    pixels = preprocess(Image.open(io.BytesIO(image_bytes))).unsqueeze(0)
    expected = teacher.encode_images(pixels)[0].numpy()
    stored = {row["uid"]: row for row in rows.to_pylist()}[first["uid"]]
    assert np.abs(np.array(stored["image_embedding"]) - expected).max() < 0.05  # draft decode, not bit-exact


def test_reembedding_replaces_exactly_the_shard(tmp_path: Path, teacher: Teacher,
                                                validated: list[tuple[ShardRef, pa.Table]]) -> None:
    sink = LanceSink(str(tmp_path / "lance"))
    embed_shards(teacher, validated, sink, CPU)
    embed_shards(teacher, validated, sink, CPU)  # re-run: no duplicates
    table = sink.open_table(32)
    assert table.count_rows() == sum(samples.num_rows for _, samples in validated)

    shard, samples = validated[0]
    fewer = samples.slice(10)  # the shard was re-validated with fewer accepted samples
    embed_shard(teacher, shard, fewer, sink, CPU)
    rows = sink.read_shard(shard.name, teacher.teacher_id, 32)
    assert sorted(rows.column("uid").to_pylist()) == sorted(fewer.column("uid").to_pylist())  # no leftovers
    other = validated[1]
    assert sink.read_shard(other[0].name, teacher.teacher_id, 32).num_rows == other[1].num_rows

    second = load_teacher(TeacherSpec(checkpoint=str(tiny_teacher_dir(tmp_path / "t2", seed=5))))
    embed_shard(second, shard, samples, sink, CPU)  # another teacher's rows never touch the first's
    assert sink.read_shard(shard.name, teacher.teacher_id, 32).num_rows == fewer.num_rows
    assert sink.read_shard(shard.name, second.teacher_id, 32).num_rows == samples.num_rows


def test_concurrent_writers_and_kill_retry_leave_exact_rows(tmp_path: Path, teacher_dir: Path, teacher: Teacher,
                                                            validated: list[tuple[ShardRef, pa.Table]],
                                                            demo_pool_dir: Path) -> None:
    lance_uri = str(tmp_path / "lance")
    pool = str(demo_pool_dir / "pool")
    context = multiprocessing.get_context("spawn")
    names = [shard.name for shard, _ in validated]
    writers = [context.Process(target=embed_in_child, args=(str(teacher_dir), pool, name, lance_uri, 0.0))
               for name in [*names, *names]]  # every shard written twice, all at once
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=240)
        assert process.exitcode == 0
    sink = LanceSink(lance_uri)
    for shard, samples in validated:
        rows = sink.read_shard(shard.name, teacher.teacher_id, 32)
        assert embeddings_suite(rows, samples.column("uid").to_pylist(), 32).success
    before = sink.open_table(32).count_rows()

    # a writer killed mid-shard leaves the committed state untouched; the retry commits exactly once
    code = (f"from tests.helpers.teachers import embed_in_child; "
            f"embed_in_child({str(teacher_dir)!r}, {pool!r}, {names[0]!r}, {lance_uri!r}, 0.5)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1],
                             env=os.environ | {"TMPDIR": str(tmp_path)})  # its staged rows die with it here
    assert child.stdout.readline().strip() == "writing"
    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert sink.open_table(32).count_rows() == before
    staging = tmp_path / "curation-platform-staging"
    orphans = set(staging.glob("embeddings-*.arrow"))
    assert len(orphans) == 1  # "writing" is printed once the shard's rows are staged
    live = staging / f"embeddings-{os.getpid()}-live.arrow"  # a running writer's file is never touched
    live.write_bytes(b"")
    assert set(remove_orphaned_staging(staging)) == orphans
    assert list(staging.glob("embeddings-*.arrow")) == [live]
    embed_in_child(str(teacher_dir), pool, names[0], lance_uri, 0.0)
    assert sink.open_table(32).count_rows() == before


def test_arrow_and_null_sinks_agree_with_lance(tmp_path: Path, teacher: Teacher,
                                               validated: list[tuple[ShardRef, pa.Table]]) -> None:
    shard, samples = validated[0]
    arrow, null = ArrowSink(str(tmp_path / "arrow")), NullSink()
    embed_shard(teacher, shard, samples, arrow, CPU)
    embed_shard(teacher, shard, samples, null, CPU)
    stored = pa.ipc.open_file(arrow.path(shard.name, teacher.teacher_id)).read_all()
    assert stored.num_rows == null.rows == samples.num_rows
    assert embeddings_suite(stored, samples.column("uid").to_pylist(), 32).success


@pytest.mark.s3
def test_s3_teacher_and_s3_lance_table(tmp_path: Path, s3_server: S3Settings, teacher_dir: Path, teacher: Teacher,
                                       validated: list[tuple[ShardRef, pa.Table]]) -> None:
    teacher_uri = upload_directory(s3_server, teacher_dir, "teachers/tiny")
    remote_teacher = load_teacher(TeacherSpec(checkpoint=teacher_uri), s3=s3_server)
    assert remote_teacher.teacher_id == teacher.teacher_id
    sink = LanceSink("s3://curation-test/lance", s3=s3_server)
    shard, samples = validated[0]
    embed_shard(remote_teacher, shard, samples, sink, CPU)
    embed_shard(remote_teacher, shard, samples, sink, CPU)
    rows = sink.read_shard(shard.name, teacher.teacher_id, 32)
    assert embeddings_suite(rows, samples.column("uid").to_pylist(), 32).success


def test_datacomp_npz_import(tmp_path: Path, demo_pool_dir: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for path in (demo_pool_dir / "pool").glob("00000*"):
        (pool / path.name).write_bytes(path.read_bytes())
    rows = pq.read_table(pool / "00000.parquet").num_rows
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=(rows, dim)).astype(np.float16)
              for name, dim in (("b32_img", 512), ("b32_txt", 512), ("l14_img", 768), ("l14_txt", 768))}
    np.savez(pool / "00000.npz", **arrays)
    (shard,) = discover_shards(str(pool))
    assert shard.npz is not None
    samples = ingest_shard(shard).accepted
    sink = LanceSink(str(tmp_path / "lance"), table="embeddings_l14")
    commit = import_npz(shard, samples, sink, model="l14")
    stored = sink.read_shard(shard.name, "datacomp-openai-vit-l-14", 768)
    assert commit.rows == stored.num_rows == samples.num_rows
    assert embeddings_suite(stored, samples.column("uid").to_pylist(), 768).success
    keys = pq.read_table(pool / "00000.parquet", columns=["key"]).column("key").to_pylist()
    first = samples.slice(0, 1).to_pylist()[0]
    expected = arrays["l14_img"][keys.index(first["key"])].astype(np.float32)
    got = np.array({row["uid"]: row for row in stored.to_pylist()}[first["uid"]]["image_embedding"])
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(ValueError, match="512-d|dimension|vectors"):
        import_npz(shard, samples, sink, model="b32")  # 512-d vectors do not fit the 768-d table


def test_text_tower_on_trimmed_tokens_matches_the_full_context(teacher: Teacher) -> None:
    """The engine cuts token batches to their longest caption; CLIP's causal tower gives the same output."""
    import torch.nn.functional as F

    assert teacher._text_is_trimmable
    for captions in (["a red shape", "image", "two large red triangles on a cream background"],
                     ["word " * 100, "a red shape"], [""]):
        tokens = teacher.tokenize(captions)
        with torch.inference_mode():
            full = F.normalize(teacher.model.encode_text(tokens).float(), dim=-1)
        assert torch.allclose(teacher.encode_texts(tokens), full, atol=1e-5)


def test_a_shard_never_takes_over_another_shards_rows(tmp_path: Path) -> None:
    """The same uids in a second shard: the first shard's rows stay, the second's are visibly missing."""
    from curation_platform import lance_tables
    from curation_platform.embedding.sinks import PRIMARY_KEY, embedding_schema, record_batch, vectors

    sink = LanceSink(str(tmp_path / "lance"))
    x = np.eye(8, dtype=np.float32)[:3]
    uids = [f"{i:032x}" for i in range(3)]

    def commit(shard: str) -> None:
        rows = pa.Table.from_batches([record_batch(uids, "t", shard, x, x)]).cast(embedding_schema(8))
        lance_tables.replace_partition(lambda: sink.open_table(8), PRIMARY_KEY,
                                       lance_tables.partition_condition(shard, "t"), rows.to_reader)

    commit("a")
    commit("b")
    assert sink.read_shard("a", "t", 8).num_rows == 3 and sink.read_shard("b", "t", 8).num_rows == 0
    commit("a")  # re-embedding the owner still replaces its rows
    rows = sink.read_shard("a", "t", 8)
    assert rows.num_rows == 3 and np.allclose(vectors(rows, "image_embedding"), x)
