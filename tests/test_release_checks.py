"""Every release asset carries three checks (issue 17): the folder verifies, the funnel reconciles, and
the size is within the recipe's bounds; each fails on a release that breaks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from curation_platform.releases import ReleaseSources, create_release, parse_recipe
from curation_platform_dagster.defs.releases import RELEASE_CHECKS, release_checks

RECIPE = 'name = "checked"\nmin_size = 10\nmax_size = 60\nrank_by = "clip_score"\n[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n'


@pytest.fixture(scope="module")
def published(scored_demo: dict, demo_pool_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sources = ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    recipe = parse_recipe(RECIPE)
    return recipe, create_release(recipe, sources, str(tmp_path_factory.mktemp("releases")))


def _results(manifest: dict, recipe, uri: str) -> dict[str, bool]:
    return {result.check_name: result.passed for result in release_checks(manifest, recipe, uri,
                                                                          SimpleNamespace(s3=None))}


def test_a_good_release_passes_every_check(published) -> None:
    recipe, release = published
    assert _results(release.manifest, recipe, release.uri) == dict.fromkeys(RELEASE_CHECKS, True)


def test_each_check_fails_on_what_it_guards(published, tmp_path: Path) -> None:
    recipe, release = published
    copy = tmp_path / "copy"
    shutil.copytree(release.uri, copy)
    (copy / "subset.npy").write_bytes(b"tampered")
    assert not _results(release.manifest, recipe, str(copy))["release_verifies"]
    grown = json.loads(json.dumps(release.manifest))
    grown["funnel"][-1]["rows"] = grown["funnel"][0]["rows"] + 1
    assert not _results(grown, recipe, release.uri)["funnel_reconciles"]
    tight = parse_recipe(RECIPE.replace("max_size = 60", f"max_size = {release.manifest['selected'] - 1}"))
    assert not _results(release.manifest, tight, release.uri)["size_within_bounds"]
