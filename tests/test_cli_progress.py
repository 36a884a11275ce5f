"""What the CLI shows while it works (issue 17): progress within shards on stderr only, warnings when a
setting is reduced, one meaning per flag name, and an example in every command's --help."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from curation_platform.cli.display import PROGRESS_ENV
from curation_platform.cli.teachers import CountedSink, TrainingBar
from curation_platform.embedding.sinks import MemorySink
from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.teachers import TeacherSpec, load_teacher
from curation_platform.training import train_teacher
from curation_platform_dagster.cli import main
from tests.helpers.demo import build_small_demo_pool
from tests.helpers.teachers import CPU, TINY

EPOCHS = 2
COMMANDS = [[], *([name] for name, command in main.commands.items() if not isinstance(command, click.Group))]
COMMANDS += [["release"], *(["release", name] for name in main.commands["release"].commands)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_demo_pool(tmp_path_factory.mktemp("progress-demo"), shards=1, samples_per_shard=40,
                                 reference_samples=200, target_samples=10, eval_samples=10)


@pytest.fixture(scope="module")
def trained(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A teacher trained for a few steps on the demo reference split, and every progress event it sent."""
    events: list[dict] = []
    out = tmp_path_factory.mktemp("progress-teacher") / "teacher"
    train_teacher(str(demo / "reference"), str(out), replace(TINY, epochs=EPOCHS), events.append)
    return out, events


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "curation-platform")
def test_every_help_ends_with_one_example(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Example:") == 1
    example = result.stdout.split("Example:", 1)[1].splitlines()[1].strip()
    assert example.startswith(" ".join(["curation-platform", *command, ""]))


def test_each_batch_meaning_has_its_own_flag() -> None:
    embed = CliRunner().invoke(main, ["embed", "--help"]).stdout
    score = CliRunner().invoke(main, ["score", "--help"]).stdout
    assert "--batch-size" in embed and "--negclip-batch" not in embed
    assert "--negclip-batch" in score and "--batch-size" not in score
    refused = CliRunner().invoke(main, ["score", "--lance", "db", "--batch-size", "64"])
    assert refused.exit_code == 2 and "No such option '--batch-size'" in refused.output


@pytest.mark.parametrize(("command", "seed"), [(["demo-pool", "--out", "demo"], "--pool-seed"),
                                               (["demo"], "--pool-seed"),
                                               (["train-teacher", "reference", "--out", "teacher"], "--training-seed")])
def test_each_seed_meaning_has_its_own_flag(command: list[str], seed: str) -> None:
    shown = CliRunner().invoke(main, [command[0], "--help"]).stdout
    assert seed in shown and "--seed " not in shown
    refused = CliRunner().invoke(main, [*command, "--seed", "1"])
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert refused.exit_code == 2 and len(errors) == 1, refused.output
    assert errors[0].startswith("Error: No such option '--seed'")


def test_training_reports_every_epoch_with_its_loss(trained: tuple[Path, list[dict]]) -> None:
    _, events = trained
    assert events[0]["stage"] == "loading" and events[-1]["stage"] == "saved"
    epochs = [event for event in events if event["stage"] == "epoch"]
    assert [event["epoch"] for event in epochs] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(event["train_loss"]) and math.isfinite(event["held_out_loss"]) for event in epochs)
    steps = [event for event in events if event["stage"] == "step"]
    assert steps and all(event["epochs"] == EPOCHS and math.isfinite(event["loss"]) for event in steps)


def test_the_training_bar_shows_epoch_loss_and_the_cap(trained: tuple[Path, list[dict]], capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")
    _, events = trained
    with TrainingBar() as progress:
        for event in events:
            progress({**event, "max_samples": event["train"] + event["held_out"]} if event["stage"] == "data"
                     else event)
    shown = capsys.readouterr()
    assert shown.out == ""
    assert "reading the training split" in shown.err and "training teacher" in shown.err
    assert f"epoch {EPOCHS}/{EPOCHS}, loss " in shown.err and "held-out loss" in shown.err
    assert "Warning: the teacher trains on the split's first" in shown.err


def test_ingestion_and_embedding_report_progress_within_a_shard(demo: Path, trained: tuple[Path, list[dict]]) -> None:
    (shard,) = discover_shards(str(demo / "pool"))
    positions: list[int] = []
    accepted = ingest_shard(shard, on_tar_bytes=positions.append).accepted
    assert len(positions) > 1 and positions == sorted(positions) and positions[-1] <= shard.tar.size

    class Counter:
        def __init__(self) -> None:
            self.updates: list[int] = []

        def update(self, rows: int) -> None:
            self.updates.append(rows)

    counter = Counter()
    teacher = load_teacher(TeacherSpec(checkpoint=str(trained[0])))
    from curation_platform.embedding.engine import embed_shards

    embed_shards(teacher, [(shard, accepted)], CountedSink(MemorySink(), counter), replace(CPU, batch_size=8))
    assert len(counter.updates) > 1 and sum(counter.updates) == accepted.num_rows


def test_progress_goes_to_stderr_and_a_reduced_reference_warns(demo: Path, trained: tuple[Path, list[dict]],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    validated, lance = str(tmp_path / "validated"), str(tmp_path / "lance")
    commands = {
        "validating": ["ingest", str(demo / "pool"), "--out", validated, "--workers", "0", "--home", str(tmp_path)],
        "embedding": ["embed", str(demo / "pool"), "--validated", validated, "--lance", lance, "--teacher",
                      str(trained[0]), "--device", "cpu", "--workers", "0", "--batch-size", "8"],
        "scoring": ["score", "--lance", lance, "--teacher", str(trained[0]), "--reference-size", "1000",
                    "--negclip-batch", "5000", "--repeats", "1", "--analysis", str(tmp_path / "analysis")],
    }
    monkeypatch.setenv(PROGRESS_ENV, "1")
    for bar, command in commands.items():
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, result.output
        assert f"{bar}: 100%" in result.stderr, result.stderr
        assert "\r" not in result.stdout and "%|" not in result.stdout and "Warning" not in result.stdout
    assert "loading the teacher" in result.stderr and "drawing the reference" in result.stderr
    assert "analysing the scores" in result.stderr
    assert result.stdout.startswith("reference ") and "scored " in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2
    assert "not --reference-size 1,000" in warnings[0] and "not --negclip-batch 5,000" in warnings[1]

    monkeypatch.setenv(PROGRESS_ENV, "0")  # what a pipe or a log sees: no bars, still the warnings
    quiet = CliRunner().invoke(main, commands["scoring"][:-2])
    assert quiet.exit_code == 0, quiet.output
    assert "%|" not in quiet.stderr and "loading the teacher" not in quiet.stderr
    assert [line for line in quiet.stderr.splitlines() if line.startswith("Warning:")] == warnings
