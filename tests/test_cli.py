"""The console command: help on every subcommand, and the README documents every reason code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from curation_platform.reasons import REASON_DESCRIPTIONS, Reason
from curation_platform_dagster.cli import main
from tests.helpers.shards import hostile_shard

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("command", [[], *([name] for name in main.commands),
                                     *(["release", name] for name in main.commands["release"].commands)])
def test_help_everywhere(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_reason_is_documented() -> None:
    text = README.read_text()
    assert set(REASON_DESCRIPTIONS) == set(Reason)
    assert all(f"`{reason.value}`" in text for reason in Reason)


def test_validate_json_accounts_for_every_sample(tmp_path: Path) -> None:
    pool = hostile_shard(tmp_path / "pool")
    result = CliRunner().invoke(main, ["validate", str(pool), "--json", "--workers", "0", "--min-side", "16"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)["shards"]
    assert report["accepted"] + report["quarantined"] == report["total"] == 24
    assert report["by_reason"]["unsafe_member_type"] == 4
    assert not any(tmp_path.glob("**/samples"))  # validate writes nothing


def test_release_commands(tmp_path: Path, scored_demo: dict, demo_pool_dir: Path) -> None:
    recipe = tmp_path / "kl.toml"
    recipe.write_text('name = "kl-top"\n[[stage]]\ntype = "top_fraction"\nscore = "kl_text"\nfraction = 0.25\n')
    common = ["--releases", str(tmp_path / "releases")]
    create = ["release", "create", str(recipe), *common, "--lance", scored_demo["lance"],
              "--validated", str(scored_demo["root"] / "validated"), "--pool", str(demo_pool_dir / "pool"),
              "--labels", str(demo_pool_dir / "ground_truth.parquet")]
    runner = CliRunner()
    first = runner.invoke(main, create)
    assert first.exit_code == 0, first.output
    assert "release kl-top-1-" in first.stdout and "top_fraction(column=kl_text" in first.stdout
    assert runner.invoke(main, create).exit_code == 0
    listed = runner.invoke(main, ["release", "list", *common]).stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["kl-top/1", "kl-top/2"]
    assert "teacher " in runner.invoke(main, ["release", "show", "kl-top/1", *common]).stdout
    diff = runner.invoke(main, ["release", "diff", "kl-top/1", "kl-top", *common])
    assert "+0 -0" in diff.stdout
    verified = runner.invoke(main, ["release", "verify", "kl-top/2", *common])
    assert verified.exit_code == 0 and "identical uid set" in verified.stdout

    samples = tmp_path / "releases" / "kl-top" / "1" / "samples.parquet"
    import polars as pl

    excluded = pl.read_parquet(samples)["uid"].head(3).to_list()
    (tmp_path / "bad.txt").write_text("\n".join(excluded) + "\n")
    derived = runner.invoke(main, ["release", "derive", "--from", "kl-top/1", "--exclude", str(tmp_path / "bad.txt"),
                                   *common])
    assert derived.exit_code == 0 and "3 uids excluded" in derived.stdout, derived.output
    samples.write_bytes(samples.read_bytes() + b"x")
    tampered = runner.invoke(main, ["release", "verify", "kl-top/1", "--no-rederive", *common])
    assert tampered.exit_code == 1 and "changed: samples.parquet" in tampered.stdout
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text('name = "x"\n[[stage]]\ntype = "top_fraction"\nscore = "nope"\nfraction = 0.2\n')
    refused = runner.invoke(main, ["release", "create", str(bad_recipe), *common, "--lance", scored_demo["lance"]])
    assert refused.exit_code == 1 and "unknown score 'nope'" in refused.output


def test_demo_pool_command_writes_a_pool(tmp_path: Path, monkeypatch) -> None:
    """The README's first command builds its pool through this path (its progress callback included)."""
    monkeypatch.setenv("CURATION_PROGRESS", "1")  # draw the bars as on a terminal
    result = CliRunner().invoke(main, ["demo-pool", "--out", str(tmp_path / "demo"), "--shards", "1",
                                       "--samples-per-shard", "12", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "demo" / "pool").glob("*.tar")) == ["00000.tar"]
