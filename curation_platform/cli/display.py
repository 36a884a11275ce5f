"""What the commands show besides their results, all on stderr so stdout stays parseable: progress
bars with totals, an elapsed-time line for slow steps that report nothing of their own, and
``Warning:`` lines; plus the example every command's ``--help`` ends with."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from tqdm import tqdm

PROGRESS_ENV = "CURATION_PROGRESS"  # "1": always draw progress, "0": never; unset: only on a terminal
TICK_SECONDS = 0.5


def progress_enabled() -> bool:
    """Progress redraws lines in place: only for a person at a terminal, unless forced either way."""
    forced = os.environ.get(PROGRESS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def bar(description: str, total: float | None = None, unit: str = "sample", **options: Any) -> tqdm:
    """A tqdm bar on stderr (disabled off a terminal), the CLI's one progress style."""
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=not progress_enabled(),
                dynamic_ncols=True, **options)


@contextmanager
def activity(description: str) -> Iterator[None]:
    """A step with no progress of its own (loading a teacher, drawing the reference): one line whose
    elapsed time keeps ticking, so a slow step never looks hung."""
    with bar(description, unit="s", bar_format="{desc}: {elapsed}") as line:
        if line.disable:
            yield
            return
        done = threading.Event()
        ticker = threading.Thread(target=_tick, args=(line, done), daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _tick(line: tqdm, done: threading.Event) -> None:
    while not done.wait(TICK_SECONDS):
        line.refresh()


def warn(message: str) -> None:
    """One ``Warning:`` line on stderr (shown with or without progress): a setting was not applied as asked."""
    click.echo(f"Warning: {message}", err=True)


def example(arguments: str) -> str:
    """A command's ``--help`` epilog: one example invocation, kept verbatim by click (``\\b``)."""
    return f"\b\nExample:\n  curation-platform {arguments}"
