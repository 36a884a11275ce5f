"""Curated releases: recipes, immutable checksummed release folders, verification and lineage."""

from curation_platform.releases.recipe import Recipe, RecipeError, WeightSpec, load_recipe, parse_recipe
from curation_platform.releases.store import (
    Release,
    ReleaseOptions,
    ReleaseSources,
    Verification,
    create_release,
    derive_release,
    diff_releases,
    list_releases,
    open_release,
    read_samples,
    subset_array,
    subset_uids,
    verify_release,
)

__all__ = [
    "Recipe", "RecipeError", "Release", "ReleaseOptions", "ReleaseSources", "Verification", "WeightSpec",
    "create_release", "derive_release", "diff_releases", "list_releases", "load_recipe", "open_release",
    "parse_recipe", "read_samples", "subset_array", "subset_uids", "verify_release",
]
