"""Exact duplicates (curation_platform.dedup.exact) on the validated demo pool, measured against its ground truth."""

from __future__ import annotations

import itertools
from pathlib import Path

import polars as pl
import pytest

from curation_platform.dedup import ExactDuplicateIndex, caption_key, normalise_caption
from curation_platform.dedup.exact import GROUPS_SCHEMA
from curation_platform.storage import S3Settings
from tests.helpers.s3 import S3_BUCKET


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory, demo_pool_dir: Path) -> dict[str, pl.DataFrame]:
    """Shard name -> accepted samples of ``demo_pool_dir``'s pool, ingested exactly as ``scored_demo`` does
    (``ingest_shard`` + ``write_ingestion``, default limits) but without training its teacher."""
    from curation_platform.ingest import ingest_shard, write_ingestion
    from curation_platform.pool import discover_shards

    root = tmp_path_factory.mktemp("dedup-validated")
    for shard in discover_shards(str(demo_pool_dir / "pool")):
        write_ingestion(ingest_shard(shard), str(root))
    shards = {}
    for path in sorted((root / "samples").glob("*.parquet")):
        samples = pl.read_parquet(path)
        (name,) = samples.get_column("shard").unique().to_list()
        shards[name] = samples
    assert len(shards) == 2
    return shards


@pytest.fixture(scope="module")
def truth(demo_pool_dir: Path) -> pl.DataFrame:
    return pl.read_parquet(demo_pool_dir / "ground_truth.parquet").filter(pl.col("split") == "pool")


def _index(path: Path, shards: dict[str, pl.DataFrame], order: list[str]) -> ExactDuplicateIndex:
    index = ExactDuplicateIndex(str(path))
    for name in order:
        index.add_shard(name, shards[name])
    return index


def _pairs(groups: pl.DataFrame) -> set[frozenset[str]]:
    pairs: set[frozenset[str]] = set()
    for members in groups.group_by("group_id").agg("uid").get_column("uid").to_list():
        pairs.update(frozenset(pair) for pair in itertools.combinations(members, 2))
    return pairs


def _reference_groups(shards: dict[str, pl.DataFrame], kind: str) -> pl.DataFrame:
    """Groups computed all at once from the concatenated samples, without the index."""
    samples = pl.concat([frame.select("uid", "shard", "image_sha256", "caption") for frame in shards.values()])
    keyed = samples.with_columns(
        pl.col("caption").map_elements(caption_key, return_dtype=pl.String).alias("caption_key")
    )
    column = {"image": "image_sha256", "caption": "caption_key"}[kind]
    return (
        keyed.filter(pl.col(column).is_not_null())
        .filter(pl.len().over(column) >= 2)
        .select(pl.col(column).alias("group_id"), "uid", "shard", pl.lit(kind).alias("kind"))
        .sort("group_id", "shard", "uid")
    )


def test_normalise_caption() -> None:
    assert normalise_caption("  A red\tCIRCLE.  ") == "a red circle"
    assert normalise_caption("\u201ca red circle!\u201d") == "a red circle"
    assert normalise_caption("Ａ ｒｅｄ\u00a0circle") == "a red circle"  # full-width letters, no-break space (NFKC)
    assert normalise_caption("Straße") == normalise_caption("STRASSE") == "strasse"  # casefold
    assert normalise_caption("a red, circle") == "a red, circle"  # inner punctuation is kept
    assert normalise_caption("...!? ") == ""
    assert caption_key("...") is None
    assert caption_key("A red circle.") == caption_key("a  red circle")
    assert caption_key("a red circle") != caption_key("a red square")


def test_image_exact_duplicates_match_ground_truth(tmp_path: Path, validated: dict[str, pl.DataFrame],
                                                   truth: pl.DataFrame) -> None:
    index = _index(tmp_path / "index", validated, sorted(validated))
    groups = index.groups("image")
    assert groups.schema == pl.Schema(GROUPS_SCHEMA)
    accepted = set(pl.concat(validated.values()).get_column("uid").to_list())

    # True exact pairs: each clean original with its exact copies (and the copies among themselves), both accepted.
    exact = truth.filter(pl.col("corruption") == "exact_duplicate")
    members: dict[str, set[str]] = {}
    for uid, source in exact.select("uid", "duplicate_group").iter_rows():
        members.setdefault(source, {source}).add(uid)
    true_pairs = {frozenset(pair) for group in members.values()
                  for pair in itertools.combinations(sorted(group & accepted), 2)}
    surviving = exact.filter(pl.col("uid").is_in(accepted) & pl.col("duplicate_group").is_in(accepted)).height

    predicted = _pairs(groups)
    hits = len(predicted & true_pairs)
    precision = hits / len(predicted)
    recall = hits / len(true_pairs)
    print(f"\nexact_duplicate rows {exact.height}, surviving ingestion with their source {surviving}; "
          f"true pairs {len(true_pairs)}, predicted pairs {len(predicted)}: "
          f"precision {precision:.3f}, recall {recall:.3f}")
    assert surviving >= 5 and true_pairs
    assert recall == 1.0
    assert precision == 1.0  # the demo's images are rendered per sample: no two distinct samples share bytes

    # Near duplicates are re-encoded copies: never the same sha256 as their source, never in its group.
    sha = dict(pl.concat(validated.values()).select("uid", "image_sha256").iter_rows())
    near = truth.filter((pl.col("corruption") == "near_duplicate") & pl.col("uid").is_in(accepted)
                        & pl.col("duplicate_group").is_in(accepted))
    print(f"near_duplicate rows {truth.filter(pl.col('corruption') == 'near_duplicate').height}, "
          f"{near.height} accepted with their source, sharing sha256: "
          f"{sum(sha[uid] == sha[src] for uid, src in near.select('uid', 'duplicate_group').iter_rows())}")
    assert near.height > 0
    for uid, source in near.select("uid", "duplicate_group").iter_rows():
        assert sha[uid] != sha[source]
        assert frozenset((uid, source)) not in predicted

    # Exact copies also carry the source's caption, so each true pair is a caption pair too.
    assert true_pairs <= _pairs(index.groups("caption"))
    assert any(len(set(frame.get_column("shard"))) > 1 for _, frame in groups.group_by("group_id"))  # across shards


def test_groups_do_not_depend_on_arrival_order(tmp_path: Path, validated: dict[str, pl.DataFrame]) -> None:
    names = sorted(validated)
    forward = ExactDuplicateIndex(str(tmp_path / "forward"))
    for count, name in enumerate(names, start=1):
        forward.add_shard(name, validated[name])
        partial = {key: validated[key] for key in names[:count]}
        for kind in ("image", "caption"):
            assert forward.groups(kind).equals(_reference_groups(partial, kind))  # incremental state is exact
    backward = _index(tmp_path / "backward", validated, names[::-1])
    for kind in ("image", "caption"):
        all_at_once = _reference_groups(validated, kind)
        assert not all_at_once.is_empty()
        assert forward.groups(kind).equals(all_at_once)
        assert backward.groups(kind).equals(all_at_once)
    for forward_file, backward_file in zip(forward.files(), backward.files(), strict=True):
        assert Path(forward_file).read_bytes() == Path(backward_file).read_bytes()


def test_add_shard_is_idempotent(tmp_path: Path, validated: dict[str, pl.DataFrame]) -> None:
    names = sorted(validated)
    index = _index(tmp_path / "index", validated, names)
    files = {uri: (Path(uri).read_bytes(), Path(uri).stat().st_mtime_ns) for uri in index.files()}
    before = {kind: index.groups(kind) for kind in ("image", "caption")}
    for name in names:
        index.add_shard(name, validated[name].to_arrow())  # same content as a pyarrow table, shuffled order
        index.add_shard(name, validated[name].sample(fraction=1.0, shuffle=True, seed=3))
    assert {uri: (Path(uri).read_bytes(), Path(uri).stat().st_mtime_ns) for uri in index.files()} == files
    assert all(index.groups(kind).equals(frame) for kind, frame in before.items())

    # Re-adding a shard with other content replaces its rows, leaving nothing of the old ones.
    first = names[0]
    in_groups = set(before["image"].filter(pl.col("shard") == first).get_column("uid"))
    index.add_shard(first, validated[first].filter(~pl.col("uid").is_in(in_groups)))
    assert index.groups("image").filter(pl.col("shard") == first).is_empty()
    assert len(index.files()) == len(names)
    index.add_shard(first, validated[first])
    assert index.groups("image").equals(before["image"])


def test_duplicates_of_a_new_shard(tmp_path: Path, validated: dict[str, pl.DataFrame]) -> None:
    old, new = sorted(validated)
    index = _index(tmp_path / "index", validated, [old])
    found = index.duplicates_of(new, validated[new])
    assert found.columns == ["uid", "matches_uid", "kind"]

    expected = []
    for kind, column in (("image", "image_sha256"), ("caption", "caption_key")):
        frames = [frame.select("uid", "caption", "image_sha256").with_columns(
            pl.col("caption").map_elements(caption_key, return_dtype=pl.String).alias("caption_key"))
            for frame in (validated[new], validated[old])]
        expected.append(frames[0].drop_nulls(column).join(frames[1].drop_nulls(column), on=column)
                        .select("uid", pl.col("uid_right").alias("matches_uid"), pl.lit(kind).alias("kind")))
    expected_frame = pl.concat(expected).unique().sort("uid", "kind", "matches_uid")
    assert found.filter(pl.col("kind") == "image").height > 0  # the demo has cross-shard exact copies
    assert found.equals(expected_frame)

    # The image matches are exactly the cross-shard image groups once the new shard is indexed.
    index.add_shard(new, validated[new])
    groups = index.groups("image")
    cross = {frozenset(pair) for pair in _pairs(groups)
             if len(set(groups.filter(pl.col("uid").is_in(list(pair))).get_column("shard"))) == 2}
    assert cross == {frozenset(row) for row in found.filter(pl.col("kind") == "image")
                     .select("uid", "matches_uid").iter_rows()}
    assert index.duplicates_of(new, validated[new]).equals(found)  # its own file is left out
    assert ExactDuplicateIndex(str(tmp_path / "empty")).duplicates_of(new, validated[new]).is_empty()


@pytest.mark.s3
def test_index_on_s3_matches_local(tmp_path: Path, s3_server: S3Settings, validated: dict[str, pl.DataFrame]) -> None:
    names = sorted(validated)
    local = _index(tmp_path / "index", validated, names)
    remote = ExactDuplicateIndex(f"s3://{S3_BUCKET}/dedup/exact", s3=s3_server)
    assert remote.groups("image").is_empty()
    for name in names:
        remote.add_shard(name, validated[name])
    assert len(remote.files()) == len(names)
    for kind in ("image", "caption"):
        assert remote.groups(kind).equals(local.groups(kind))
    assert remote.duplicates_of(names[1], validated[names[1]]).equals(local.duplicates_of(names[1],
                                                                                        validated[names[1]]))
