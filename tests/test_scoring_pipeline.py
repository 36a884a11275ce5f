"""Scoring artefacts and per-shard score tables, and the demo-pool evidence at small scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curation_platform.embedding.sinks import LanceSink, record_batch
from curation_platform.ingest import read_captions
from curation_platform.scoring import clip_score, kl_divergence
from curation_platform.scoring.pipeline import (
    REFERENCE_TABLE,
    SCORE_COLUMNS,
    draw_reference,
    load_set,
    prompt_column,
    uid_sample_bound,
)
from curation_platform.scoring.run import (
    auroc,
    count_scores,
    embed_target,
    read_scores,
    score_pool,
)


def random_batches(n: int, batch: int, seed: int = 0) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    uids = [f"{i:032x}" for i in range(n)]
    return [record_batch(uids[s : s + batch], "t", "s", x[s : s + batch], x[s : s + batch]) for s in range(0, n, batch)]


def test_reference_draw_is_seeded_uniform_and_independent_of_order() -> None:
    batches = random_batches(5000, 333)
    first = draw_reference(iter(batches), "t", 400, seed=1)
    reordered = draw_reference(iter(list(reversed(batches))), "t", 400, seed=1)
    assert first.uids == reordered.uids and first.set_id == reordered.set_id and first.size == 400
    assert np.array_equal(first.image, reordered.image)
    other_seed = draw_reference(iter(batches), "t", 400, seed=2)
    assert other_seed.set_id != first.set_id and len(set(first.uids) & set(other_seed.uids)) < 120
    positions = np.array([int(uid, 16) for uid in first.uids])  # uniform over the pool: no position bias
    assert 0.4 < positions.mean() / 5000 < 0.6
    assert np.histogram(positions, bins=5, range=(0, 5000))[0].min() > 50
    small = draw_reference(iter(batches), "t", 10_000, seed=1)
    assert small.size == 5000  # a pool smaller than N gives the whole pool


def test_score_table_is_complete_and_idempotent(scored_demo: dict) -> None:
    lance, context, teacher = scored_demo["lance"], scored_demo["context"], scored_demo["teacher"]
    table = read_scores(lance, teacher.teacher_id)
    accepted = sum(samples.num_rows for _, samples in scored_demo["jobs"])
    assert table.num_rows == accepted == len(set(table.column("uid").to_pylist()))
    for column in [*SCORE_COLUMNS, prompt_column("circles squares and triangles")]:
        values = table.column(column).to_numpy()
        assert np.isfinite(values).all(), column
    kl = table.column("kl_text").to_numpy()
    assert (kl >= -1e-6).all() and (kl <= np.log(context.reference.size) + 1e-6).all()
    assert set(table.column("reference_id").to_pylist()) == {context.reference.set_id}

    score_pool(context, lance)  # re-scoring replaces, never duplicates
    assert read_scores(lance, teacher.teacher_id).num_rows == accepted
    stored = load_set(lance, REFERENCE_TABLE, context.reference.set_id)
    assert stored.uids == context.reference.uids and np.allclose(stored.text, context.reference.text)

    # the stored scores are the library functions applied to the stored embeddings
    shard, _ = scored_demo["jobs"][0]
    rows = LanceSink(lance).read_shard(shard.name, teacher.teacher_id, teacher.embed_dim)
    image = np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False))
    text = np.stack(rows.column("text_embedding").to_numpy(zero_copy_only=False))
    by_uid = {row["uid"]: row for row in table.to_pylist()}
    expected_kl = kl_divergence(text, context.reference.image, context.logit_scale)
    got = np.array([by_uid[uid]["kl_text"] for uid in rows.column("uid").to_pylist()])
    assert np.abs(got - expected_kl).max() < 1e-6
    assert np.abs(np.array([by_uid[u]["clip_score"] for u in rows.column("uid").to_pylist()])
                  - clip_score(image, text)).max() < 1e-6


def test_uid_bound_samples_scores_and_captions_alike(scored_demo: dict) -> None:
    lance, teacher_id = scored_demo["lance"], scored_demo["teacher"].teacher_id
    rows = count_scores(lance, teacher_id)
    assert uid_sample_bound(rows, rows) is None
    bound = uid_sample_bound(rows, rows // 4)
    sample = read_scores(lance, teacher_id, columns=["uid"], uid_below=bound).column("uid").to_pylist()
    expected, spread = rows / 4, 4 * np.sqrt(rows / 4 * 0.75)
    assert abs(len(sample) - expected) < spread and all(uid < bound for uid in sample)
    captions = read_captions(str(scored_demo["root"] / "validated"), uid_below=bound).column("uid").to_pylist()
    assert set(captions) == set(sample)  # the same samples on both sides of the join
    assert read_scores(lance, teacher_id, columns=["uid"], uid_below=bound).column("uid").to_pylist() == sample


def test_scores_measure_what_the_papers_say_on_the_demo_pool(scored_demo: dict) -> None:
    scores = pl.from_arrow(read_scores(scored_demo["lance"], scored_demo["teacher"].teacher_id))
    frame = scores.join(scored_demo["truth"], on="uid")

    def area(column: str, positive: pl.Expr, negative: pl.Expr) -> float:
        return auroc(frame.filter(positive)[column].to_numpy(), frame.filter(negative)[column].to_numpy())

    clean = pl.col("corruption") == "clean"
    assert area("clip_score", clean, pl.col("corruption") == "misaligned") > 0.8
    assert area("neg_clip_loss", clean, pl.col("corruption") == "misaligned") > 0.8
    assert area("kl_text", clean, pl.col("corruption") == "generic_caption") > 0.65
    in_target = pl.col("domain").is_in(["shapes", "glyphs"])  # the demo target split's two domains
    assert area("norm_sim_inf", in_target, ~in_target) > 0.7
    shapes, others = pl.col("domain") == "shapes", pl.col("domain") != "shapes"
    assert area(prompt_column("circles squares and triangles"), shapes, others) > 0.7


def test_target_from_an_image_folder(tmp_path: Path, scored_demo: dict) -> None:
    from PIL import Image

    teacher = scored_demo["teacher"]
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for index, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (80, 60), colour).save(folder / f"{index}.png")
    (folder / "copy.png").write_bytes((folder / "0.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    target = embed_target(teacher, str(tmp_path / "images"))
    assert target.size == 3 and target.image.shape == (3, teacher.embed_dim)
    assert np.allclose(np.linalg.norm(target.image, axis=1), 1, atol=1e-5)
    assert target.description["files"] == 5 and target.description["embedded"] == 3
