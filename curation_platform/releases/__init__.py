"""Curated releases: recipes, immutable checksummed release folders, verification and lineage.

A release folder ``releases/<name>/<version>/`` holds ``manifest.json`` (what was selected from exactly
which inputs), ``samples.parquet`` (uid, shard, key, the scores the recipe used, the weight),
``subset.npy`` (DataComp's sorted ``u8,u8`` uid pairs), the recipe verbatim, a report, and
``SHA256SUMS`` over every other file. It is staged in full before it becomes visible: locally one
``rename`` publishes the folder, on S3 ``SHA256SUMS`` is written last and versions without it are not
releases. The LanceDB table versions it read are pinned with tags, so ``verify`` can re-run the recipe
on the very same rows and compare uid sets.

Modules: :mod:`.recipe` (recipe files), :mod:`.inputs` (sources, pinned table versions, score
provenance, the pool frame), :mod:`.apply_recipe` (selection, size bounds, weights), :mod:`.artefacts`
(folder files, ``subset.npy``, checksums, publishing), :mod:`.store` (creating and reading releases),
:mod:`.verify` (verifying, deriving, comparing), :mod:`.report` (the report).
"""

from curation_platform.releases.artefacts import subset_array, subset_uids
from curation_platform.releases.inputs import ReleaseSources
from curation_platform.releases.recipe import Recipe, RecipeError, WeightSpec, load_recipe, parse_recipe
from curation_platform.releases.store import (
    Release,
    ReleaseOptions,
    create_release,
    list_releases,
    open_release,
    read_samples,
)
from curation_platform.releases.verify import Verification, derive_release, diff_releases, verify_release

__all__ = [
    "Recipe", "RecipeError", "Release", "ReleaseOptions", "ReleaseSources", "Verification", "WeightSpec",
    "create_release", "derive_release", "diff_releases", "list_releases", "load_recipe", "open_release",
    "parse_recipe", "read_samples", "subset_array", "subset_uids", "verify_release",
]
