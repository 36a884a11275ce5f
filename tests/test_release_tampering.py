"""Tampered releases fail verification with a named problem, never a traceback; verification reads nothing
outside the release folder; hostile recipe files are refused quickly, before anything is read."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from curation_platform.cli import main
from curation_platform.releases import ReleaseSources, create_release, load_recipe, parse_recipe, verify_release
from curation_platform.releases.artefacts import CHECKSUMS, MANIFEST, SAMPLES, SUBSET, subset_array, write_checksums
from curation_platform.releases.recipe import MAX_STAGES, RecipeError

RECIPE = 'name = "tamper"\n[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n'


@pytest.fixture(scope="module")
def published(scored_demo: dict, demo_pool_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sources = ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    release = create_release(parse_recipe(RECIPE), sources, str(tmp_path_factory.mktemp("releases")))
    assert verify_release(release.uri).ok
    return Path(release.uri)


@pytest.fixture()
def copy(published: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tamper" / "1"
    shutil.copytree(published, target)
    return target


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _resign(folder: Path) -> None:
    """A consistent edit: SHA256SUMS regenerated over the edited files."""
    (folder / CHECKSUMS).unlink()
    write_checksums(folder)


def test_a_swapped_subset_with_regenerated_checksums_fails(copy: Path) -> None:
    samples = np.load(copy / SUBSET)
    other = subset_array([hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(len(samples))])
    np.save(copy / SUBSET, other)
    _resign(copy)
    result = verify_release(str(copy))
    assert not result.ok and result.uids_identical is True, "samples.parquet still re-derives"
    assert any(SUBSET in problem for problem in result.problems)


def test_a_rewritten_manifest_id_with_regenerated_checksums_fails(copy: Path) -> None:
    manifest = (copy / MANIFEST).read_text().replace('"samples_sha256": "', '"samples_sha256": "0')
    (copy / MANIFEST).write_text(manifest)
    _resign(copy)
    result = verify_release(str(copy))
    assert not result.ok and any("samples_sha256" in problem for problem in result.problems)


@pytest.mark.parametrize("line", ["../../../../../../etc/hostname", "../../../../../../dev/zero", "/etc/hostname",
                                  "report/../../x", "not a checksum line"])
def test_checksum_lines_outside_the_folder_are_malformed_not_followed(copy: Path, line: str) -> None:
    with (copy / CHECKSUMS).open("a") as handle:
        handle.write(f"{'0' * 64}  {line}\n" if " " not in line else f"{line}\n")
    started = time.perf_counter()
    result = verify_release(str(copy), rederive=False)
    assert time.perf_counter() - started < 10, "nothing outside the release is read"
    assert not result.ok and result.malformed and not result.missing


@pytest.mark.parametrize("damage", ["flip samples", "delete samples", "delete checksums", "delete manifest",
                                    "garbage manifest"])
def test_damaged_files_are_named_without_a_traceback(copy: Path, damage: str) -> None:
    if damage == "flip samples":
        _flip_byte(copy / SAMPLES)
    elif damage == "delete samples":
        (copy / SAMPLES).unlink()
    elif damage == "delete checksums":
        (copy / CHECKSUMS).unlink()
    elif damage == "delete manifest":
        (copy / MANIFEST).unlink()
    else:
        (copy / MANIFEST).write_text("{not json")
    result = verify_release(str(copy))
    assert not result.ok
    named = " ".join([*result.mismatched, *result.missing, *result.problems])
    expected = {"flip samples": SAMPLES, "delete samples": SAMPLES, "delete checksums": CHECKSUMS,
                "delete manifest": MANIFEST, "garbage manifest": MANIFEST}[damage]
    assert expected in named
    outcome = CliRunner().invoke(main, ["release", "verify", str(copy)])
    assert outcome.exit_code == 1 and isinstance(outcome.exception, SystemExit), outcome.output
    assert "FAILED" in outcome.output and "Traceback" not in outcome.output


BASE = 'name = "hostile"\n'


@pytest.mark.parametrize(("text", "yaml_syntax", "message"), [
    ("name: x\na: &a [1, 2]\nb: *a\nstage:\n- type: basic_filter\n", True, "aliases"),
    ("name: x\n" + "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 9) + "]\n"
                           for i in range(9)) + "stage:\n- type: basic_filter\n", True, "anchors|aliases"),
    ("name: x\nd: " + "[" * 3000 + "]" * 3000 + "\nstage:\n- type: basic_filter\n", True, "nested"),
    (BASE + "d = " + "[" * 3000 + "]" * 3000 + '\n[[stage]]\ntype = "basic_filter"\n', False, "nested"),
    (BASE + '[[stage]]\ntype = "basic_filter"\n' * (MAX_STAGES + 1), False, "at most"),
    (BASE + '[[stage]]\ntype = "threshold"\nscore = "clip_score"\nmin = "abc"\n', False, "min must be a number"),
    (BASE + '[[stage]]\ntype = "threshold"\nscore = "clip_score"\nmin = 0.5\nmax = 0.1\n', False, "above max"),
    (BASE + '[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.3\ndescending = "yes"\n', False,
     "descending"),
    (BASE + '[[stage]]\ntype = "rank_sum"\nscores = ["clip_score", "kl_text"]\nfraction = 0.3\nweights = [1]\n',
     False, "weights"),
    (BASE + '[[stage]]\ntype = "norm_sim_d"\nfraction = 0.3\nnum_iters = -5\n', False, "num_iters"),
    (BASE + '[[stage]]\ntype = "norm_sim_d"\nfraction = 0.3\nsample_fraction = 0\n', False, "sample_fraction"),
])
def test_hostile_recipes_are_refused_in_a_line(text: str, yaml_syntax: bool, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=message) as raised:
        parse_recipe(text, yaml_syntax=yaml_syntax)
    assert time.perf_counter() - started < 5
    assert "\n" not in str(raised.value)


def test_binary_and_huge_recipe_files_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(RecipeError, match="UTF-8"):
        load_recipe(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\ndescription: " + "a" * 400_000 + "\n")
    with pytest.raises(RecipeError, match="bytes"):
        load_recipe(huge)


def test_concurrent_creates_of_one_recipe_publish_consecutive_versions(scored_demo: dict, demo_pool_dir: Path,
                                                                       tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sources = ReleaseSources(scored_demo["lance"], str(scored_demo["root"] / "validated"),
                             scored_demo["teacher"].teacher_id, str(demo_pool_dir / "pool"))
    recipe = parse_recipe(RECIPE.replace('"tamper"', '"concurrent"'))
    with ThreadPoolExecutor(max_workers=3) as pool:
        releases = list(pool.map(lambda _: create_release(recipe, sources, str(tmp_path / "releases")), range(3)))
    assert sorted(release.version for release in releases) == [1, 2, 3]
    assert all(verify_release(release.uri, rederive=False).ok for release in releases)


@pytest.mark.s3
def test_concurrent_publishes_of_one_version_on_s3_never_mix(tmp_path: Path, s3_server) -> None:
    """On S3 the version is claimed by a conditional PUT: one writer publishes, the others are told."""
    from concurrent.futures import ThreadPoolExecutor

    from curation_platform import storage
    from curation_platform.releases.artefacts import publish_folder
    from tests.helpers.s3 import S3_BUCKET

    stagings = []
    for writer in range(4):
        folder = tmp_path / f"staging-{writer}"
        folder.mkdir()
        for name in (SAMPLES, MANIFEST, CHECKSUMS):
            (folder / name).write_text(f"writer {writer}")
        stagings.append(folder)

    def publish(folder: Path) -> str | None:
        try:
            return publish_folder(folder, f"s3://{S3_BUCKET}/race-releases", "race", 1, s3_server)
        except FileExistsError:
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        published = [uri for uri in pool.map(publish, stagings) if uri is not None]
    assert len(published) == 1
    texts = {storage.read_bytes(storage.join(published[0], name), s3_server) for name in (SAMPLES, MANIFEST, CHECKSUMS)}
    assert len(texts) == 1  # every file from the one writer that claimed the version
