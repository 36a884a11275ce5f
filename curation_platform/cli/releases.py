"""``release`` commands: create from a recipe, list, show, diff, verify, derive, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from curation_platform.cli.display import bar, example
from curation_platform.cli.group import ANY_URL, HOME_HELP, main, project_layout, require_tables, stack


@main.group(epilog=example("release show negclip-normsim"))
def release() -> None:
    """Curated releases: create from a recipe, list, show, diff, verify, derive, export."""


def _releases_uri(home: str | None, releases: str | None) -> str:
    return releases or project_layout(home).releases


_release_options = stack([
    click.option("--home", default=None, help=HOME_HELP),
    click.option("--releases", "releases_uri", default=None,
                 help=f"Where releases live ({ANY_URL}; default <home>/releases)."),
])


def _current_teacher_id(lance_uri: str) -> str:
    from curation_platform import lance_tables
    from curation_platform.scoring.pipeline import SCORES_TABLE

    require_tables(lance_uri, [SCORES_TABLE], "run `curation-platform score` on it first")
    rows = lance_tables.connect(lance_uri).open_table(SCORES_TABLE).to_lance().to_table(columns=["teacher_id"])
    teachers = sorted(set(rows.column("teacher_id").to_pylist()))
    if len(teachers) != 1:
        raise click.UsageError(f"the scores hold teachers {teachers}: choose one with --teacher-id")
    return teachers[0]


def echo_funnel(manifest: dict) -> None:
    for stage in manifest["funnel"]:
        click.echo(f"  {stage['rows']:>10,}  {stage['stage']}")


@release.command("create", epilog=example("release create recipes/negclip-normsim.toml --home ./curation_home"))
@click.argument("recipe_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_release_options
@click.option("--lance", "lance_uri", default=None, help="LanceDB database with the scores (default <home>/lancedb).")
@click.option("--validated", "validated_uri", default=None, help="Validated samples (default <home>/validated).")
@click.option("--pool", "pool_uri", default=None, help="Pool shards, for example images in the report.")
@click.option("--teacher-id", default=None, help="Teacher whose scores to use (default: the only one scored).")
@click.option("--labels", "labels_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation-only labels (parquet with uid and label or corruption) shown in the report.")
def release_create(recipe_path: Path, home: str | None, releases_uri: str | None, lance_uri: str | None,
                   validated_uri: str | None, pool_uri: str | None, teacher_id: str | None,
                   labels_path: str | None) -> None:
    """Run a recipe on the scored pool and publish an immutable release."""
    from curation_platform.releases import RecipeError, ReleaseOptions, ReleaseSources, create_release, load_recipe

    layout = project_layout(home)
    lance_uri = lance_uri or layout.lancedb
    try:
        recipe = load_recipe(recipe_path)
        sources = ReleaseSources(lance_uri, validated_uri or layout.validated,
                                 teacher_id or _current_teacher_id(lance_uri), pool_uri)
        created = create_release(recipe, sources, _releases_uri(home, releases_uri),
                                 ReleaseOptions(labels=_read_labels(labels_path)))
    except RecipeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"release {created.release_id}: {created.manifest['selected']:,} of "
               f"{created.manifest['pool_rows']:,} samples at {created.uri}")
    echo_funnel(created.manifest)


def _read_labels(path: str | None):
    if path is None:
        return None
    import polars as pl

    labels = pl.read_parquet(path)
    column = "label" if "label" in labels.columns else "corruption"
    return labels.select("uid", pl.col(column).cast(pl.String).alias("label"))


@release.command("list", epilog=example("release list --releases s3://bucket/releases"))
@_release_options
def release_list(home: str | None, releases_uri: str | None) -> None:
    """Every published release with its size and creation time."""
    from curation_platform.releases import list_releases

    for item in list_releases(_releases_uri(home, releases_uri)):
        manifest = item.manifest
        parent = f"  (derived from {manifest['parent']['release_id']})" if manifest.get("parent") else ""
        click.echo(f"{item.name}/{item.version}  {manifest['release_id']}  {manifest['selected']:>10,} samples  "
                   f"{manifest['created_at']}{parent}")


def _release_uri(home: str | None, releases_uri: str | None, reference: str) -> str:
    """``name/version``, ``name`` (latest version) or a release folder URI."""
    from curation_platform import storage
    from curation_platform.releases.artefacts import versions_of

    if storage.exists(storage.join(reference, "manifest.json")):
        return reference
    base = _releases_uri(home, releases_uri)
    name, _, version = reference.partition("/")
    if not version:
        versions = versions_of(base, name)
        if not versions:
            raise click.UsageError(f"no release named {name!r} under {base}")
        version = str(versions[-1])
    return storage.join(base, name, version)


@release.command("show", epilog=example("release show negclip-normsim/1 --json"))
@click.argument("reference")
@_release_options
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def release_show(reference: str, home: str | None, releases_uri: str | None, as_json: bool) -> None:
    """A release's manifest: recipe, inputs, pinned tables, funnel (REFERENCE: name, name/version or path)."""
    from curation_platform.releases import open_release

    item = open_release(_release_uri(home, releases_uri, reference))
    manifest = item.manifest
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    click.echo(f"{manifest['release_id']} at {item.uri}\n  {manifest['description']}")
    click.echo(f"  teacher {manifest['teacher_id']}, reference {manifest['reference_id']}, "
               f"target {manifest['target_id']}, score version {manifest['score_version']}")
    click.echo("  tables: " + ", ".join(f"{name}@{entry['version']}" for name, entry in
                                       manifest["lancedb_tables"].items()))
    click.echo(f"  {len(manifest['input_shards'])} input shards; recipe sha256 {manifest['recipe']['sha256'][:16]}; "
               f"created {manifest['created_at']}")
    echo_funnel(manifest)


@release.command("diff", epilog=example("release diff negclip-normsim/1 negclip-normsim/2"))
@click.argument("first")
@click.argument("second")
@_release_options
def release_diff(first: str, second: str, home: str | None, releases_uri: str | None) -> None:
    """uids added and removed from FIRST to SECOND and how the scores moved."""
    from curation_platform.releases import diff_releases

    result = diff_releases(_release_uri(home, releases_uri, first), _release_uri(home, releases_uri, second))
    click.echo(f"{result['a']} -> {result['b']}: {result['size_a']:,} -> {result['size_b']:,} samples, "
               f"+{result['added']:,} -{result['removed']:,} ({result['kept']:,} kept)")
    for name, shift in result["score_shift"].items():
        if shift["mean_a"] is not None and shift["mean_b"] is not None:
            click.echo(f"  {name:<40} mean {shift['mean_a']:.4g} -> {shift['mean_b']:.4g}, "
                       f"median {shift['median_a']:.4g} -> {shift['median_b']:.4g}")


@release.command("verify", epilog=example("release verify negclip-normsim/1"))
@click.argument("reference")
@_release_options
@click.option("--no-rederive", is_flag=True, help="Only check the files against SHA256SUMS.")
def release_verify(reference: str, home: str | None, releases_uri: str | None, no_rederive: bool) -> None:
    """Check checksums and re-derive the uid set from the pinned table versions; exit 1 on any difference."""
    from curation_platform.releases import verify_release

    result = verify_release(_release_uri(home, releases_uri, reference), rederive=not no_rederive)
    click.echo(f"{result.release_id}: {result.files_checked} files checked")
    for label, names in (("changed", result.mismatched), ("missing", result.missing),
                         ("not in SHA256SUMS", result.unlisted), ("malformed SHA256SUMS", result.malformed),
                         ("pinned table version gone", result.pins_missing), ("problem", result.problems)):
        for name in names:
            click.echo(f"  {label}: {name}")
    if result.uids_identical is not None:
        click.echo("  re-derivation: " + ("identical uid set" if result.uids_identical else
                                          f"DIFFERENT uid set (+{result.uids_added} -{result.uids_removed})"))
    click.echo("OK" if result.ok else "FAILED")
    if not result.ok:
        sys.exit(1)


@release.command("derive", epilog=example("release derive --from negclip-normsim/1 --exclude takedown_uids.txt"))
@click.option("--from", "parent", required=True, help="Parent release (name, name/version or path).")
@click.option("--exclude", "exclude_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file of uids to leave out, one per line.")
@_release_options
def release_derive(parent: str, exclude_path: str, home: str | None, releases_uri: str | None) -> None:
    """A new version of a release without the listed samples, recording its parent and the list's hash."""
    from curation_platform.releases import derive_release

    uids = Path(exclude_path).read_text().split()
    created = derive_release(_release_uri(home, releases_uri, parent), uids, _releases_uri(home, releases_uri))
    removed = created.manifest["parent"] and created.manifest["exclusions"]["count"]
    click.echo(f"release {created.release_id}: {created.manifest['selected']:,} samples at {created.uri} "
               f"({removed} uids excluded, parent {created.manifest['parent']['release_id']})")


@release.command("export", epilog=example("release export negclip-normsim/1 --out ./shards"))
@click.argument("reference")
@_release_options
@click.option("--out", "out_uri", required=True, help=f"Folder for the shards ({ANY_URL}; new, empty or "
              "holding this same export).")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples in each output tar.")
def release_export(reference: str, home: str | None, releases_uri: str | None, out_uri: str,
                   samples_per_shard: int) -> None:
    """Write a release's samples as webdataset training shards (image bytes unchanged), for open_clip's
    --train-data or webdataset; REFERENCE: name, name/version or path."""
    from curation_platform.evaluation.export import ExportError, export_release
    from curation_platform.releases import open_release

    uri = _release_uri(home, releases_uri, reference)
    total = open_release(uri).manifest.get("selected")
    with bar("exporting", total=total) as exported:
        try:
            result = export_release(uri, out_uri, samples_per_shard=samples_per_shard, on_shard=exported.update)
        except ExportError as error:
            raise click.ClickException(str(error)) from error
    click.echo(f"{result.samples:,} samples in {len(result.shards)} shards at {result.uri}")
    click.echo(f"  shards: {result.brace_pattern}")


def _evaluations_uri(home: str | None, evaluations_uri: str | None) -> str:
    return evaluations_uri or project_layout(home).evaluations


def echo_evaluation(record: dict, uri: str) -> None:
    """The record's per-arm table and its verdicts against the baselines."""
    click.echo(f"evaluation {record['evaluation_id']} at {uri}")
    compute = record["compute"]
    click.echo(f"  {record['scale']['name']} scale: {record['scale']['model']}, {compute['samples_seen']:,} samples "
               f"seen ({compute['steps']} steps of {compute['batch_size']}) per run, seeds {record['seeds']}")
    from curation_platform.evaluation.arms import ARMS

    for arm, by_metric in sorted(record["summary"]["arms"].items(), key=lambda item: ARMS.index(item[0])):
        cells = ", ".join(f"{metric} {value['mean']:.3f} ± {value['sd']:.3f}" for metric, value in by_metric.items())
        click.echo(f"  {arm:<8} {cells}")
    for baseline, by_metric in record["summary"]["comparisons"].items():
        for metric, comparison in by_metric.items():
            click.echo(f"  vs {baseline:<7} {metric}: {comparison['difference']:+.3f} "
                       f"(se {comparison['standard_error']:.3f}) {comparison['verdict']}")
    for metric in record["at_chance"]:
        click.echo(f"WARNING: every arm scores {metric} near chance ({record['chance'][metric]:.3f}): this scale "
                   "cannot rank them on it (a larger scale or more samples seen)", err=True)


@release.command("evaluate", epilog=example("release evaluate negclip-normsim/1 --scale demo --seeds 2"))
@click.argument("reference")
@_release_options
@click.option("--scale", "scale_name", type=click.Choice(["demo", "small", "medium"]), default="demo",
              show_default=True, help="Evaluation scale: the fixed student recipe and samples seen.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Seeds per arm (default: the scale's).")
@click.option("--baselines", default="random,pool", show_default=True,
              help="Comma-separated baselines at equal compute: random (equal size), pool (no filtering).")
@click.option("--benchmarks", "benchmarks_uri", default=None,
              help="Folder of clip_benchmark webdatasets (default: the demo's eval split).")
@click.option("--evaluations", "evaluations_uri", default=None, help="Where records go (default <home>/evaluations).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
def release_evaluate(reference: str, home: str | None, releases_uri: str | None, scale_name: str, seeds: int | None,
                     baselines: str, benchmarks_uri: str | None, evaluations_uri: str | None,
                     device: str | None) -> None:
    """Train a student CLIP from scratch on a release (open_clip_train) and on its baselines at equal compute,
    evaluate them zero-shot (clip_benchmark) and publish a checksummed record; REFERENCE: name, name/version
    or path."""
    from curation_platform.evaluation.evaluate import evaluate_release, project_benchmarks
    from curation_platform.evaluation.record import write_leaderboard
    from curation_platform.evaluation.scales import get_scale

    scale = get_scale(scale_name)
    chosen = tuple(name.strip() for name in baselines.split(",") if name.strip())
    seed_list = list(range(seeds if seeds is not None else scale.seeds))
    try:
        sets = project_benchmarks(project_layout(home), benchmarks_uri)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    evaluations = _evaluations_uri(home, evaluations_uri)
    with bar("training students", total=len(seed_list) * (1 + len(chosen)), unit="run") as runs:
        def on_run(run: dict) -> None:
            runs.update()
            runs.set_postfix(arm=run["arm"], seed=run["seed"])

        evaluated = evaluate_release(_release_uri(home, releases_uri, reference), evaluations, scale, sets,
                                     seeds=seed_list, baselines=chosen, device=device, on_run=on_run)
    echo_evaluation(evaluated.record, evaluated.uri)
    board = write_leaderboard(evaluations)
    click.echo(f"leaderboard: {board['markdown']}")


@release.command("leaderboard", epilog=example("release leaderboard --home ./curation_home"))
@_release_options
@click.option("--evaluations", "evaluations_uri", default=None, help="Where records are (default <home>/evaluations).")
def release_leaderboard(home: str | None, releases_uri: str | None, evaluations_uri: str | None) -> None:
    """Rank every evaluated release next to its baselines (writes leaderboard.md / .png / .parquet)."""
    from curation_platform import storage
    from curation_platform.evaluation.record import write_leaderboard

    written = write_leaderboard(_evaluations_uri(home, evaluations_uri))
    if not written:
        raise click.ClickException("no evaluation records yet: run `curation-platform release evaluate` first")
    click.echo(storage.read_bytes(written["markdown"]).decode().rstrip())
    click.echo(f"\n{written['markdown']}, {written['png']}")
