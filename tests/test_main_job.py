"""`curation-platform run` on a pool that is not the demo's: its own trusted split, the whole graph into
releases, the teacher's gate in the instance, the user's settings untouched, and a second run that keeps
the teacher."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from curation_platform_dagster.cli import main
from curation_platform_dagster.defs.teachers import TEACHER_GATE
from curation_platform_dagster.local_run import instance_for
from tests.helpers.demo import build_small_demo_pool

SETTINGS = {"scoring": {"reference_size": 150, "neg_clip_batch_size": 64, "neg_clip_repeats": 2}}
RECIPE = 'name = "clip-half"\n[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n'


@pytest.fixture(scope="module")
def other_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another seed and size than the demo's, in a folder of its own, with its own clean reference split."""
    return build_small_demo_pool(tmp_path_factory.mktemp("users-data"), shards=2, samples_per_shard=120, seed=5,
                                 reference_samples=900, target_samples=40, eval_samples=10)


def test_run_on_a_users_own_pool(other_pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("CURATION_HOME", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "curation.json").write_text(json.dumps(SETTINGS))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "clip.toml").write_text(RECIPE)
    command = ["run", "--pool", str(other_pool / "pool"), "--home", str(home),
               "--train-on", str(other_pool / "reference"), "--epochs", "8", "--min-recall", "0.15",
               "--target", str(other_pool / "target"), "--prompt", "a photo of a geometric shape",
               "--recipes", str(recipes)]

    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    assert "ok     teacher (" in first.output and "FAILED" not in first.output
    assert "teacher passed its quality gate: held-out retrieval on" in first.output
    assert "release clip-half-1-" in first.output
    assert f"CURATION_TEACHER_TRAIN_ON={other_pool / 'reference'}" in first.output
    assert not (home / "demo").exists() and sorted(path.name for path in home.iterdir()) == [
        "analysis", "curation.json", "dagster", "duplicates", "lancedb", "release_passes", "releases", "state", "teacher",
        "validated"]
    assert json.loads((home / "curation.json").read_text()) == SETTINGS, "the user's settings are never rewritten"
    manifest = json.loads(next((home / "releases" / "clip-half").glob("*/manifest.json")).read_text())
    assert manifest["selected"] > 0 and len(manifest["input_shards"]) == 2

    instance = instance_for(home)
    key = dg.AssetCheckKey(dg.AssetKey("teacher"), TEACHER_GATE)
    gate = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key].evaluation
    assert gate.passed and gate.metadata["split"].value == str(other_pool / "reference")
    chance = gate.metadata["chance_at_5"].value
    assert min(gate.metadata["i2t_recall_at_5"].value, gate.metadata["t2i_recall_at_5"].value) >= max(0.15, 3 * chance)
    teacher = instance.get_latest_materialization_event(dg.AssetKey("teacher")).asset_materialization.metadata
    assert teacher["train_on"].value == str(other_pool / "reference")
    assert teacher["precision"].value in ("bf16", "fp32")
    assert teacher["steps"].value == 8 * (teacher["samples_train"].value // 128)

    # Again: the teacher is kept (only its gate runs), everything else re-runs idempotently.
    second = CliRunner().invoke(main, command)
    assert second.exit_code == 0, second.output
    assert "ok     teacher:teacher_beats_the_bar (" in second.output and "ok     teacher (" not in second.output
    assert "release clip-half-2-" in second.output
    first_id = first.output.split("release clip-half-1-")[1].split(":")[0]
    assert second.output.split("release clip-half-2-")[1].split(":")[0] == first_id  # same samples, same digest


@pytest.mark.slow
def test_demo_teacher_passes_its_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job at default sizes (minutes): the demo teacher clears the default bar."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    result = CliRunner().invoke(main, ["demo", "--home", str(tmp_path / "home")])
    assert result.exit_code == 0, result.output
    assert "teacher passed its quality gate" in result.output and "FAILED" not in result.output


UNGUARDED_SCRIPT = """
import json
from pathlib import Path
from curation_platform_dagster.local_run import instance_for, main_job_definitions, materialize_graph

home = Path({home!r})
defs = main_job_definitions(str(home), pool={pool!r}, teacher={{"checkpoint": {teacher!r}, "gate": "warn"}},
                            scoring={{"reference_size": 50, "neg_clip_batch_size": 32, "neg_clip_repeats": 2}})
outcomes = materialize_graph(instance_for(home), defs)
print("OUTCOMES", json.dumps([[list(outcome.assets), outcome.partition, outcome.success, outcome.error]
                              for outcome in outcomes]))
"""


def test_a_script_without_a_main_guard_runs_the_job(other_pool: Path, tmp_path: Path) -> None:
    """Decoding and embedding workers re-import the script; the job must run once, in the parent, and pass."""
    import subprocess
    import sys

    from tests.helpers.teachers import tiny_teacher_dir

    script = tmp_path / "my_pipeline.py"
    script.write_text(UNGUARDED_SCRIPT.format(home=str(tmp_path / "home"), pool=str(other_pool / "pool"),
                                              teacher=str(tiny_teacher_dir(tmp_path / "teacher"))))
    env = {key: value for key, value in os.environ.items() if key not in ("DAGSTER_HOME", "CURATION_HOME")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    completed = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, env=env,
                               timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [line for line in completed.stdout.splitlines() if line.startswith("OUTCOMES")]
    parent = [line for line in reports if line != "OUTCOMES []"]
    assert len(parent) == 1 and len(reports) > 1, reports  # workers re-imported the script and did nothing
    outcomes = json.loads(parent[0].removeprefix("OUTCOMES "))
    assert [step[1] for step in outcomes if step[0] == ["validated_samples", "embeddings"]] == ["00000", "00001"]
    assert all(success for _, _, success, _ in outcomes), outcomes


def test_two_projects_in_one_process_without_environment_writes(tmp_path: Path) -> None:
    from curation_platform_dagster.local_run import main_job_definitions

    environment = dict(os.environ)
    graphs = {}
    for name, recipe in (("a", RECIPE), ("b", RECIPE.replace("clip-half", "clip-other"))):
        (tmp_path / name / "recipes").mkdir(parents=True)
        (tmp_path / name / "recipes" / "r.toml").write_text(recipe)
        graphs[name] = main_job_definitions(str(tmp_path / name), pool=str(tmp_path / f"pool-{name}"),
                                            teacher={"train_on": str(tmp_path / f"clean-{name}")})
    assert dict(os.environ) == environment
    for name, graph in graphs.items():
        platform, teacher = graph.resources["platform"], graph.resources["teacher_config"]
        assert (platform.home, platform.pool, platform.lancedb_uri) == (
            str(tmp_path / name), str(tmp_path / f"pool-{name}"), str(tmp_path / name / "lancedb"))
        assert teacher.trusted_split(platform) == str(tmp_path / f"clean-{name}")
    per_recipe = {name: {key.to_user_string() for key in graph.resolve_asset_graph().materializable_asset_keys
                         if key.path[0].startswith(("release_", "evaluation_"))} for name, graph in graphs.items()}
    passes = {"release_plan", "release_candidates", "release_cuts", "release_selections"}
    assert per_recipe == {"a": {"release_clip_half", "evaluation_clip_half", *passes},
                          "b": {"release_clip_other", "evaluation_clip_other", *passes}}
