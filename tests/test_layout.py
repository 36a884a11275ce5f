"""One project layout: every path of a home comes from ``ProjectLayout``, and the README agrees."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg

from curation_platform.layout import ProjectLayout, ShardOutputs
from curation_platform_dagster.defs.resources import PlatformResource, ScoringResource, TeacherResource
from curation_platform_dagster.local_run import INSTANCE_FOLDER, main_job_definitions

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_home_entries() -> set[str]:
    text = README.read_text()
    table = text[text.index("| under the home |"):].split("\n\n", 1)[0]
    return {match for match in re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE)}


def test_readme_lists_exactly_the_layout_of_a_home(tmp_path: Path) -> None:
    layout = ProjectLayout.resolve(str(tmp_path), environ={})
    assert _readme_home_entries() == {*layout.folders(), f"{INSTANCE_FOLDER}/"}
    assert all(uri.startswith(str(tmp_path)) for uri in layout.folders().values())


def test_overrides_come_from_arguments_then_environment_then_defaults(tmp_path: Path) -> None:
    environ = {"CURATION_HOME": str(tmp_path / "env-home"), "CURATION_POOL": "s3://bucket/pool",
               "CURATION_TEACHER_TRAIN_ON": str(tmp_path / "clean")}
    from_env = ProjectLayout.resolve(environ=environ)
    assert from_env.home == str(tmp_path / "env-home")
    assert from_env.pool == "s3://bucket/pool"
    assert from_env.reference_split() == str(tmp_path / "clean")
    assert from_env.lancedb == str(tmp_path / "env-home" / "lancedb")
    given = ProjectLayout.resolve(str(tmp_path / "arg-home"), pool=str(tmp_path / "mine"), environ=environ)
    assert given.home == str(tmp_path / "arg-home") and given.pool == str(tmp_path / "mine")
    bare = ProjectLayout.resolve(str(tmp_path), environ={})
    assert bare.pool == str(tmp_path / "demo" / "pool")
    assert bare.reference_split() == bare.pool  # no demo reference: the pool itself, as documented
    assert bare.target() is None
    (tmp_path / "demo" / "reference").mkdir(parents=True)
    (tmp_path / "demo" / "target").mkdir()
    assert bare.reference_split() == str(tmp_path / "demo" / "reference")
    assert bare.target() == str(tmp_path / "demo" / "target")


def test_ingestion_outputs_are_named_by_partition_key() -> None:
    outputs = ShardOutputs.of("s3://bucket/validated", "00000")
    assert outputs.files() == {"samples": "s3://bucket/validated/samples/00000.parquet",
                               "quarantine": "s3://bucket/validated/quarantine/00000.parquet",
                               "report": "s3://bucket/validated/reports/00000.json"}


def test_resources_ask_the_layout(tmp_path: Path, monkeypatch) -> None:
    for name in ("CURATION_HOME", "CURATION_POOL", "CURATION_LANCEDB", "CURATION_RECIPES",
                 "CURATION_TEACHER_TRAIN_ON", "CURATION_TARGET"):
        monkeypatch.delenv(name, raising=False)
    platform = PlatformResource(home_uri=str(tmp_path))
    layout = ProjectLayout.resolve(str(tmp_path))
    assert (platform.validated_uri, platform.lancedb_uri, platform.releases_uri, platform.analysis_uri,
            platform.trained_teacher_uri, platform.recipes_dir, platform.pool) == (
        layout.validated, layout.lancedb, layout.releases, layout.analysis, layout.teacher, layout.recipes,
        layout.pool)
    assert TeacherResource(train_on="s3://b/clean").trusted_split(platform) == "s3://b/clean"
    assert TeacherResource().trusted_split(platform) == layout.pool
    assert ScoringResource(target_uri="s3://b/target").target(platform) == "s3://b/target"
    assert ScoringResource().target(platform) is None


def test_two_layouts_in_one_process_give_two_consistent_graphs(tmp_path: Path, monkeypatch) -> None:
    """The definitions are built from explicit settings: two homes side by side, nothing written to the
    environment, each graph pointing only at its own home."""
    monkeypatch.delenv("CURATION_HOME", raising=False)
    before = dict(__import__("os").environ)
    graphs = {}
    for name in ("first", "second"):
        home = tmp_path / name
        (home / "recipes").mkdir(parents=True)
        graphs[name] = main_job_definitions(str(home), pool=str(tmp_path / f"{name}-pool"))
    assert dict(__import__("os").environ) == before
    for name, defs in graphs.items():
        platform = defs.resources["platform"]
        assert platform.home == str(tmp_path / name)
        assert platform.layout.validated.startswith(str(tmp_path / name))
        assert platform.pool == str(tmp_path / f"{name}-pool")
    keys = [sorted(defs.resolve_asset_graph().materializable_asset_keys) for defs in graphs.values()]
    assert keys[0] == keys[1] and dg.AssetKey("teacher") in keys[0]
