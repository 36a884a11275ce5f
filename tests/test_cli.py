"""The console command: help on every subcommand, and the README documents every reason code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from curation_platform.cli import main
from curation_platform.reasons import REASON_DESCRIPTIONS, Reason
from tests.test_hostile_shard import hostile_shard

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("command", [[], *([name] for name in main.commands)])
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
