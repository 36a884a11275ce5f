"""The ``curation-platform`` command line: the library's entry points without Dagster, one module per
domain (pool, teachers, scores, releases), each command a thin call into the library."""

from curation_platform.cli import pool, releases, scores, teachers  # noqa: F401  (they register their commands)
from curation_platform.cli.group import main

__all__ = ["main"]
