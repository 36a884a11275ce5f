"""Teacher commands: ``train-teacher`` (with per-step progress) and ``embed`` (a pool into LanceDB)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Self

import click
from tqdm import tqdm

from curation_platform.cli.display import activity, bar, example, warn
from curation_platform.cli.group import ANY_URL, main, one_line, stack
from curation_platform.cli.pool import discover_with_progress
from curation_platform.layout import ProjectLayout
from curation_platform.precision import PRECISIONS

teacher_options = stack([
    click.option("--teacher", "teacher_checkpoint", default=None,
                 help=f"Teacher directory or checkpoint file ({ANY_URL}), e.g. one train-teacher wrote."),
    click.option("--arch", default=None, help="open_clip architecture (with --pretrained or a checkpoint file)."),
    click.option("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai (needs hub access)."),
])


def teacher_spec(teacher_checkpoint: str | None, arch: str | None, pretrained: str | None):
    from curation_platform.teachers import TeacherSpec

    try:
        return TeacherSpec(architecture=arch, pretrained=pretrained, checkpoint=teacher_checkpoint)
    except ValueError as error:
        raise click.UsageError(str(error)) from error


def load_cli_teacher(spec, device="cpu"):
    """``load_teacher``, a bad teacher file shown as click's one line ``Error: <file>: <problem>`` (status 1)."""
    from curation_platform.teachers import TeacherLoadError, load_teacher

    try:
        with activity(f"loading the teacher ({spec.describe()})"):
            return load_teacher(spec, device=device)
    except TeacherLoadError as error:
        raise click.ClickException(str(error)) from error


def _embed(pool_uri: str, validated_uri: str, lance_uri: str, table: str, spec, device: str, batch_size: int,
           workers: int, layout: ProjectLayout | None) -> None:
    from curation_platform.embedding.engine import EmbedConfig, embed_shards
    from curation_platform.embedding.sinks import LanceSink
    from curation_platform.ingest import read_accepted

    config = EmbedConfig(device=device, batch_size=batch_size, workers=workers)
    try:  # every input is checked before the teacher loads or anything is written under --lance
        jobs = [(shard, read_accepted(validated_uri, shard)) for shard in discover_with_progress(pool_uri, layout)]
    except (OSError, ValueError) as error:
        raise click.BadParameter(f"{one_line(error)}: run `curation-platform ingest POOL_URI --out {validated_uri}` "
                                 "first", param_hint="'--validated'") from error
    teacher = load_cli_teacher(spec, device=config.resolved_device())
    click.echo(f"teacher {teacher.teacher_id}: {teacher.spec.describe()}, a = {teacher.logit_scale:.1f}")
    sink = LanceSink(lance_uri, table=table)
    started = time.perf_counter()
    with bar("embedding", total=sum(samples.num_rows for _, samples in jobs), unit="pair") as embedded:
        reports = embed_shards(teacher, jobs, CountedSink(sink, embedded), config)
    rows = sum(report.commit.rows for report in reports)
    seconds = time.perf_counter() - started
    click.echo(f"embedded {rows} pairs of {len(jobs)} shards into {lance_uri}/{table} in {seconds:.1f} s "
               f"({rows / max(seconds, 1e-9):.0f} pairs/s on {config.resolved_device()})")
    refused = {report.shard: report.commit.refused for report in reports if report.commit.refused}
    if refused:
        shards = ", ".join(f"{shard} ({count})" for shard, count in refused.items())
        raise click.ClickException(f"pairs not written, their uids are already another shard's rows: {shards}; "
                                   "re-run `ingest`, which quarantines them as cross_shard_duplicate")


class CountedSink:
    """A sink whose every written batch moves a bar: the engine reports shards, this counts pairs within them."""

    def __init__(self, sink: Any, counted: tqdm) -> None:
        self.sink, self.counted = sink, counted

    @property
    def last_commit(self) -> Any:
        return self.sink.last_commit

    @contextmanager
    def shard_writer(self, shard: str, teacher_id: str, dim: int) -> Iterator[CountedWriter]:
        with self.sink.shard_writer(shard, teacher_id, dim) as writer:
            yield CountedWriter(writer, self.counted)


@dataclass(frozen=True)
class CountedWriter:
    writer: Any
    counted: tqdm

    def write(self, batch: Any) -> None:
        self.writer.write(batch)
        self.counted.update(batch.num_rows)


@main.command(epilog=example("embed ./pool --validated ./validated --lance ./lancedb --teacher ./teacher "
                             "--batch-size 512"))
@click.argument("pool_uri")
@click.option("--validated", "validated_uri", required=True, help="Where `ingest --out` wrote validated samples.")
@click.option("--lance", "lance_uri", required=True, help="LanceDB database (local path or s3:// URI).")
@click.option("--table", default="embeddings", show_default=True, help="LanceDB table name.")
@teacher_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Pairs per forward pass (throughput only: no embedding depends on it).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Decode/tokenize worker processes.")
def embed(pool_uri: str, validated_uri: str, lance_uri: str, table: str, teacher_checkpoint: str | None,
          arch: str | None, pretrained: str | None, device: str, batch_size: int, workers: int) -> None:
    """Embed every validated shard of a pool with a teacher into LanceDB (idempotent per shard)."""
    _embed(pool_uri, validated_uri, lance_uri, table, teacher_spec(teacher_checkpoint, arch, pretrained),
           device, batch_size, workers, None)



class TrainingBar:
    """A teacher's training (:data:`~curation_platform.training.ProgressCallback`) on stderr: elapsed
    time while the split decodes, then steps with epoch k/n, the loss and the time left. Used as a
    context manager, so whatever is on screen is closed however training ends."""

    def __init__(self) -> None:
        self.shown = ExitStack()
        self.steps: tqdm | None = None
        self.held_out_loss = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shown.close()
        self.steps = None

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "loading":
            self.shown.enter_context(activity(f"reading the training split {event['reference_uri']}"))
        elif stage == "data":
            self.shown.close()
            self._start(event)
        elif stage == "step" and self.steps is not None:
            self.steps.update(event["step"] - self.steps.n)
            self.steps.set_postfix_str(f"epoch {event['epoch']}/{event['epochs']}, loss {event['loss']:.3f}"
                                       f"{self.held_out_loss}", refresh=False)
        elif stage == "epoch":
            self.held_out_loss = f", held-out loss {event['held_out_loss']:.3f}"
        elif stage == "saved":
            self.shown.close()
            self.steps = None

    def _start(self, event: dict) -> None:
        pairs = event["train"] + event["held_out"]
        click.echo(f"training the teacher: {event['train']:,} pairs ({event['held_out']:,} held out), "
                   f"{event['total_steps']} steps, {event['precision']} on this CPU", err=True)
        if event.get("max_samples") is not None and pairs >= event["max_samples"]:
            warn(f"the teacher trains on the split's first {event['max_samples']:,} accepted pairs only "
                 "(TrainingConfig.max_samples bounds the memory); later ones are not read")
        self.steps = self.shown.enter_context(bar("training teacher", total=event["total_steps"], unit="step"))


training_options = stack([
    click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: TrainingConfig's, 15)."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                 help="Autocast of training steps: auto is bf16 where the CPU has native bf16 (AVX512-BF16/AMX), "
                      "else fp32."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="torch threads for training (default 2; part of what makes the weights reproducible)."),
    click.option("--max-seconds", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Fail (and publish nothing) if training would take longer than this."),
])


def training_overrides(epochs: int | None, precision: str, threads: int | None,
                        max_seconds: float | None) -> dict:
    """TeacherResource / TrainingConfig fields the user set on the command line."""
    chosen = {"epochs": epochs, "threads": threads, "max_seconds": max_seconds}
    return {"precision": precision} | {name: value for name, value in chosen.items() if value is not None}


@main.command("train-teacher", epilog=example("train-teacher ./demo/reference --out ./teacher --epochs 15"))
@click.argument("reference_uri")
@click.option("--out", "out_uri", required=True, help=f"Teacher directory to write ({ANY_URL}).")
@click.option("--training-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of initialisation, split and order.")
@training_options
def train_teacher_command(reference_uri: str, out_uri: str, training_seed: int, epochs: int | None, precision: str,
                          threads: int | None, max_seconds: float | None) -> None:
    """Train a small CLIP teacher on a trusted reference split (the data-filtering-network idea).

    Training runs a fixed number of steps: the same split, options and seed give the same weights on
    any machine of the same CPU capability, however loaded. Exit status 1 when the teacher misses the
    quality bar (it is still written, for inspection).
    """
    from curation_platform.teacher_quality import TeacherBar
    from curation_platform.training import TrainingConfig, TrainingTimeLimitExceeded, train_teacher

    config = replace(TrainingConfig(seed=training_seed), **training_overrides(epochs, precision, threads, max_seconds))
    try:
        with TrainingBar() as progress:
            report = train_teacher(reference_uri, out_uri, config, progress=progress)
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
