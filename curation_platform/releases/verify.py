"""Checking, deriving and comparing published releases: :func:`verify_release` checks every file against
``SHA256SUMS`` and re-runs the recipe on the pinned table versions to compare uid sets (reporting
pins that can no longer be read); :func:`derive_release` makes a new version of a release's recipe on
its parent's pinned tables without some uids; :func:`diff_releases` compares two releases' uids and
score distributions.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from curation_platform import lance_tables, storage
from curation_platform.releases.apply_recipe import write_samples
from curation_platform.releases.artefacts import (
    EXCLUDED,
    MANIFEST,
    SAMPLES,
    SUBSET,
    check_checksums,
    sha256_hex,
)
from curation_platform.releases.inputs import ReleaseSources
from curation_platform.releases.passes import PassFolder, select
from curation_platform.releases.recipe import parse_recipe
from curation_platform.releases.store import Release, ReleaseOptions, create_release, open_release, read_samples
from curation_platform.storage import S3Settings

_NO_OPTIONS = ReleaseOptions()  # derive_release's default (one shared immutable instance, as before)


@dataclass(frozen=True)
class Verification:
    release_id: str
    files_checked: int
    mismatched: list[str]
    missing: list[str]
    unlisted: list[str]
    uids_identical: bool | None
    uids_added: int = 0
    uids_removed: int = 0
    pins_missing: list[str] = field(default_factory=list)  # "table@version" the release read that are gone
    malformed: list[str] = field(default_factory=list)  # SHA256SUMS lines that are not "<sha256>  <path>"
    problems: list[str] = field(default_factory=list)  # everything else, one line each, naming the file

    @property
    def ok(self) -> bool:
        return (not (self.mismatched or self.missing or self.unlisted or self.pins_missing or self.malformed
                     or self.problems) and self.uids_identical is not False)


def verify_release(release_uri: str, s3: S3Settings | None = None, rederive: bool = True) -> Verification:
    """Check every file against SHA256SUMS, then (``rederive``) re-run the recipe on the pinned tables and
    compare what it gives with ``samples.parquet``, ``subset.npy`` and the release id.

    Never raises for a damaged release: every problem (a missing, changed, unlisted or malformed file,
    an unreadable manifest or table, a consistent edit of the files and SHA256SUMS together) is listed.
    """
    files = check_checksums(release_uri, s3)
    problems: list[str] = []
    try:
        manifest = json.loads(storage.read_bytes(storage.join(release_uri, MANIFEST), s3))
        release = Release(release_uri, manifest["name"], int(manifest["version"]), manifest)
        release_id = str(manifest["release_id"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"{MANIFEST}: unreadable ({type(error).__name__}: {error})")
        return Verification(release_uri, files.checked, files.mismatched, files.missing, files.unlisted, None,
                            malformed=files.malformed, problems=problems)
    same, added, removed = None, 0, 0
    pins_missing = _missing_pins(release, s3) if rederive else []
    if rederive and not pins_missing:
        try:
            stored = read_samples(release, s3)
        except (OSError, ValueError, pa.ArrowException, pl.exceptions.PolarsError) as error:
            problems.append(f"{SAMPLES}: unreadable ({type(error).__name__})")
            stored = None
        try:
            derived = _rederive(release, s3)
        except (OSError, ValueError, RuntimeError, pa.ArrowException, pl.exceptions.PolarsError) as error:
            problems.append(f"re-derivation failed: {' '.join(str(error).split())[:300]}")
            derived = None
        if stored is not None and derived is not None:
            derived_samples, derived_subset = derived
            stored_uids, derived_uids = set(stored["uid"].to_list()), set(derived_samples["uid"].to_list())
            same = stored_uids == derived_uids
            added, removed = len(stored_uids - derived_uids), len(derived_uids - stored_uids)
            problems += _compare_files(release, stored, derived_samples, derived_subset, s3)
    return Verification(release_id, files.checked, files.mismatched, files.missing, files.unlisted, same,
                        added, removed, pins_missing, files.malformed, problems)


def _compare_files(release: Release, stored: pl.DataFrame, derived: pl.DataFrame, derived_subset: bytes,
                   s3: S3Settings | None) -> list[str]:
    """What a consistent edit (files and SHA256SUMS rewritten together) changes: the samples' rows, the
    subset DataComp reads, and the content hash that names the release."""
    problems = []
    if not stored.sort("uid").equals(derived.sort("uid")):
        problems.append(f"{SAMPLES}: its rows differ from the re-derived ones")
    try:
        subset = storage.read_bytes(storage.join(release.uri, SUBSET), s3)
        if subset != derived_subset:
            problems.append(f"{SUBSET}: differs from the re-derived selection")
    except OSError:
        problems.append(f"{SUBSET}: missing")
    try:
        samples_hash = sha256_hex(storage.read_bytes(storage.join(release.uri, SAMPLES), s3))
    except OSError:
        return problems
    manifest = release.manifest
    if manifest.get("samples_sha256") != samples_hash:
        problems.append(f"{MANIFEST}: samples_sha256 is not the hash of {SAMPLES}")
    if manifest.get("release_id") != f"{release.name}-{release.version}-{samples_hash[:12]}":
        problems.append(f"{MANIFEST}: release_id {manifest.get('release_id')!r} does not match the content hash "
                        f"of {SAMPLES}")
    return problems


def _missing_pins(release: Release, s3: S3Settings | None) -> list[str]:
    """The pinned table versions that can no longer be read (a dropped table, a cleaned-up version)."""
    manifest = release.manifest
    database = lance_tables.connect(manifest["sources"]["lance_uri"], s3)
    names = set(database.list_tables().tables)
    missing = []
    for name, entry in sorted(manifest["lancedb_tables"].items()):
        try:
            if name not in names:
                raise ValueError(name)
            database.open_table(name).checkout(entry["version"])
        except (ValueError, OSError, RuntimeError):
            missing.append(f"{name}@{entry['version']}")
    return missing


def _rederive(release: Release, s3: S3Settings | None) -> tuple[pl.DataFrame, bytes]:
    """The samples table and subset.npy the recipe gives on the pinned tables (with the release's
    exclusions), made by the same shard-by-shard path as the release."""
    manifest = release.manifest
    recipe = parse_recipe(manifest["recipe"]["text"], manifest["recipe"]["file"].endswith(".yaml"))
    sources = ReleaseSources(**manifest["sources"], s3=s3)
    versions = {name: entry["version"] for name, entry in manifest["lancedb_tables"].items()}
    excluded: list[str] = []
    if manifest.get("exclusions"):
        excluded = sorted(set(storage.read_bytes(storage.join(release.uri, EXCLUDED), s3).decode().split()))
    with tempfile.TemporaryDirectory(prefix="release-verify-") as scratch:
        folder = Path(scratch)
        _, selected = select(recipe, sources, PassFolder(str(folder / "passes")), versions, excluded)
        written = write_samples(recipe, selected, folder / SAMPLES, folder / SUBSET)
        return pl.read_parquet(written.samples), written.subset.read_bytes()


def derive_release(parent_uri: str, exclude: list[str], releases_uri: str, s3: S3Settings | None = None,
                   options: ReleaseOptions = _NO_OPTIONS) -> Release:
    """A new version of the parent's recipe on the parent's pinned tables, without the listed uids."""
    parent = open_release(parent_uri, s3)
    manifest = parent.manifest
    recipe = parse_recipe(manifest["recipe"]["text"], manifest["recipe"]["file"].endswith(".yaml"))
    sources = ReleaseSources(**manifest["sources"], s3=s3)
    versions = {name: entry["version"] for name, entry in manifest["lancedb_tables"].items()}
    inherited = set(manifest["exclusions"] and storage.read_bytes(
        storage.join(parent.uri, EXCLUDED), s3).decode().split() or [])
    exclusion = tuple(sorted(inherited | {uid.strip() for uid in exclude if uid.strip()}))
    lineage = {"release_id": parent.release_id, "uri": parent.uri, "samples_sha256": manifest["samples_sha256"]}
    options = ReleaseOptions(run_id=options.run_id, checks=options.checks, labels=options.labels,
                             parent=lineage, exclude=exclusion, fail_before_publish=options.fail_before_publish)
    return create_release(recipe, sources, releases_uri, options, versions)


def diff_releases(a_uri: str, b_uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """uids added and removed from A to B, and how each shared score's distribution moved."""
    a, b = open_release(a_uri, s3), open_release(b_uri, s3)
    samples_a, samples_b = read_samples(a, s3), read_samples(b, s3)
    uids_a, uids_b = set(samples_a["uid"].to_list()), set(samples_b["uid"].to_list())
    shared = [name for name in samples_a.columns if name in samples_b.columns and name not in ("uid", "shard", "key")]
    shift = {}
    for name in shared:
        left, right = samples_a[name].fill_nan(None), samples_b[name].fill_nan(None)
        shift[name] = {"mean_a": left.mean(), "mean_b": right.mean(), "median_a": left.median(),
                       "median_b": right.median(), "min_a": left.min(), "min_b": right.min()}
    return {"a": a.release_id, "b": b.release_id, "size_a": len(uids_a), "size_b": len(uids_b),
            "added": len(uids_b - uids_a), "removed": len(uids_a - uids_b), "kept": len(uids_a & uids_b),
            "added_sample": sorted(uids_b - uids_a)[:20], "removed_sample": sorted(uids_a - uids_b)[:20],
            "score_shift": shift}
