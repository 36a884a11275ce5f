"""The ``curation-platform`` command group and what every command shares (``--home``, option stacks)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import click

from curation_platform import __version__
from curation_platform.cli.display import example
from curation_platform.layout import DEFAULT_HOME, ProjectLayout

HOME_HELP = f"Project home (default ./{DEFAULT_HOME}) [env CURATION_HOME]."
ANY_URL = "any fsspec URL: s3://, gs://, az://, hf://, file://, memory://, or a local path"  # what storage reads


DEBUG_ENV = "CURATION_DEBUG"


class CurationGroup(click.Group):
    """Commands whose user errors (a missing path, an unknown URI scheme, a bad value, a missing table)
    end in one ``Error:`` line and exit 1, never a traceback; ``CURATION_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OSError, ValueError) as error:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(one_line(error)) from error


def one_line(error: BaseException) -> str:
    """The error's first line (pyarrow's and LanceDB's messages carry details on later lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@click.group(cls=CurationGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=example("demo --home ./curation_home"))
@click.version_option(__version__, prog_name="curation-platform")
def main() -> None:
    """Curate image-text pretraining sets from raw webdataset pools with CLIP-style teachers."""


def require_tables(lance_uri: str, tables: Sequence[str], hint: str) -> None:
    """Refuse a ``--lance`` database lacking the tables a command reads, before anything loads or is written."""
    from curation_platform import lance_tables, storage

    present = set(lance_tables.connect(lance_uri).list_tables().tables) if storage.exists(lance_uri) else set()
    missing = [name for name in tables if name not in present]
    if missing:
        raise click.BadParameter(f"{lance_uri} has no {' or '.join(missing)} table: {hint}", param_hint="'--lance'")


def project_layout(home: str | None) -> ProjectLayout:
    """The layout of ``--home`` (else ``$CURATION_HOME``, else ``./curation_home``)."""
    return ProjectLayout.resolve(home)


def stack(options: Sequence[Callable]) -> Callable:
    """A decorator applying ``options`` in the order listed (as ``--help`` shows them)."""
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate
