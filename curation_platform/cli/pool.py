"""Pool commands: ``demo-pool``, ``discover``, ``validate`` and ``ingest`` (per-shard accounting)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from tqdm import tqdm

from curation_platform.cli.display import bar, example
from curation_platform.cli.group import ANY_URL, main, one_line, project_layout, stack
from curation_platform.ingest import ShardReport, ingest_pool, write_ingestion
from curation_platform.layout import ProjectLayout, ShardOutputs
from curation_platform.pool import ChecksumCache, ShardRef, discover_shards, machine_checksum_cache
from curation_platform.uid_registry import LanceUidRegistry, MemoryUidRegistry
from curation_platform.validation import ValidationLimits

_limits_options = stack([
    click.option("--min-side", type=click.IntRange(min=1), default=ValidationLimits.min_image_side, show_default=True,
                 help="Quarantine images whose shorter side is below this many pixels."),
    click.option("--max-pixels", type=click.IntRange(min=1), default=ValidationLimits.max_pixels, show_default=True,
                 help="Quarantine images declaring more pixels (decompression-bomb guard)."),
    click.option("--max-caption-chars", type=click.IntRange(min=1), default=ValidationLimits.max_caption_chars, show_default=True,
                 help="Quarantine captions longer than this."),
    click.option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1), show_default=True,
                 help="Image-decoding worker processes (0 decodes in this process)."),
])


def discover_with_progress(pool_uri: str, layout: ProjectLayout | None) -> list[ShardRef]:
    cache_path = (layout.checksum_cache or machine_checksum_cache()) if layout else None
    cache = ChecksumCache(cache_path) if cache_path else None
    try:
        with bar("discovering shards", unit="shard", leave=False) as found:
            shards = discover_shards(pool_uri, checksum_cache=cache, on_shard=lambda _: found.update())
    except FileNotFoundError as error:
        # a brace list names the shard files that are missing
        message = f"{pool_uri} does not exist" if "{" not in pool_uri else one_line(error)
        raise click.BadParameter(message, param_hint="POOL_URI") from error
    except (OSError, ValueError) as error:
        raise click.BadParameter(f"cannot read a pool at {pool_uri}: {one_line(error)}", param_hint="POOL_URI") \
            from error
    if not shards:
        raise click.BadParameter(f"no shards (NAME.tar / NAME.parquet) at {pool_uri}", param_hint="POOL_URI")
    return shards


def _ingest(shards: list[ShardRef], limits: ValidationLimits, workers: int, out_uri: str | None) -> list[ShardReport]:
    """Ingest in name order; with ``out_uri`` the uid registry persists there, else it lasts for this run.

    The bar counts tar bytes (a shard's sample count is known only once it is read), within each shard.
    """
    reports = []
    sizes = {shard.name: shard.tar.size if shard.tar else 0 for shard in shards}
    registry = LanceUidRegistry(ShardOutputs.uid_registry(out_uri)) if out_uri else MemoryUidRegistry()
    with bar("validating", total=sum(sizes.values()), unit="B", unit_scale=True) as read:
        finished = 0  # bytes of the shards already ingested

        def within_shard(position: int) -> None:
            read.update(finished + position - read.n)

        for ingestion in ingest_pool(shards, limits=limits, workers=workers, registry=registry,
                                     on_tar_bytes=within_shard):
            if out_uri:
                write_ingestion(ingestion, out_uri)
            reports.append(ingestion.report)
            finished += sizes[ingestion.report.shard]
            read.update(finished - read.n)
            read.set_postfix(shard=ingestion.report.shard, accepted=ingestion.report.accepted)
    return reports


def _print_reports(reports: list[ShardReport]) -> None:
    click.echo(f"{'shard':<12} {'total':>8} {'accepted':>9} {'quarant.':>9}  reasons")
    for report in reports:
        reasons = ", ".join(f"{reason}={count}" for reason, count in report.by_reason.items())
        click.echo(f"{report.shard:<12} {report.total:>8} {report.accepted:>9} {report.quarantined:>9}  {reasons}")
        for error in report.errors:
            click.echo(f"{'':<12} ERROR: {error}")
        for warning in report.warnings:
            click.echo(f"{'':<12} warning: {warning}")
    total = sum(report.total for report in reports)
    accepted = sum(report.accepted for report in reports)
    click.echo(f"{'all':<12} {total:>8} {accepted:>9} {total - accepted:>9}  ({len(reports)} shards)")



@main.command("demo-pool", epilog=example("demo-pool --out ./demo --shards 2 --samples-per-shard 200"))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the demo pool (pool/, reference/, target/, eval/ and ground truth).")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Shards in the raw pool split.")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=500, show_default=True, help="Samples per pool shard.")
@click.option("--pool-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the generator: the same seed writes identical bytes.")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Processes generating shards.")
def demo_pool(out: Path, shards: int, samples_per_shard: int, pool_seed: int, workers: int) -> None:
    """Write a synthetic pool in img2dataset format with labelled corruptions and clean splits."""
    summary = build_demo_pool_into(out, shards, samples_per_shard, pool_seed, workers)
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
        split = bars.get(stage)
        if split is None:
            split = bars[stage] = bar(f"demo {stage}", total=total, unit="shard", leave=False)
        split.update(done - split.n)

    try:
        return build_demo_pool(config, progress=progress).to_dict()
    except FileExistsError as error:
        raise click.ClickException(str(error)) from error
    finally:
        for split in bars.values():
            split.close()


@main.command(epilog=example("discover s3://bucket/pool --json"))
@click.argument("pool_uri")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def discover(pool_uri: str, as_json: bool) -> None:
    """List a pool's shards with their ids (name + content checksum)."""
    shards = discover_with_progress(pool_uri, None)
    if as_json:
        rows = [{"name": s.name, "shard_id": s.shard_id, "checksum": s.checksum,
                 "files": {kind: entry.uri for kind, entry in s.files.items()}} for s in shards]
        click.echo(json.dumps(rows, indent=2))
        return
    for shard in shards:
        click.echo(f"{shard.shard_id}  {' '.join(sorted(shard.files))}")


@main.command(epilog=example("validate ./pool --min-side 64 --json"))
@click.argument("pool_uri")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@_limits_options
def validate(pool_uri: str, as_json: bool, min_side: int, max_pixels: int, max_caption_chars: int, workers: int) -> None:
    """Lint a pool (or one shard's .tar) and print per-shard accounting; writes nothing.

    Exits with status 1 when a shard has shard-level errors (unreadable tar or parquet).
    """
    limits = ValidationLimits(min_image_side=min_side, max_pixels=max_pixels, max_caption_chars=max_caption_chars)
    reports = _ingest(discover_with_progress(pool_uri, None), limits, workers, out_uri=None)
    if as_json:
        click.echo(json.dumps({"pool": pool_uri, "shards": [report.to_dict() for report in reports]}, indent=2))
    else:
        _print_reports(reports)
    if any(report.errors for report in reports):
        sys.exit(1)


@main.command(epilog=example("ingest ./pool --out ./validated --workers 8"))
@click.argument("pool_uri")
@click.option("--out", "out_uri", required=True, help=f"Where validated samples go ({ANY_URL}).")
@click.option("--home", default=None, help="Project home for state such as the checksum cache [env CURATION_HOME].")
@_limits_options
def ingest(pool_uri: str, out_uri: str, home: str | None, min_side: int, max_pixels: int,
           max_caption_chars: int, workers: int) -> None:
    """Validate a pool and write samples/, quarantine/ and reports/ per shard under OUT.

    Exits with status 1 when a shard has shard-level errors, as ``validate`` does (its report says why).
    """
    limits = ValidationLimits(min_image_side=min_side, max_pixels=max_pixels, max_caption_chars=max_caption_chars)
    reports = _ingest(discover_with_progress(pool_uri, project_layout(home)), limits, workers, out_uri)
    _print_reports(reports)
    if any(report.errors for report in reports):
        sys.exit(1)
