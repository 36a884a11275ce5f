"""The ``curation-platform`` command group and what every command shares (``--home``, option stacks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from curation_platform import __version__
from curation_platform.layout import DEFAULT_HOME, ProjectLayout

HOME_HELP = f"Project home (default ./{DEFAULT_HOME}) [env CURATION_HOME]."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curation-platform")
def main() -> None:
    """Curate image-text pretraining sets from raw webdataset pools with CLIP-style teachers."""


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
