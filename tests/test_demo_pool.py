"""The demo pool generator: determinism, the img2dataset format, and the labelled defects."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation_platform.demo import CorruptionKind, CorruptionRates, DemoPoolConfig, build_demo_pool
from curation_platform.demo.attributes import DOMAINS, sample_attributes
from curation_platform.demo.captions import GENERIC_CAPTIONS, underspecified_caption
from curation_platform.demo.corruptions import CORRUPTION_KINDS, RATE_KINDS, CorruptionPlan, exact_counts
from curation_platform.demo.evaluation import EVAL_TASKS
from curation_platform.demo.pool import _plan_splits
from curation_platform.demo.samples import Stream, stream_rng
from curation_platform.demo.vocabulary import COLOURS
from curation_platform.formats.img2dataset import (
    TAR_MEMBER_MTIME,
    Img2DatasetShardWriter,
    sample_key,
    sample_key_digits,
)

SPLITS = ("pool", "reference", "target", "eval")
SMALL = {"shards": 2, "samples_per_shard": 60, "reference_samples": 80, "target_samples": 40, "eval_samples": 50}
UID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^(IMG_\d{4}\.jpg|DSC\d{5}\.JPG|image_\d+\.png|Screenshot \d+)$")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def tar_members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as archive:
        return [(info, archive.extractfile(info).read()) for info in archive]  # type: ignore[union-attr]


def rows(directory: Path) -> list[dict]:
    """Parquet rows of a split's shards, in shard order."""
    shards = sorted(directory.glob("*.parquet"))
    return [row for path in shards for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "demo"
    build_demo_pool(DemoPoolConfig(out=out, seed=7, **SMALL))
    return out


@pytest.fixture(scope="module")
def rates_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rates") / "demo"
    config = DemoPoolConfig(
        out=out, shards=2, samples_per_shard=500, reference_samples=0, target_samples=0, eval_samples=0
    )
    build_demo_pool(config)
    return out


@pytest.fixture(scope="module")
def no_eval_copy_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small pool as it was before eval copies: same seed, ``eval_copy_rate=0``."""
    out = tmp_path_factory.mktemp("no_eval_copies") / "demo"
    build_demo_pool(DemoPoolConfig(out=out, seed=7, eval_copy_rate=0.0, **SMALL))
    return out


@pytest.fixture(scope="module")
def eval_copy_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small pool with more eval copies (6 of 120), so several can be checked at once."""
    out = tmp_path_factory.mktemp("eval_copies") / "demo"
    build_demo_pool(DemoPoolConfig(out=out, seed=7, eval_copy_rate=0.05, **SMALL))
    return out


def test_keys_follow_img2dataset_convention() -> None:
    assert sample_key_digits(500) == 4
    assert sample_key_digits(10_000) == 4
    assert sample_key_digits(10_001) == 5
    assert sample_key(3, 42, 4) == "000030042"


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path: Path, small_pool: Path) -> None:
    rebuilt = tmp_path / "rebuilt"
    build_demo_pool(DemoPoolConfig(out=rebuilt, seed=7, workers=2, **SMALL))
    expected, actual = tree_bytes(small_pool), tree_bytes(rebuilt)
    assert sorted(actual) == sorted(expected)
    assert [name for name in expected if expected[name] != actual[name]] == []


def test_another_seed_gives_other_bytes(tmp_path: Path, small_pool: Path) -> None:
    other = tmp_path / "other"
    build_demo_pool(DemoPoolConfig(out=other, seed=8, **SMALL))
    expected, actual = tree_bytes(small_pool), tree_bytes(other)
    assert sorted(actual) == sorted(expected)
    assert expected["pool/00000.tar"] != actual["pool/00000.tar"]
    assert expected["ground_truth.parquet"] != actual["ground_truth.parquet"]


def test_layout_on_disk(small_pool: Path) -> None:
    names = set(tree_bytes(small_pool))
    for shard in ("00000", "00001"):
        assert {f"pool/{shard}.tar", f"pool/{shard}.parquet", f"pool/{shard}_stats.json"} <= names
    assert {"ground_truth.parquet", "demo_pool.json", "eval_classes.json", "eval_labels.parquet"} <= names
    assert "reference/00001_stats.json" in names  # 80 samples at 60 per shard
    assert not [name for name in names if name.endswith(".tmp")]
    manifest = json.loads((small_pool / "demo_pool.json").read_text())
    assert manifest["splits"]["pool"]["samples"] == 120
    assert manifest["config"]["seed"] == 7
    assert manifest["config"]["reference_underspecified_share"] == 0.15


def test_webdataset_reads_the_pool(small_pool: Path) -> None:
    import webdataset
    urls = [str(path) for path in sorted((small_pool / "pool").glob("*.tar"))]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    successes = [row for row in rows(small_pool / "pool") if row["status"] == "success"]
    assert len(samples) == len(successes)
    assert [sample["__key__"] for sample in samples] == [row["key"] for row in successes]
    decoded = 0
    for sample in samples:
        image_extensions = {"jpg", "png"} & set(sample)
        assert len(image_extensions) == 1 and {"txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert sample["txt"].decode("utf-8") == meta["caption"]
        if decoded < 5 and meta["width"] >= 180:
            image = Image.open(io.BytesIO(sample[image_extensions.pop()]))
            image.load()
            assert image.size == (meta["width"], meta["height"])
            decoded += 1
    assert decoded == 5


@pytest.mark.parametrize("split", SPLITS)
def test_shards_agree_with_their_parquet_and_stats(small_pool: Path, split: str) -> None:
    for parquet in sorted((small_pool / split).glob("0*.parquet")):
        table = pq.read_table(parquet).to_pylist()
        stats = json.loads(parquet.with_name(f"{parquet.stem}_stats.json").read_text())
        successes = [row for row in table if row["status"] == "success"]
        assert stats["count"] == len(table)
        assert stats["successes"] == len(successes)
        assert stats["failed_to_download"] == len(table) - len(successes)
        assert [row["key"] for row in table] == sorted(row["key"] for row in table)

        members = tar_members(parquet.with_suffix(".tar"))
        by_key: dict[str, dict[str, bytes]] = {}
        for info, data in members:
            assert info.isreg() and info.mtime == TAR_MEMBER_MTIME and info.mode == 0o644
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
            key, extension = info.name.split(".")
            by_key.setdefault(key, {})[extension] = data
        assert list(by_key) == [row["key"] for row in successes]
        for row in table:
            if row["status"] != "success":
                assert row["error_message"] and row["sha256"] is None and row["width"] is None
                continue
            files = by_key[row["key"]]
            image = files.get("jpg", files.get("png"))
            assert image is not None and len(files) == 3
            meta = json.loads(files["json"])
            assert meta == {name: row[name] for name in meta}
            assert hashlib.sha256(image).hexdigest() == row["sha256"] == meta["sha256"]
            assert files["txt"].decode("utf-8") == row["caption"]


def test_uids_unique_and_splits_disjoint(small_pool: Path) -> None:
    uids: list[str] = []
    hashes: dict[str, set[str]] = {}
    for split in SPLITS:
        split_rows = rows(small_pool / split)
        uids += [row["uid"] for row in split_rows]
        hashes[split] = {row["sha256"] for row in split_rows if row["sha256"]}
    assert all(UID.match(uid) for uid in uids)
    assert len(set(uids)) == len(uids)
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            assert not hashes[first] & hashes[second], (first, second)


def test_ground_truth_covers_every_row(small_pool: Path) -> None:
    truth = pq.read_table(small_pool / "ground_truth.parquet").to_pylist()
    listed = {(row["split"], row["key"], row["uid"]) for row in truth}
    stored = {(split, row["key"], row["uid"]) for split in SPLITS for row in rows(small_pool / split)}
    assert listed == stored and len(truth) == len(stored)
    assert all(row["corruption"] == "clean" for row in truth if row["split"] != "pool")
    assert all(json.loads(row["attributes"]) for row in truth)


def test_reference_split_has_true_underspecified_captions(tmp_path: Path, small_pool: Path) -> None:
    """A share of reference captions are under-specified but true; images and other captions do not move."""
    truth = pq.read_table(small_pool / "ground_truth.parquet").to_pylist()
    details = Counter((row["split"], row["corruption_detail"]) for row in truth if row["split"] != "pool")
    assert set(details) == {("reference", None), ("reference", "underspecified"), ("target", None), ("eval", None)}
    assert 0 < details[("reference", "underspecified")] < 0.35 * 80  # 15% of 80 in expectation
    without = tmp_path / "without"
    build_demo_pool(DemoPoolConfig(out=without, seed=7, reference_underspecified_share=0.0, **SMALL))
    by_uid = {row["uid"]: row for row in rows(without / "reference")}
    underspecified = {row["uid"] for row in truth if row["corruption_detail"] == "underspecified"}
    for row in rows(small_pool / "reference"):
        original = by_uid[row["uid"]]
        assert (row["key"], row["sha256"]) == (original["key"], original["sha256"])
        if row["uid"] in underspecified:
            assert row["caption"] != original["caption"] and len(row["caption"].split()) <= 7
            assert row["caption"] not in GENERIC_CAPTIONS
        else:
            assert row["caption"] == original["caption"]
    for split in ("pool", "target", "eval"):
        assert tree_bytes(small_pool / split) == tree_bytes(without / split), split


def test_target_split_has_only_target_domains(small_pool: Path) -> None:
    truth = pq.read_table(small_pool / "ground_truth.parquet").to_pylist()
    target_domains = Counter(row["domain"] for row in truth if row["split"] == "target")
    assert set(target_domains) == {"shapes", "glyphs"}
    assert len({row["domain"] for row in truth if row["split"] == "reference"}) == 4


def test_eval_labels_are_balanced(small_pool: Path) -> None:
    classes = json.loads((small_pool / "eval_classes.json").read_text())
    assert classes == {task: list(names) for task, names in EVAL_TASKS.items()}
    labels = pq.read_table(small_pool / "eval_labels.parquet").to_pylist()
    stored = {(row["key"], row["uid"]) for row in rows(small_pool / "eval")}
    assert {(row["key"], row["uid"]) for row in labels} == stored
    per_task = Counter(row["task"] for row in labels)
    assert max(per_task.values()) - min(per_task.values()) <= 1
    for task in per_task:
        per_class = Counter(row["label"] for row in labels if row["task"] == task)
        assert set(per_class) <= set(classes[task])
        assert max(per_class.values()) - min(per_class.values()) <= 1


def test_corruption_shares_match_rates(rates_pool: Path) -> None:
    truth = [row for row in pq.read_table(rates_pool / "ground_truth.parquet").to_pylist() if row["split"] == "pool"]
    counts = Counter(row["corruption"] for row in truth)
    rates = CorruptionRates()
    assert set(counts) == {kind.value for kind in RATE_KINDS}  # no eval split, so no eval copies
    for kind in CorruptionKind:
        assert abs(counts[kind.value] / len(truth) - rates.rate(kind)) <= 0.5 / len(truth) + 1e-9, kind
    assert counts == {kind.value: count for kind, count in exact_counts(rates, len(truth)).items()}


def test_corruptions_look_like_what_they_claim(rates_pool: Path) -> None:
    truth = {row["key"]: row for row in pq.read_table(rates_pool / "ground_truth.parquet").to_pylist()}
    stored = {row["key"]: row for row in rows(rates_pool / "pool")}
    images: dict[str, bytes] = {}
    for tar in sorted((rates_pool / "pool").glob("*.tar")):
        for info, data in tar_members(tar):
            key, extension = info.name.split(".")
            if extension in ("jpg", "png"):
                images[key] = data
    by_uid = {row["uid"]: key for key, row in stored.items()}
    languages, flavours = Counter(), Counter()
    for key, row in truth.items():
        kind, sample = row["corruption"], stored[key]
        if kind == "failed_download":
            assert key not in images and sample["status"] == "failed_to_download"
            continue
        data = images[key]
        if kind == "undecodable":
            with pytest.raises((OSError, SyntaxError)):  # UnidentifiedImageError is an OSError
                Image.open(io.BytesIO(data)).load()
            continue
        image = Image.open(io.BytesIO(data))
        image.load()
        if kind == "tiny":
            assert max(image.size) <= 120
        elif kind == "extreme_aspect":
            assert max(image.size) / min(image.size) > 4
        elif kind in ("exact_duplicate", "near_duplicate"):
            original = stored[by_uid[row["duplicate_group"]]]
            assert truth[original["key"]]["corruption"] == "clean"
            assert truth[original["key"]]["duplicate_group"] == original["uid"]
            same = (sample["sha256"], sample["caption"]) == (original["sha256"], original["caption"])
            assert same == (kind == "exact_duplicate")
        elif kind == "misaligned":
            assert sample["caption"] == stored[by_uid[row["corruption_detail"]]]["caption"]
        elif kind == "non_english":
            languages[row["language"]] += 1
        elif kind == "generic_caption":
            flavours[row["corruption_detail"]] += 1
            if row["corruption_detail"] == "boilerplate":
                assert row["language"] is None
                assert sample["caption"] in GENERIC_CAPTIONS or FILE_NAME.match(sample["caption"]), sample["caption"]
            else:
                assert row["language"] == "en" and sample["caption"] not in GENERIC_CAPTIONS
                assert len(sample["caption"].split()) <= 7
        elif kind == "clean":
            assert len(sample["caption"].split()) > 2 and row["language"] == "en"
    assert set(languages) == {"de", "fr", "es"}
    assert set(flavours) == {"boilerplate", "underspecified"}
    assert 0.2 < flavours["boilerplate"] / flavours.total() < 0.6


def test_underspecified_captions_are_true_of_the_image_and_fit_many() -> None:
    """An under-specified caption names at most one of the sample's attributes, and only true ones."""
    rng = np.random.default_rng(0)
    seen: dict[str, set[str]] = {}
    for domain in DOMAINS:
        for _ in range(200):
            attributes = sample_attributes(domain, rng)
            caption = underspecified_caption(attributes, rng)
            seen.setdefault(caption, set()).add(domain)
            if caption.endswith(" background"):  # the one attribute named (if any) is the background
                assert caption.endswith((f" on a {attributes.background} background", " on a background"))
                continue
            words = [{"gray": "grey", "violet": "purple"}.get(word, word) for word in caption.split()]
            colours = {getattr(attributes, name, None) for name in ("colour", "foreground", "background")}
            assert all(word in colours for word in words if word in COLOURS), (caption, attributes)
    assert all(len(domains) == 1 for domains in seen.values())  # on-topic: never shared across domains
    assert len(seen) > 40
    assert sum(caption in seen for caption in GENERIC_CAPTIONS) == 0


def test_non_english_captions_are_detectable(rates_pool: Path) -> None:
    py3langid = pytest.importorskip("py3langid")
    truth = pq.read_table(rates_pool / "ground_truth.parquet").to_pylist()
    captions = {row["key"]: row["caption"] for row in rows(rates_pool / "pool")}
    foreign = [row for row in truth if row["corruption"] == "non_english"]
    detected = sum(py3langid.classify(captions[row["key"]])[0] == row["language"] for row in foreign)
    assert detected >= 0.9 * len(foreign)


def test_writer_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="killed"), Img2DatasetShardWriter(tmp_path, 0, 4) as writer:
        writer.add_success(
            uid="0" * 32, url="https://x.invalid/a.jpg", caption="a red square", image=b"\xff\xd8",
            image_format="jpg", width=1, height=1,
        )
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="add up"):
        CorruptionRates(misaligned=0.9, generic_caption=0.2)
    with pytest.raises(ValueError, match="target_domains"):
        DemoPoolConfig(out=tmp_path, target_domains=("faces",))
    with pytest.raises(ValueError, match="reference_underspecified_share"):
        DemoPoolConfig(out=tmp_path, reference_underspecified_share=1.5)
    with pytest.raises(ValueError, match="eval_copy_rate"):
        DemoPoolConfig(out=tmp_path, eval_copy_rate=-0.1)
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_demo_pool(DemoPoolConfig(out=tmp_path, shards=1, samples_per_shard=5))


def split_images(directory: Path) -> dict[str, bytes]:
    """Image bytes of a split's successful samples, by key."""
    images = {}
    for tar in sorted(directory.glob("*.tar")):
        for info, data in tar_members(tar):
            key, extension = info.name.split(".")
            if extension in ("jpg", "png"):
                images[key] = data
    return images


def thumbnail(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def test_eval_copy_count_follows_the_rate(tmp_path: Path) -> None:
    assert DemoPoolConfig(out=tmp_path).eval_copies_wanted == 8  # default: ceil(0.004 x 4 x 500)
    assert DemoPoolConfig(out=tmp_path, shards=2, samples_per_shard=150).eval_copies_wanted == 2
    assert DemoPoolConfig(out=tmp_path, **SMALL).eval_copies_wanted == 1  # ceil(0.48)
    assert DemoPoolConfig(out=tmp_path, eval_samples=0).eval_copies_wanted == 0
    assert DemoPoolConfig(out=tmp_path, eval_copy_rate=0.0).eval_copies_wanted == 0
    assert DemoPoolConfig(out=tmp_path, eval_copy_rate=1.0, eval_samples=30).eval_copies_wanted == 30
    assert CorruptionRates().rate(CorruptionKind.EVAL_COPY) == 0.0
    assert CORRUPTION_KINDS[-1] is CorruptionKind.EVAL_COPY and RATE_KINDS == CORRUPTION_KINDS[:-1]


def test_eval_copies_convert_only_unborrowed_clean_samples(tmp_path: Path) -> None:
    """The default plan: 8 copies of distinct eval samples, taken from clean samples nothing borrows from."""
    config = DemoPoolConfig(out=tmp_path)
    before = CorruptionPlan.assign(config.rates, config.pool_samples, stream_rng(config.seed, "pool", Stream.PLAN))
    plan = _plan_splits(config)[0].corruptions
    assert plan is not None
    copy, clean = CORRUPTION_KINDS.index(CorruptionKind.EVAL_COPY), CORRUPTION_KINDS.index(CorruptionKind.CLEAN)
    converted = np.flatnonzero(plan.kinds != before.kinds)
    assert converted.size == 8 and (plan.kinds[converted] == copy).all() and (before.kinds[converted] == clean).all()
    assert not np.isin(converted, before.sources).any() and not before.duplicated[converted].any()
    eval_indices = plan.sources[converted]
    assert len(set(eval_indices.tolist())) == 8 and ((eval_indices >= 0) & (eval_indices < config.eval_samples)).all()
    unchanged = np.ones(config.pool_samples, dtype=bool)
    unchanged[converted] = False
    assert (plan.sources[unchanged] == before.sources[unchanged]).all()
    assert (plan.duplicated == before.duplicated).all()
    # Capped by what is available: every clean sample nothing borrows from, and no more.
    everything = before.with_eval_copies(config.pool_samples, config.pool_samples, np.random.default_rng(0))
    available = (before.kinds == clean) & ~np.isin(np.arange(config.pool_samples), before.sources) & ~before.duplicated
    assert int((everything.kinds == copy).sum()) == int(available.sum())


def test_pool_holds_labelled_eval_copies(small_pool: Path, eval_copy_pool: Path) -> None:
    for pool, expected in ((small_pool, 1), (eval_copy_pool, math.ceil(0.05 * 120))):
        truth = pq.read_table(pool / "ground_truth.parquet").to_pylist()
        eval_rows = {row["uid"]: row for row in truth if row["split"] == "eval"}
        copies = [row for row in truth if row["corruption"] == "eval_copy"]
        assert len(copies) == expected
        assert all(row["split"] == "pool" for row in copies)
        assert len({row["corruption_detail"] for row in copies}) == expected  # distinct eval samples
        for row in copies:
            original = eval_rows[row["corruption_detail"]]
            assert (row["attributes"], row["domain"]) == (original["attributes"], original["domain"])
            assert row["duplicate_group"] is None and row["language"] == "en"
        manifest = json.loads((pool / "demo_pool.json").read_text())
        assert manifest["splits"]["pool"]["corruptions"]["eval_copy"] == expected
        assert manifest["splits"]["eval"]["corruptions"]["eval_copy"] == 0
        assert "eval_copy_rate" in manifest["config"]


def test_eval_copies_look_like_their_eval_image(eval_copy_pool: Path) -> None:
    truth = pq.read_table(eval_copy_pool / "ground_truth.parquet").to_pylist()
    stored = {row["uid"]: row for split in ("pool", "eval") for row in rows(eval_copy_pool / split)}
    pool_images, eval_images = split_images(eval_copy_pool / "pool"), split_images(eval_copy_pool / "eval")
    eval_thumbnails = {row["uid"]: thumbnail(eval_images[row["key"]]) for row in truth if row["split"] == "eval"}
    copies = [row for row in truth if row["corruption"] == "eval_copy"]
    assert copies
    for row in copies:
        copy, original = stored[row["uid"]], stored[row["corruption_detail"]]
        assert copy["sha256"] != original["sha256"] and pool_images[row["key"]] != eval_images[original["key"]]
        assert copy["caption"] != original["caption"]
        assert copy["url"].endswith(".jpg") and pool_images[row["key"]][:2] == b"\xff\xd8"
        image = thumbnail(pool_images[row["key"]])
        own = np.abs(image - eval_thumbnails[original["uid"]]).mean()
        others = [np.abs(image - other).mean() for uid, other in eval_thumbnails.items() if uid != original["uid"]]
        assert own < min(others) and own < 0.5 * float(np.median(others)), (own, min(others), np.median(others))


def test_eval_copies_move_no_other_sample(no_eval_copy_pool: Path, small_pool: Path, eval_copy_pool: Path) -> None:
    """Only the converted samples differ from the pool without eval copies; the other splits not at all."""
    expected_truth = pq.read_table(no_eval_copy_pool / "ground_truth.parquet").to_pylist()
    expected_rows = rows(no_eval_copy_pool / "pool")
    expected_images = split_images(no_eval_copy_pool / "pool")
    for pool in (small_pool, eval_copy_pool):
        truth = pq.read_table(pool / "ground_truth.parquet").to_pylist()
        converted = {row["uid"] for row in truth if row["corruption"] == "eval_copy"}
        assert converted
        assert len(truth) == len(expected_truth)
        differing = {row["uid"] for row, before in zip(truth, expected_truth, strict=True) if row != before}
        assert differing == converted
        assert all(before["corruption"] == "clean" for before in expected_truth if before["uid"] in converted)
        pool_rows = rows(pool / "pool")
        assert [row["key"] for row in pool_rows] == [row["key"] for row in expected_rows]
        assert {row["uid"] for row, before in zip(pool_rows, expected_rows, strict=True) if row != before} <= converted
        keys = {row["key"] for row in pool_rows if row["uid"] in converted}
        images = split_images(pool / "pool")
        assert {key: data for key, data in images.items() if key not in keys} == {
            key: data for key, data in expected_images.items() if key not in keys
        }
        for split in ("reference", "target", "eval"):
            assert tree_bytes(pool / split) == tree_bytes(no_eval_copy_pool / split), split
