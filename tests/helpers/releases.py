"""Releases made from the ``scored_demo`` fixture, for the tests that read or train on releases."""

from __future__ import annotations

from pathlib import Path

from curation_platform.releases import Release, ReleaseSources, create_release, parse_recipe


def releases_of_scored_demo(scored_demo: dict, pool_dir: Path, folder: Path, recipes: dict[str, str]) -> dict[str, Release]:
    """One release per recipe text (name -> TOML) on the scored demo pool, published under ``folder``."""
    sources = ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(pool_dir / "pool"))
    return {name: create_release(parse_recipe(recipe), sources, str(folder)) for name, recipe in recipes.items()}
