"""A CLI that fails like a good tool (issue 17): a user error is one ``Error:`` line naming the flag to fix,
a non-zero exit, no traceback, and nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from curation_platform.cli import main
from tests.helpers.shards import ShardBuilder


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    return ShardBuilder().sample("000000001", "a red circle").write(tmp_path / "pool")


def _fails(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, not a crash
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert all(text in errors[0] for text in expected), errors[0]
    return errors[0]


def test_a_pool_that_does_not_exist(tmp_path: Path) -> None:
    for command in ("discover", "validate"):
        _fails([command, str(tmp_path / "nowhere")], "POOL_URI", "does not exist")


def test_an_unknown_url_scheme() -> None:
    _fails(["validate", "foo://bucket/pool"], "POOL_URI", "unsupported URI scheme")


def test_a_folder_without_shards(tmp_path: Path) -> None:
    _fails(["validate", str(tmp_path)], "POOL_URI", "no shards")


def test_embed_of_an_uningested_pool_names_validated_and_creates_nothing(pool: Path, tmp_path: Path) -> None:
    lance = tmp_path / "nowhere" / "db"
    _fails(["embed", str(pool), "--validated", str(tmp_path / "not_ingested"), "--lance", str(lance),
            "--teacher", str(tmp_path / "teacher")], "'--validated'", "has not been ingested", "ingest")
    assert not (tmp_path / "nowhere").exists()


def test_lance_databases_without_the_tables_a_command_reads(tmp_path: Path) -> None:
    empty = tmp_path / "empty_lance"
    _fails(["score", "--lance", str(empty), "--teacher", str(tmp_path / "teacher")], "'--lance'", "no embeddings table")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n')
    _fails(["release", "create", str(recipe), "--lance", str(empty), "--home", str(tmp_path / "home")],
           "'--lance'", "no scores table")
    assert not empty.exists() and not (tmp_path / "home").exists()


def test_other_os_and_value_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from curation_platform.cli import pool as pool_commands

    def broken(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: '/srv/pool'\nmore detail")

    monkeypatch.setattr(pool_commands, "ingest_pool", broken)
    ShardBuilder().sample("000000001", "a red circle").write(tmp_path / "pool")
    assert _fails(["validate", str(tmp_path / "pool")]) == "Error: [Errno 13] Permission denied: '/srv/pool'"
    monkeypatch.setenv("CURATION_DEBUG", "1")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "pool")])
    assert isinstance(result.exception, PermissionError)  # the traceback, on request
