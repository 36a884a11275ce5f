"""The ``curation-platform`` command line: the library's entry points without Dagster."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from tqdm import tqdm

from curation_platform import __version__
from curation_platform.ingest import ShardReport, ingest_pool, write_ingestion
from curation_platform.pool import ChecksumCache, ShardRef, discover_shards
from curation_platform.precision import PRECISIONS
from curation_platform.validation import ValidationLimits

DEFAULT_HOME = "curation_home"


def home_path(home: str | None) -> Path:
    return Path(home or os.environ.get("CURATION_HOME") or DEFAULT_HOME).resolve()


def _limits_options(function):
    options = [
        click.option("--min-side", type=int, default=ValidationLimits.min_image_side, show_default=True,
                     help="Quarantine images whose shorter side is below this many pixels."),
        click.option("--max-pixels", type=int, default=ValidationLimits.max_pixels, show_default=True,
                     help="Quarantine images declaring more pixels (decompression-bomb guard)."),
        click.option("--max-caption-chars", type=int, default=ValidationLimits.max_caption_chars, show_default=True,
                     help="Quarantine captions longer than this."),
        click.option("--workers", type=int, default=min(4, os.cpu_count() or 1), show_default=True,
                     help="Image-decoding worker processes (0 decodes in this process)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _discover(pool_uri: str, home: Path | None) -> list[ShardRef]:
    cache = ChecksumCache(home / "state" / "checksums.sqlite") if home else None
    with tqdm(desc="discovering shards", unit="shard", file=sys.stderr, leave=False) as bar:
        return discover_shards(pool_uri, checksum_cache=cache, on_shard=lambda _: bar.update())


def _ingest(shards: list[ShardRef], limits: ValidationLimits, workers: int, out_uri: str | None) -> list[ShardReport]:
    reports = []
    total = sum(shard.tar.size for shard in shards if shard.tar)
    with tqdm(total=total, desc="validating", unit="B", unit_scale=True, file=sys.stderr) as bar:
        for ingestion in ingest_pool(shards, limits=limits, workers=workers):
            if out_uri:
                write_ingestion(ingestion, out_uri)
            reports.append(ingestion.report)
            bar.update(ingestion.report.bytes_read)
            bar.set_postfix(shard=ingestion.report.shard, accepted=ingestion.report.accepted)
    return reports


def _print_reports(reports: list[ShardReport]) -> None:
    click.echo(f"{'shard':<12} {'total':>8} {'accepted':>9} {'quarant.':>9}  reasons")
    for report in reports:
        reasons = ", ".join(f"{reason}={count}" for reason, count in report.by_reason.items())
        click.echo(f"{report.shard:<12} {report.total:>8} {report.accepted:>9} {report.quarantined:>9}  {reasons}")
        for error in report.errors:
            click.echo(f"{'':<12} ERROR: {error}")
    total = sum(report.total for report in reports)
    accepted = sum(report.accepted for report in reports)
    click.echo(f"{'all':<12} {total:>8} {accepted:>9} {total - accepted:>9}  ({len(reports)} shards)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curation-platform")
def main() -> None:
    """Curate image-text pretraining sets from raw webdataset pools with CLIP-style teachers."""


@main.command("demo-pool")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the demo pool (pool/, reference/, target/, eval/ and ground truth).")
@click.option("--shards", type=int, default=4, show_default=True, help="Shards in the raw pool split.")
@click.option("--samples-per-shard", type=int, default=500, show_default=True, help="Samples per pool shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same seed writes identical bytes.")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes generating shards.")
def demo_pool(out: Path, shards: int, samples_per_shard: int, seed: int, workers: int) -> None:
    """Write a synthetic pool in img2dataset format with labelled corruptions and clean splits."""
    summary = build_demo_pool_into(out, shards, samples_per_shard, seed, workers)
    click.echo(json.dumps(summary, indent=2))


def build_demo_pool_into(out: Path, shards: int, samples_per_shard: int, seed: int, workers: int,
                     reuse: bool = False) -> dict:
    """Build the demo pool; with ``reuse``, a complete pool of the same config is kept as it is."""
    from curation_platform.demo import DemoPoolConfig, build_demo_pool
    from curation_platform.demo.pool import MANIFEST_FILE

    config = DemoPoolConfig(out=out, shards=shards, samples_per_shard=samples_per_shard, seed=seed, workers=workers)
    manifest = out / MANIFEST_FILE
    if reuse and manifest.exists():
        existing = json.loads(manifest.read_text())
        if existing.get("config") == config.to_dict():
            click.echo(f"reusing the demo pool in {out} (same config; delete it to rebuild)")
            return existing
        raise click.ClickException(f"{out} holds a demo pool of another config; delete it or choose another --home")
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"demo {stage}", unit="shard", file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    try:
        return build_demo_pool(config, progress=progress).to_dict()
    except FileExistsError as error:
        raise click.ClickException(str(error)) from error
    finally:
        for bar in bars.values():
            bar.close()


@main.command()
@click.argument("pool_uri")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def discover(pool_uri: str, as_json: bool) -> None:
    """List a pool's shards with their ids (name + content checksum)."""
    shards = _discover(pool_uri, None)
    if as_json:
        rows = [{"name": s.name, "shard_id": s.shard_id, "checksum": s.checksum,
                 "files": {kind: entry.uri for kind, entry in s.files.items()}} for s in shards]
        click.echo(json.dumps(rows, indent=2))
        return
    for shard in shards:
        click.echo(f"{shard.shard_id}  {' '.join(sorted(shard.files))}")


@main.command()
@click.argument("pool_uri")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@_limits_options
def validate(pool_uri: str, as_json: bool, min_side: int, max_pixels: int, max_caption_chars: int, workers: int) -> None:
    """Lint a pool (or one shard's .tar) and print per-shard accounting; writes nothing.

    Exits with status 1 when a shard has shard-level errors (unreadable tar or parquet).
    """
    limits = ValidationLimits(min_image_side=min_side, max_pixels=max_pixels, max_caption_chars=max_caption_chars)
    reports = _ingest(_discover(pool_uri, None), limits, workers, out_uri=None)
    if as_json:
        click.echo(json.dumps({"pool": pool_uri, "shards": [report.to_dict() for report in reports]}, indent=2))
    else:
        _print_reports(reports)
    if any(report.errors for report in reports):
        sys.exit(1)


@main.command()
@click.argument("pool_uri")
@click.option("--out", "out_uri", required=True, help="Where validated samples go (local path or s3:// URI).")
@click.option("--home", default=None, help="Project home for state such as the checksum cache [env CURATION_HOME].")
@_limits_options
def ingest(pool_uri: str, out_uri: str, home: str | None, min_side: int, max_pixels: int,
           max_caption_chars: int, workers: int) -> None:
    """Validate a pool and write samples/, quarantine/ and reports/ per shard under OUT."""
    limits = ValidationLimits(min_image_side=min_side, max_pixels=max_pixels, max_caption_chars=max_caption_chars)
    _print_reports(_ingest(_discover(pool_uri, home_path(home)), limits, workers, out_uri))


def teacher_options(function):
    options = [
        click.option("--teacher", "teacher_checkpoint", default=None,
                     help="Teacher directory or checkpoint file (local or s3://), e.g. one train-teacher wrote."),
        click.option("--arch", default=None, help="open_clip architecture (with --pretrained or a checkpoint file)."),
        click.option("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai (needs hub access)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def teacher_spec(teacher_checkpoint: str | None, arch: str | None, pretrained: str | None):
    from curation_platform.teachers import TeacherSpec

    try:
        return TeacherSpec(architecture=arch, pretrained=pretrained, checkpoint=teacher_checkpoint)
    except ValueError as error:
        raise click.UsageError(str(error)) from error


def _embed(pool_uri: str, validated_uri: str, lance_uri: str, table: str, spec, device: str, batch_size: int,
           workers: int, home: Path | None) -> None:
    from curation_platform.embedding.engine import EmbedConfig, embed_shards
    from curation_platform.embedding.sinks import LanceSink
    from curation_platform.ingest import read_accepted
    from curation_platform.teachers import load_teacher

    config = EmbedConfig(device=device, batch_size=batch_size, workers=workers)
    teacher = load_teacher(spec, device=config.resolved_device())
    click.echo(f"teacher {teacher.teacher_id}: {teacher.spec.describe()}, a = {teacher.logit_scale:.1f}")
    sink = LanceSink(lance_uri, table=table)
    jobs = [(shard, read_accepted(validated_uri, shard)) for shard in _discover(pool_uri, home)]
    started = time.perf_counter()
    with tqdm(total=sum(samples.num_rows for _, samples in jobs), desc="embedding", unit="pair",
              file=sys.stderr) as bar:
        embed_shards(teacher, jobs, sink, config, on_shard=lambda report: bar.update(report.rows))
    rows = sum(samples.num_rows for _, samples in jobs)
    seconds = time.perf_counter() - started
    click.echo(f"embedded {rows} pairs of {len(jobs)} shards into {lance_uri}/{table} in {seconds:.1f} s "
               f"({rows / max(seconds, 1e-9):.0f} pairs/s on {config.resolved_device()})")


@main.command()
@click.argument("pool_uri")
@click.option("--validated", "validated_uri", required=True, help="Where `ingest --out` wrote validated samples.")
@click.option("--lance", "lance_uri", required=True, help="LanceDB database (local path or s3:// URI).")
@click.option("--table", default="embeddings", show_default=True, help="LanceDB table name.")
@teacher_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Pairs per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="Decode/tokenize worker processes.")
def embed(pool_uri: str, validated_uri: str, lance_uri: str, table: str, teacher_checkpoint: str | None,
          arch: str | None, pretrained: str | None, device: str, batch_size: int, workers: int) -> None:
    """Embed every validated shard of a pool with a teacher into LanceDB (idempotent per shard)."""
    _embed(pool_uri, validated_uri, lance_uri, table, teacher_spec(teacher_checkpoint, arch, pretrained),
           device, batch_size, workers, None)


def _score(lance_uri: str, spec, target_uri: str | None, params, analysis_dir: Path | None,
           validated_uri: str | None = None) -> None:
    from curation_platform.embedding.engine import EmbedConfig
    from curation_platform.scoring.run import build_context, embed_target, score_pool
    from curation_platform.teachers import load_teacher

    teacher = load_teacher(spec)
    target = embed_target(teacher, target_uri, EmbedConfig()) if target_uri else None
    context = build_context(teacher, lance_uri, params, target)
    described = context.describe()
    click.echo(f"reference {described['reference_id']} (N = {described['reference_size']}), "
               f"target {described['target_id']} (|T| = {described['target_size']}), "
               f"negCLIPLoss B = {described['neg_clip_batch_size_effective']}, K = {params.neg_clip_repeats}")
    started = time.perf_counter()
    with tqdm(desc="scoring", unit="shard", file=sys.stderr) as bar:
        results = score_pool(context, lance_uri, on_shard=lambda _: bar.update())
    rows = sum(result.rows for result in results)
    click.echo(f"scored {rows} samples of {len(results)} shards in {time.perf_counter() - started:.1f} s "
               f"into {lance_uri}/scores")
    if analysis_dir:
        _analyse(lance_uri, teacher.teacher_id, analysis_dir, validated_uri)


def _analyse(lance_uri: str, teacher_id: str, out: Path, validated_uri: str | None,
             max_rows: int = 2_000_000) -> None:
    """Summary, histograms, correlations and (with captions) KL-decile n-gram coverage, as PNG + parquet,
    on a uniform uid sample of at most ``max_rows`` scored samples."""
    import polars as pl

    from curation_platform.analysis import write_pool_analysis
    from curation_platform.ingest import read_captions
    from curation_platform.scoring.pipeline import SCORE_COLUMNS, uid_sample_bound
    from curation_platform.scoring.run import count_scores, read_scores

    uid_below = uid_sample_bound(count_scores(lance_uri, teacher_id), max_rows)
    frame = pl.from_arrow(read_scores(lance_uri, teacher_id, columns=["uid", *SCORE_COLUMNS], uid_below=uid_below))
    columns = [name for name in SCORE_COLUMNS if frame[name].is_not_nan().any()]
    captions = pl.from_arrow(read_captions(validated_uri, uid_below=uid_below)) if validated_uri else None
    written = write_pool_analysis(frame, columns, out, captions)
    click.echo("analysis: " + ", ".join(str(path) for name, path in written.items() if name.endswith("_png")))


def _score_options(function):
    options = [
        click.option("--target", "target_uri", default=None,
                     help="NormSim target: webdataset shards (local or s3://) or a local folder of images."),
        click.option("--reference-size", type=int, default=25_000, show_default=True,
                     help="N pairs drawn uniformly from the pool as the marginal reference."),
        click.option("--reference-seed", type=int, default=0, show_default=True, help="Seed of the reference draw."),
        click.option("--batch-size", "neg_clip_batch_size", type=int, default=32_768, show_default=True,
                     help="negCLIPLoss batch size B (mates from the reference)."),
        click.option("--repeats", type=int, default=10, show_default=True, help="negCLIPLoss repetitions K."),
        click.option("--prompt", "prompts", multiple=True, help="Domain prompt for importance weights (repeatable)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command()
@click.option("--lance", "lance_uri", required=True, help="LanceDB database holding the embeddings.")
@teacher_options
@_score_options
@click.option("--analysis", "analysis_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write score histograms and correlations (PNG + parquet) here.")
@click.option("--validated", "validated_uri", default=None,
              help="Validated samples (local) for captions: adds KL-decile n-gram coverage to --analysis.")
def score(lance_uri: str, teacher_checkpoint: str | None, arch: str | None, pretrained: str | None,
          target_uri: str | None, reference_size: int, reference_seed: int, neg_clip_batch_size: int, repeats: int,
          prompts: tuple[str, ...], analysis_dir: Path | None, validated_uri: str | None) -> None:
    """Score every embedded shard (all of SCORES.md) against one stored reference sample and target."""
    from curation_platform.scoring.pipeline import ScoreParams

    params = ScoreParams(reference_size=reference_size, reference_seed=reference_seed,
                         neg_clip_batch_size=neg_clip_batch_size, neg_clip_repeats=repeats, prompts=prompts)
    _score(lance_uri, teacher_spec(teacher_checkpoint, arch, pretrained), target_uri, params, analysis_dir,
           validated_uri)


class TrainingBar:
    """Per-step progress of a teacher's training on stderr: steps, loss, steps/s and time left."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "data":
            click.echo(f"training the teacher: {event['train']:,} pairs ({event['held_out']:,} held out), "
                       f"{event['total_steps']} steps, {event['precision']} on this CPU", err=True)
            self.bar = tqdm(total=event["total_steps"], desc="training teacher", unit="step", file=sys.stderr)
        elif stage == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.3f}", epoch=event["epoch"], refresh=False)
        elif stage == "saved" and self.bar is not None:
            self.bar.close()
            self.bar = None


def training_options(function):
    options = [
        click.option("--epochs", type=int, default=None, help="Training epochs (default: TrainingConfig's, 15)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="Autocast of training steps: auto is bf16 where the CPU has native bf16 (AVX512-BF16/AMX), "
                          "else fp32."),
        click.option("--threads", type=int, default=None,
                     help="torch threads for training (default 2; part of what makes the weights reproducible)."),
        click.option("--max-seconds", type=float, default=None,
                     help="Fail (and publish nothing) if training would take longer than this."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def training_overrides(epochs: int | None, precision: str, threads: int | None,
                        max_seconds: float | None) -> dict:
    """TeacherResource / TrainingConfig fields the user set on the command line."""
    chosen = {"epochs": epochs, "threads": threads, "max_seconds": max_seconds}
    return {"precision": precision} | {name: value for name, value in chosen.items() if value is not None}


@main.command("train-teacher")
@click.argument("reference_uri")
@click.option("--out", "out_uri", required=True, help="Teacher directory to write (local path or s3:// URI).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation, split and order.")
@training_options
def train_teacher_command(reference_uri: str, out_uri: str, seed: int, epochs: int | None, precision: str,
                          threads: int | None, max_seconds: float | None) -> None:
    """Train a small CLIP teacher on a trusted reference split (the data-filtering-network idea).

    Training runs a fixed number of steps: the same split, options and seed give the same weights on
    any machine of the same CPU capability, however loaded. Exit status 1 when the teacher misses the
    quality bar (it is still written, for inspection).
    """
    from curation_platform.teacher_quality import TeacherBar
    from curation_platform.training import TrainingConfig, TrainingTimeLimitExceeded, train_teacher

    config = replace(TrainingConfig(seed=seed), **training_overrides(epochs, precision, threads, max_seconds))
    try:
        report = train_teacher(reference_uri, out_uri, config, progress=TrainingBar())
    except TrainingTimeLimitExceeded as error:
        raise click.ClickException(str(error)) from error
    metrics = report.held_out
    click.echo(f"teacher {report.teacher_id} written to {out_uri} in {report.seconds_total:.0f} s "
               f"({report.samples_train} training pairs, {report.steps} steps, {report.precision}, "
               f"CPU {report.cpu['cpu_capability']})")
    click.echo(f"held-out retrieval on {metrics.samples} pairs: image->text R@1 {metrics.i2t_recall_at_1:.3f} "
               f"R@5 {metrics.i2t_recall_at_5:.3f}, text->image R@1 {metrics.t2i_recall_at_1:.3f} "
               f"R@5 {metrics.t2i_recall_at_5:.3f} (chance {metrics.chance_at_1:.4f} / {metrics.chance_at_5:.4f})")
    shortfalls = TeacherBar().shortfalls(metrics)
    if shortfalls:
        click.echo("BELOW THE QUALITY BAR: " + "; ".join(shortfalls) + ". More clean pairs, more epochs or a "
                   "pretrained teacher; the pipeline will refuse to embed with this one.", err=True)
        sys.exit(1)


# -- releases -----------------------------------------------------------------------------------

@main.group()
def release() -> None:
    """Curated releases: create from a recipe, list, show, diff, verify, derive."""


def _releases_uri(home: str | None, releases: str | None) -> str:
    return releases or str(home_path(home) / "releases")


def _release_options(function):
    options = [
        click.option("--home", default=None, help=f"Project home (default ./{DEFAULT_HOME}) [env CURATION_HOME]."),
        click.option("--releases", "releases_uri", default=None,
                     help="Where releases live (local or s3://; default <home>/releases)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _current_teacher_id(lance_uri: str) -> str:
    from curation_platform import lance_tables
    from curation_platform.scoring.pipeline import SCORES_TABLE

    rows = lance_tables.connect(lance_uri).open_table(SCORES_TABLE).to_lance().to_table(columns=["teacher_id"])
    teachers = sorted(set(rows.column("teacher_id").to_pylist()))
    if len(teachers) != 1:
        raise click.UsageError(f"the scores hold teachers {teachers}: choose one with --teacher-id")
    return teachers[0]


def echo_funnel(manifest: dict) -> None:
    for stage in manifest["funnel"]:
        click.echo(f"  {stage['rows']:>10,}  {stage['stage']}")


@release.command("create")
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

    root = home_path(home)
    lance_uri = lance_uri or str(root / "lancedb")
    try:
        recipe = load_recipe(recipe_path)
        sources = ReleaseSources(lance_uri, validated_uri or str(root / "validated"),
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


@release.command("list")
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
    from curation_platform.releases.store import versions_of

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


@release.command("show")
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


@release.command("diff")
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


@release.command("verify")
@click.argument("reference")
@_release_options
@click.option("--no-rederive", is_flag=True, help="Only check the files against SHA256SUMS.")
def release_verify(reference: str, home: str | None, releases_uri: str | None, no_rederive: bool) -> None:
    """Check checksums and re-derive the uid set from the pinned table versions; exit 1 on any difference."""
    from curation_platform.releases import verify_release

    result = verify_release(_release_uri(home, releases_uri, reference), rederive=not no_rederive)
    click.echo(f"{result.release_id}: {result.files_checked} files checked")
    for label, names in (("changed", result.mismatched), ("missing", result.missing),
                         ("not in SHA256SUMS", result.unlisted), ("pinned table version gone", result.pins_missing)):
        for name in names:
            click.echo(f"  {label}: {name}")
    if result.uids_identical is not None:
        click.echo("  re-derivation: " + ("identical uid set" if result.uids_identical else
                                          f"DIFFERENT uid set (+{result.uids_added} -{result.uids_removed})"))
    click.echo("OK" if result.ok else "FAILED")
    if not result.ok:
        sys.exit(1)


@release.command("derive")
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
