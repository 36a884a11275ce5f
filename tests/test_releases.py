"""Releases: recipes validate, releases are reproducible, verifiable, atomic and derivable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation_platform.releases import (
    RecipeError,
    ReleaseOptions,
    ReleaseSources,
    create_release,
    derive_release,
    diff_releases,
    list_releases,
    parse_recipe,
    read_samples,
    subset_array,
    subset_uids,
    verify_release,
)
from curation_platform.releases.artefacts import CHECKSUMS, SAMPLES, SUBSET
from tests.helpers.recipes import NEGCLIP_NORMSIM

WEIGHTED = """
name = "weighted"
max_size = 50
rank_by = "clip_score"

[[stage]]
type = "intersection"
stages = [{type = "top_fraction", score = "clip_score", fraction = 0.5},
          {type = "threshold", score = "kl_text", min = 0.0}]

[weights]
prompt = "circles squares and triangles"
mode = "clipped"
clip_at = 3.0
"""


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\n[[stage]]\ntype = 'top_fraction'\nscore = 'clip_scor'\nfraction = 0.3", "unknown score 'clip_scor'"),
    ("name = 'x'\n[[stage]]\ntype = 'top_fraction'\nscore = 'clip_score'\nfraction = 1.5", "fraction must be in (0, 1]"),
    ("name = 'x'\n[[stage]]\ntype = 'shuffle'", "type must be one of"),
    ("name = 'X Y'\n[[stage]]\ntype = 'basic_filter'", "name must match"),
    ("name = 'x'", "give at least one [[stage]]"),
    ("name = 'x'\n[[stage]]\ntype = 'basic_filter'\n[weights]\nprompt = 'p'\nmode = 'sqrt'", "mode must be one of"),
    ("name = 'x'\nmax_size = 5\n[[stage]]\ntype = 'basic_filter'", "max_size needs rank_by"),
    ("name = 'x'\n[[stage]]\ntype = 'threshold'\nscore = 'clip_score'", "give min, max or both"),
    ("name = [", "not valid TOML"),
])
def test_recipes_are_validated_with_clear_errors(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_recipe(text)


def test_yaml_recipes_parse_like_toml() -> None:
    recipe = parse_recipe("name: y\nstage:\n  - type: top_fraction\n    score: kl_text\n    fraction: 0.25\n",
                          yaml_syntax=True)
    assert recipe.scores_used() == ["kl_text"] and not recipe.needs_target()


def test_subset_round_trips_datacomp_uid_encoding() -> None:
    uids = ["ffffffffffffffff0000000000000001", "0123456789abcdef0123456789abcdef", "00000000000000010000000000000000"]
    subset = subset_array(uids)
    assert subset.dtype == np.dtype("u8,u8") and subset.tolist() == sorted(subset.tolist())
    # DataComp's documented encoding: (int(uid[:16], 16), int(uid[16:32], 16)) per sample
    assert set(subset.tolist()) == {(int(uid[:16], 16), int(uid[16:32], 16)) for uid in uids}
    assert sorted(subset_uids(subset)) == sorted(uids)
    raw = np.random.default_rng(0).bytes(16 * 1000)
    random_uids = [raw[i:i + 16].hex() for i in range(0, len(raw), 16)]
    assert subset_array(random_uids).tolist() == sorted((int(u[:16], 16), int(u[16:], 16)) for u in random_uids)
    for malformed in ("0" * 31, "0" * 33, "g" * 32, "0" * 30 + "-1"):
        with pytest.raises(ValueError, match="32 hexadecimal digits"):
            subset_array([uids[0], malformed])


def test_scores_from_mixed_references_are_refused(tmp_path: Path, sources: ReleaseSources) -> None:
    import shutil

    from curation_platform import lance_tables

    lance = tmp_path / "lance"
    shutil.copytree(sources.lance_uri, lance)
    table = lance_tables.connect(str(lance)).open_table("scores")
    one_shard = table.to_lance().to_table(columns=["shard"], limit=1).column("shard")[0].as_py()
    table.update(where=f"shard = '{one_shard}'", values={"reference_id": "an-older-reference"})
    stale = ReleaseSources(str(lance), sources.validated_uri, sources.teacher_id)
    with pytest.raises(RecipeError, match=r"differ in \['reference_id'\]: re-score"):
        create_release(parse_recipe(NEGCLIP_NORMSIM), stale, str(tmp_path / "releases"))
    assert not (tmp_path / "releases").exists()


def test_large_pool_reports_draw_a_uid_sample_and_select_from_every_row(tmp_path: Path, sources: ReleaseSources,
                                                                          monkeypatch) -> None:
    from curation_platform.releases import inputs

    recipe = parse_recipe(NEGCLIP_NORMSIM)
    whole = create_release(recipe, sources, str(tmp_path / "whole"))
    monkeypatch.setattr(inputs, "REPORT_MAX_ROWS", whole.manifest["pool_rows"] // 4)
    sampled = create_release(recipe, sources, str(tmp_path / "sampled"))
    for name in (SAMPLES, SUBSET):  # selection reads every row whatever the report draws
        assert (Path(whole.uri) / name).read_bytes() == (Path(sampled.uri) / name).read_bytes(), name
    report = (Path(sampled.uri) / "report" / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("| figures_from |"))
    drawn = int(line.split("a uniform sample of ")[1].split(" pool rows")[0].replace(",", ""))
    assert abs(drawn - whole.manifest["pool_rows"] / 4) < 60 and "figures_from" not in (
        Path(whole.uri) / "report" / "report.md").read_text()
    assert verify_release(sampled.uri).ok


def test_release_is_reproducible_verifiable_and_far_cleaner_than_the_pool(tmp_path: Path, sources: ReleaseSources,
                                                                        scored_demo: dict) -> None:
    recipe = parse_recipe(NEGCLIP_NORMSIM)
    labels = scored_demo["truth"].select("uid", pl.col("corruption").alias("label"))
    first = create_release(recipe, sources, str(tmp_path / "releases"), ReleaseOptions(labels=labels))
    second = create_release(recipe, sources, str(tmp_path / "releases"))
    assert (first.version, second.version) == (1, 2)
    for name in (SAMPLES, SUBSET):
        assert (Path(first.uri) / name).read_bytes() == (Path(second.uri) / name).read_bytes(), name
    manifest = first.manifest
    pool = manifest["pool_rows"]
    assert [stage["rows"] for stage in manifest["funnel"]] == [pool, int(0.3 * pool), int(0.2 * pool)]
    assert manifest["recipe"]["text"] == NEGCLIP_NORMSIM and manifest["target_id"] and manifest["git_commit"]
    assert set(manifest["lancedb_tables"]) >= {"scores", "reference_sets", "target_sets"}
    subset = np.load(Path(first.uri) / SUBSET)
    samples = read_samples(first)
    assert sorted(subset_uids(subset)) == samples["uid"].to_list() and samples.columns[-1] == "weight"

    # The release keeps far fewer misaligned captions than the pool has (ground truth never used to select).
    truth = scored_demo["truth"].select("uid", "corruption")
    pool_share = (truth.join(pl.from_arrow(_scored_uids(scored_demo)), on="uid")["corruption"] == "misaligned").mean()
    release_share = (samples.join(truth, on="uid")["corruption"] == "misaligned").mean()
    assert pool_share > 0.05 and release_share < pool_share / 3
    report = (Path(first.uri) / "report" / "report.md").read_text()
    assert "| misaligned |" in report and "figures/funnel.png" in report

    assert verify_release(first.uri).ok
    (Path(first.uri) / "report" / "report.md").write_text(report + "tampered\n")
    tampered = verify_release(first.uri, rederive=False)
    assert not tampered.ok and tampered.mismatched == ["report/report.md"]

    # A changed uid set whose checksums were regenerated is caught by re-derivation.
    other = Path(second.uri)
    changed = read_samples(second).head(-1)
    changed.write_parquet(other / SAMPLES)
    lines = [line for line in (other / CHECKSUMS).read_text().splitlines() if not line.endswith(f"  {SAMPLES}")]
    import hashlib
    lines.append(f"{hashlib.sha256((other / SAMPLES).read_bytes()).hexdigest()}  {SAMPLES}")
    (other / CHECKSUMS).write_text("\n".join(sorted(lines, key=lambda line: line.split('  ')[1])) + "\n")
    rederived = verify_release(second.uri)
    assert not rederived.ok and rederived.uids_identical is False and rederived.uids_removed == 1


def test_release_report_has_ingestion_checks_provenance_and_labels(tmp_path: Path, sources: ReleaseSources,
                                                                  scored_demo: dict) -> None:
    """report.md and report.html of a real release: the ingestion funnel summed over the input shards'
    validation reports, the recorded check results, the provenance and the evaluation-label composition."""
    from curation_platform.layout import ShardOutputs

    labels = scored_demo["truth"].select("uid", pl.col("corruption").alias("label"))
    checks = {"pool_validates": "SUCCEEDED", "scores_complete": "FAILED", "duplicates_resolved": "SUCCEEDED"}
    created = create_release(parse_recipe(NEGCLIP_NORMSIM), sources, str(tmp_path / "releases"),
                             ReleaseOptions(run_id="run-1234", checks=checks, labels=labels))
    manifest = created.manifest
    shards = [entry["shard"] for entry in manifest["input_shards"]]
    reports = [json.loads(Path(ShardOutputs.of(sources.validated_uri, shard).report).read_text()) for shard in shards]
    samples, accepted = sum(r["total"] for r in reports), sum(r["accepted"] for r in reports)
    reasons: dict[str, int] = {}
    for report in reports:
        for reason, count in report["by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    assert len(shards) == 2 and samples == 300 and reasons  # the demo pool has corrupt samples to quarantine

    markdown = (Path(created.uri) / "report" / "report.md").read_text(encoding="utf-8")
    page = (Path(created.uri) / "report" / "report.html").read_text(encoding="utf-8")
    order = [markdown.index(f"## {name}\n") for name in ("Release", "Provenance", "Data-quality checks", "Ingestion",
                                                         "Funnel", "Evaluation labels (never used for selection)")]
    assert order == sorted(order)
    ingestion = markdown[markdown.index("## Ingestion"):markdown.index("## Funnel")]
    assert "in 2 shards" in ingestion and "do not reconcile" not in ingestion and "no validation report" not in ingestion
    assert f"| samples in the shards | {samples:,} | 100.0% |" in ingestion
    assert f"| accepted into the pool | {accepted:,} |" in ingestion
    assert "<td>samples in the shards</td>" in page and f"<td>accepted into the pool</td><td>{accepted:,}</td>" in page
    for reason, count in reasons.items():
        label = "not downloaded" if reason == "not_downloaded" else f"quarantined: {reason}"
        assert f"| {label} | {count:,} |" in ingestion and f"<td>{label}</td><td>{count:,}</td>" in page
    assert "3 checks: 1 FAILED, 2 SUCCEEDED." in markdown and "3 checks: 1 FAILED, 2 SUCCEEDED." in page
    for name, status in checks.items():
        assert f"| {name} | {status} |" in markdown and f"<td>{name}</td><td>{status}</td>" in page
    for key in ("git_commit", "created_at", "package_version", "run_id"):
        assert f"| {key} | {manifest[key]} |" in markdown and f"<td>{key}</td><td>{manifest[key]}</td>" in page
    assert manifest["run_id"] == "run-1234" and manifest["git_commit"]
    scored = sum(entry["samples"] for entry in manifest["input_shards"])
    assert f"| input shards | 2 ({scored:,} scored samples) |" in markdown
    assert "| misaligned |" in markdown and "<h2>Evaluation labels (never used for selection)</h2>" in page
    assert "<td>misaligned</td>" in page and "<td>unlabelled</td>" not in page  # every pool uid has its label
    assert verify_release(created.uri, rederive=False).ok


def _scored_uids(scored_demo: dict):
    from curation_platform.scoring.run import read_scores

    return read_scores(scored_demo["lance"], scored_demo["teacher"].teacher_id, columns=["uid"])


def test_a_crash_mid_write_leaves_no_release(tmp_path: Path, sources: ReleaseSources) -> None:
    releases = tmp_path / "releases"

    def crash() -> None:
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        create_release(parse_recipe(NEGCLIP_NORMSIM), sources, str(releases), ReleaseOptions(fail_before_publish=crash))
    assert list_releases(str(releases)) == []
    assert not (releases / "negclip-normsim").exists() or not any(
        path.name.isdigit() for path in (releases / "negclip-normsim").iterdir())
    after = create_release(parse_recipe(NEGCLIP_NORMSIM), sources, str(releases))
    assert after.version == 1 and verify_release(after.uri).ok


def test_derive_excludes_exactly_the_listed_uids_and_records_lineage(tmp_path: Path, sources: ReleaseSources) -> None:
    releases = str(tmp_path / "releases")
    parent = create_release(parse_recipe(WEIGHTED), sources, releases)
    parent_samples = read_samples(parent)
    assert parent_samples.height == 50 and parent_samples["weight"].max() <= 3.0
    excluded = parent_samples["uid"].to_list()[:7] + ["f" * 32]  # one uid that was never in the release
    child = derive_release(parent.uri, excluded, releases)
    child_samples = read_samples(child)
    assert set(child_samples["uid"]) == set(parent_samples["uid"]) - set(excluded)
    assert child.manifest["parent"]["release_id"] == parent.release_id
    assert child.manifest["exclusions"]["count"] == len(excluded)
    assert child.manifest["lancedb_tables"] == {name: {**entry, "tag": f"release-weighted-{child.version}"}
                                                for name, entry in parent.manifest["lancedb_tables"].items()}
    assert verify_release(child.uri).ok
    diff = diff_releases(parent.uri, child.uri)
    assert (diff["added"], diff["removed"]) == (0, 7)
    assert [item.version for item in list_releases(releases)] == [1, 2]
    assert json.loads((Path(child.uri) / "manifest.json").read_text())["exclusions"]["sha256"]


def test_verify_fails_when_the_pinned_embeddings_version_is_gone(tmp_path: Path, sources: ReleaseSources) -> None:
    import datetime as dt
    import shutil

    import lance

    from curation_platform.embedding.sinks import EMBEDDINGS_TABLE

    lance_copy = tmp_path / "lance"
    shutil.copytree(sources.lance_uri, lance_copy)
    copied = ReleaseSources(str(lance_copy), sources.validated_uri, sources.teacher_id, sources.pool_uri)
    created = create_release(parse_recipe(NEGCLIP_NORMSIM), copied, str(tmp_path / "releases"))
    pinned = created.manifest["lancedb_tables"][EMBEDDINGS_TABLE]["version"]
    assert verify_release(created.uri).ok

    # Someone drops the tags (this release's, and other tests' on the copied table), rewrites the table and
    # cleans up old versions.
    dataset = lance.dataset(str(lance_copy / f"{EMBEDDINGS_TABLE}.lance"))
    assert f"release-{created.name}-{created.version}" in dataset.tags.list()
    for tag in list(dataset.tags.list()):
        dataset.tags.delete(tag)
    dataset.delete("uid = 'no such uid'")
    lance.write_dataset(dataset.to_table(), str(lance_copy / f"{EMBEDDINGS_TABLE}.lance"), mode="overwrite")
    lance.dataset(str(lance_copy / f"{EMBEDDINGS_TABLE}.lance")).cleanup_old_versions(
        older_than=dt.timedelta(0), delete_unverified=True)
    result = verify_release(created.uri)
    assert not result.ok and result.pins_missing == [f"{EMBEDDINGS_TABLE}@{pinned}"]
    assert result.uids_identical is None  # nothing is re-derived from tables that are not the pinned ones
