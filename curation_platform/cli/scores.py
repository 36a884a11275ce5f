"""``score``: every score of SCORES.md for an embedded pool, and optionally the pool's analysis."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from curation_platform.cli.display import activity, bar, example, warn
from curation_platform.cli.group import ANY_URL, main, require_tables, stack
from curation_platform.cli.teachers import load_cli_teacher, teacher_options, teacher_spec

if TYPE_CHECKING:
    from curation_platform.scoring.pipeline import ScoringContext


def _score(lance_uri: str, spec, target_uri: str | None, params, analysis_dir: Path | None,
           validated_uri: str | None, batch_given: bool) -> None:
    from curation_platform.embedding.engine import EmbedConfig
    from curation_platform.scoring.run import build_context, embed_target, score_pool

    require_tables(lance_uri, ["embeddings"], "run `curation-platform embed` into it first")
    teacher = load_cli_teacher(spec)
    target = None
    if target_uri:
        with activity(f"embedding the NormSim target {target_uri}"):
            target = embed_target(teacher, target_uri, EmbedConfig())
    with activity(f"drawing the reference (N = {params.reference_size:,}) from every embedded pair"):
        context = build_context(teacher, lance_uri, params, target)
    described = context.describe()
    click.echo(f"reference {described['reference_id']} (N = {described['reference_size']}), "
               f"target {described['target_id']} (|T| = {described['target_size']}), "
               f"negCLIPLoss B = {described['neg_clip_batch_size_effective']}, K = {params.neg_clip_repeats}")
    for reduction in reductions(context, batch_given):
        warn(reduction)
    started = time.perf_counter()
    with bar("scoring", total=context.reference.description["pool_rows"]) as scored:
        results = score_pool(context, lance_uri, on_shard=lambda result: scored.update(result.rows))
    rows = sum(result.rows for result in results)
    click.echo(f"scored {rows} samples of {len(results)} shards in {time.perf_counter() - started:.1f} s "
               f"into {lance_uri}/scores")
    if analysis_dir:
        _analyse(lance_uri, teacher.teacher_id, analysis_dir, validated_uri)


def reductions(context: ScoringContext, batch_given: bool) -> list[str]:
    """Settings the pool made smaller than asked: N when the pool has fewer embedded pairs, and B
    (always at most N + 1: the mates come from the reference) when it was given explicitly."""
    params, reference = context.params, context.reference
    found = []
    if reference.size < params.reference_size:
        found.append(f"the reference holds N = {reference.size:,} pairs, not --reference-size "
                     f"{params.reference_size:,}: the pool has only {reference.description['pool_rows']:,} "
                     "embedded pairs of this teacher")
    effective = context.describe()["neg_clip_batch_size_effective"]
    if batch_given and effective < params.neg_clip_batch_size:
        found.append(f"negCLIPLoss uses B = N + 1 = {effective:,}, not --negclip-batch "
                     f"{params.neg_clip_batch_size:,}: a batch's mates come from the N reference pairs")
    return found


def _add_prompts(lance_uri: str, spec, prompts: tuple[str, ...], importance_scale: float) -> str:
    """Only the prompts' importance weight columns, added to the scored pool (no reference, no rescoring)."""
    from curation_platform.scoring.pipeline import SCORES_TABLE, PromptColumnError
    from curation_platform.scoring.run import add_prompt_columns, count_scores

    require_tables(lance_uri, [SCORES_TABLE], "run `curation-platform score` on it first")
    teacher = load_cli_teacher(spec)  # loaded once, to embed the prompt texts
    started = time.perf_counter()
    try:
        with bar("adding prompts", total=count_scores(lance_uri, teacher.teacher_id)) as filled:
            added = add_prompt_columns(lance_uri, teacher, list(prompts), importance_scale=importance_scale,
                                       on_shard=lambda result: filled.update(result.rows))
    except (FileNotFoundError, PromptColumnError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"added {', '.join(added['columns'])} to {added['shards']} shards of teacher {teacher.teacher_id} "
               f"({added['rows_written']} rows written, {added['shards'] - added['shards_written']} shards already "
               f"complete) in {time.perf_counter() - started:.1f} s into {lance_uri}/scores")
    return teacher.teacher_id


def _analyse(lance_uri: str, teacher_id: str, out: Path, validated_uri: str | None) -> None:
    from curation_platform.scoring.statistics import STATISTICS_MAX_ROWS, analyse_pool

    with activity(f"analysing the scores into {out}"):
        analysis = analyse_pool(lance_uri, teacher_id, str(out), validated_uri=validated_uri)
    if analysis.uid_below is not None:
        warn(f"the analysis covers a uniform uid sample of {analysis.rows_analysed:,} of {analysis.pool_rows:,} "
             f"scored rows (at most {STATISTICS_MAX_ROWS:,})")
    click.echo("analysis: " + ", ".join(uri for name, uri in analysis.written.items() if name.endswith("_png")))


_score_options = stack([
    click.option("--target", "target_uri", default=None,
                 help=f"NormSim target: webdataset shards ({ANY_URL}) or a local folder of images."),
    click.option("--reference-size", type=click.IntRange(min=1), default=25_000, show_default=True,
                 help="N pairs drawn uniformly from the pool as the marginal reference."),
    click.option("--reference-seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the reference draw."),
    click.option("--negclip-batch", "neg_clip_batch_size", type=click.IntRange(min=1), default=32_768,
                 show_default=True, help="negCLIPLoss batch size B: each sample and its B-1 mates from the "
                                         "reference (at most N+1)."),
    click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="negCLIPLoss repetitions K."),
    click.option("--prompt", "prompts", multiple=True, help="Domain prompt for importance weights (repeatable)."),
    click.option("--add-prompt", "added_prompts", multiple=True,
                 help="Add this domain prompt's importance weight column to the already scored pool, without "
                      "rescoring it: only that column is computed (repeatable; other score options are ignored)."),
])


@main.command(epilog=example("score --lance ./lancedb --teacher ./teacher --target ./target --analysis ./analysis"))
@click.option("--lance", "lance_uri", required=True, help="LanceDB database holding the embeddings.")
@teacher_options
@_score_options
@click.option("--analysis", "analysis_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write score histograms and correlations (PNG + parquet) here.")
@click.option("--validated", "validated_uri", default=None,
              help="Validated samples (local) for captions: adds KL-decile n-gram coverage to --analysis.")
def score(lance_uri: str, teacher_checkpoint: str | None, arch: str | None, pretrained: str | None,
          target_uri: str | None, reference_size: int, reference_seed: int, neg_clip_batch_size: int, repeats: int,
          prompts: tuple[str, ...], added_prompts: tuple[str, ...], analysis_dir: Path | None,
          validated_uri: str | None) -> None:
    """Score every embedded shard (all of SCORES.md) against one stored reference sample and target."""
    from curation_platform.scoring.pipeline import ScoreParams

    if added_prompts:
        if prompts:
            raise click.UsageError("--prompt scores the pool, --add-prompt adds columns to a scored one: not both")
        teacher_id = _add_prompts(lance_uri, teacher_spec(teacher_checkpoint, arch, pretrained), added_prompts,
                                  ScoreParams.importance_scale)
        if analysis_dir:
            _analyse(lance_uri, teacher_id, analysis_dir, validated_uri)
        return
    params = ScoreParams(reference_size=reference_size, reference_seed=reference_seed,
                         neg_clip_batch_size=neg_clip_batch_size, neg_clip_repeats=repeats, prompts=prompts)
    given = click.get_current_context().get_parameter_source("neg_clip_batch_size")
    _score(lance_uri, teacher_spec(teacher_checkpoint, arch, pretrained), target_uri, params, analysis_dir,
           validated_uri, batch_given=given is click.core.ParameterSource.COMMANDLINE)
