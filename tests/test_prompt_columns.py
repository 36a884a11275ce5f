"""Adding a domain prompt to an already scored pool: only its column is computed and written (issue 16, 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from curation_platform import lance_tables
from curation_platform.embedding.sinks import LanceSink
from curation_platform.releases.inputs import ReleaseSources, score_provenance, table_versions
from curation_platform.scoring.pipeline import (
    PER_PROMPT_PARAMS,
    SCORES_TABLE,
    PromptColumnError,
    ScoreParams,
    fill_prompt_columns,
    prompt_column,
    prompt_columns_of,
    recorded_prompt_columns,
    score_rows,
)
from curation_platform.scoring.run import add_prompt_columns, read_scores, score_shard, scoring_context

OLD = "circles squares and triangles"  # the fixture's prompt
NEW = "a drawing of a landscape"


@pytest.fixture()
def pool(tmp_path: Path, scored_demo: dict) -> dict:
    """A private copy of the scored demo pool (the session fixture stays untouched)."""
    lance = tmp_path / "lance"
    shutil.copytree(scored_demo["lance"], lance)
    shards = sorted(shard.name for shard, _ in scored_demo["jobs"])
    return {**scored_demo, "lance": str(lance), "shards": shards}


def _sorted_scores(lance: str, teacher_id: str) -> pa.Table:
    return read_scores(lance, teacher_id).sort_by("row_key")


def _same_bits(left: pa.ChunkedArray, right: pa.ChunkedArray) -> bool:
    if pa.types.is_floating(left.type):
        return (left.is_null().equals(right.is_null()) and np.array_equal(
            left.fill_null(0.0).to_numpy().view(np.uint64), right.fill_null(0.0).to_numpy().view(np.uint64)))
    return left.equals(right)


def _expected(pool: dict, shard: str, prompts: tuple[str, ...]) -> dict[str, pa.Table]:
    """What the normal scoring path's ``score_rows`` gives the shard, with these prompts."""
    teacher, context = pool["teacher"], pool["context"]
    rows = LanceSink(pool["lance"]).read_shard(shard, teacher.teacher_id, teacher.embed_dim)
    fresh = scoring_context(teacher, ScoreParams(prompts=prompts), context.reference, context.target)
    return score_rows(rows, fresh)


def _data_bytes(lance: str) -> int:
    root = Path(lance) / f"{SCORES_TABLE}.lance" / "data"
    return sum(path.stat().st_size for path in root.iterdir())


def test_adding_a_prompt_computes_only_its_column(pool: dict) -> None:
    lance, teacher = pool["lance"], pool["teacher"]
    teacher_id, column = teacher.teacher_id, prompt_column(NEW)
    before = _sorted_scores(lance, teacher_id)
    version_before = lance_tables.connect(lance).open_table(SCORES_TABLE).version

    added = add_prompt_columns(lance, teacher, [NEW])

    after = _sorted_scores(lance, teacher_id)
    assert after.num_rows == before.num_rows
    assert after.column_names == [*before.column_names, column]
    for name in before.column_names:  # every other column (the old prompt's too), bit for bit
        assert _same_bits(before.column(name), after.column(name)), name
    assert after.column(column).null_count == 0
    by_key = dict(zip(after.column("row_key").to_pylist(), after.column(column).to_numpy(), strict=True))
    for shard in pool["shards"]:
        expected = _expected(pool, shard, (NEW,))
        got = np.array([by_key[key] for key in expected.column("row_key").to_pylist()])
        assert np.abs(got - expected.column(column).to_numpy()).max() <= 1e-9, shard
    assert added["shards"] == added["shards_written"] == len(pool["shards"])
    assert added["rows_written"] == before.num_rows and added["missing_embeddings"] == 0
    # one metadata-only schema commit, then one commit per shard
    assert added["version"] == version_before + 1 + len(pool["shards"])

    again = add_prompt_columns(lance, teacher, [NEW])  # a no-op: nothing to write, no new version
    assert again["rows_written"] == again["shards_written"] == 0 and again["version"] == added["version"]
    assert _sorted_scores(lance, teacher_id).equals(after)

    sources = ReleaseSources(lance, str(pool["root"] / "validated"), teacher_id)
    provenance = score_provenance(sources, table_versions(sources))
    assert not set(PER_PROMPT_PARAMS) & set(provenance["score_params"]["params"])
    recorded = provenance["prompt_columns"]
    assert set(recorded) == {prompt_column(OLD), column}
    assert recorded[column]["prompt"] == NEW and recorded[column]["importance_scale"] == 10.0
    assert recorded[column]["embedding_sha256"] == added["columns"][column]["embedding_sha256"]


def test_a_shard_scored_later_gets_the_recorded_values(pool: dict) -> None:
    lance, teacher, shard = pool["lance"], pool["teacher"], pool["shards"][0]
    teacher_id, column = teacher.teacher_id, prompt_column(NEW)
    add_prompt_columns(lance, teacher, [NEW])
    added = _sorted_scores(lance, teacher_id)

    # the scorer was not given the new prompt: the table's extra column stays and is scored anyway
    score_shard(pool["context"], lance, shard)
    assert _same_bits(_sorted_scores(lance, teacher_id).column(column), added.column(column))
    # nor when it is given both prompts, in another order (each prompt is encoded alone)
    both = scoring_context(teacher, ScoreParams(reference_size=120, neg_clip_batch_size=64, neg_clip_repeats=3,
                                                prompts=(NEW, OLD)), pool["context"].reference, pool["context"].target)
    score_shard(both, lance, shard)
    rescored = _sorted_scores(lance, teacher_id)
    assert rescored.num_rows == added.num_rows
    for name in (column, prompt_column(OLD)):
        assert _same_bits(rescored.column(name), added.column(name)), name
    sources = ReleaseSources(lance, str(pool["root"] / "validated"), teacher_id)
    assert score_provenance(sources, table_versions(sources))["reference_id"] == pool["context"].reference.set_id


def test_a_shard_fill_writes_one_column_file(pool: dict) -> None:
    lance, teacher, shard = pool["lance"], pool["teacher"], pool["shards"][0]
    add_prompt_columns(lance, teacher, [NEW], shards=[])  # the column only (metadata-only commit)
    dataset = lance_tables.connect(lance).open_table(SCORES_TABLE).to_lance()
    files_before = {fragment.fragment_id: [file.path for file in fragment.metadata.files]
                    for fragment in dataset.get_fragments()}
    bytes_before = _data_bytes(lance)
    column = recorded_prompt_columns(lance, teacher.teacher_id)[prompt_column(NEW)]

    filled = fill_prompt_columns(lance, shard, [column])

    dataset = lance_tables.connect(lance).open_table(SCORES_TABLE).to_lance()
    assert filled.version == dataset.version and filled.written == filled.rows > 0
    field_id = dataset.lance_schema.field(column.column).id()
    grown = {}
    for fragment in dataset.get_fragments():
        files = [file.path for file in fragment.metadata.files]
        assert files[:len(files_before[fragment.fragment_id])] == files_before[fragment.fragment_id]  # no rewrite
        new_files = fragment.metadata.files[len(files_before[fragment.fragment_id]):]
        if new_files:
            grown[fragment.fragment_id] = [list(file.fields) for file in new_files]
    assert list(grown.values()) == [[[field_id]]]  # one fragment, one file, the new column only
    assert _data_bytes(lance) - bytes_before < 16 * filled.rows + 4096  # float64 values, not whole rows


def test_conflicting_prompts_are_refused(pool: dict) -> None:
    lance, teacher = pool["lance"], pool["teacher"]
    with pytest.raises(PromptColumnError, match=r"a_w = 10.0, not 5.0"):
        add_prompt_columns(lance, teacher, [OLD], importance_scale=5.0)
    with pytest.raises(PromptColumnError, match="holds prompt 'circles squares and triangles'"):
        add_prompt_columns(lance, teacher, ["Circles, squares and triangles!"])
    with pytest.raises(PromptColumnError, match="share column"):
        add_prompt_columns(lance, teacher, [NEW, NEW.upper()])
    assert prompt_column(NEW) not in lance_tables.connect(lance).open_table(SCORES_TABLE).schema.names


def test_a_column_scored_before_provenance_is_recomputed_then_recorded(pool: dict) -> None:
    lance, teacher = pool["lance"], pool["teacher"]
    teacher_id, column = teacher.teacher_id, prompt_column(OLD)
    original = _sorted_scores(lance, teacher_id)
    table = lance_tables.connect(lance).open_table(SCORES_TABLE)
    table.to_lance().update_field_metadata({column: {}}, replace=True)  # as written before provenance existed
    table.update(where=f"shard = '{pool['shards'][0]}'", values={column: 0.0})  # and a stale shard
    assert not prompt_columns_of(lance_tables.connect(lance).open_table(SCORES_TABLE).schema, teacher_id)

    added = add_prompt_columns(lance, teacher, [OLD])

    assert added["unrecorded"] == [] and added["rows_written"] == original.filter(
        pa.compute.equal(original["shard"], pool["shards"][0])).num_rows
    assert _same_bits(_sorted_scores(lance, teacher_id).column(column), original.column(column))
    assert set(recorded_prompt_columns(lance, teacher_id)) == {column}


def test_cli_adds_a_prompt_in_one_line(pool: dict) -> None:
    from curation_platform.cli import main

    command = ["score", "--lance", pool["lance"], "--teacher", str(pool["root"] / "teacher"), "--add-prompt", NEW]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # the progress bar is on stderr
    assert len(lines) == 1 and f"added {prompt_column(NEW)} to {len(pool['shards'])} shards" in lines[0]
    refused = CliRunner().invoke(main, [*command[:-2], "--add-prompt", OLD, "--prompt", NEW])
    assert refused.exit_code == 2 and "not both" in refused.output
