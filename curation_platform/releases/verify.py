"""Checking, deriving and comparing published releases: :func:`verify_release` checks every file against
``SHA256SUMS`` and re-runs the recipe on the pinned table versions to compare uid sets (reporting
pins that can no longer be read); :func:`derive_release` makes a new version of a release's recipe on
its parent's pinned tables without some uids; :func:`diff_releases` compares two releases' uids and
score distributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curation_platform import lance_tables, storage
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE
from curation_platform.releases.apply_recipe import select
from curation_platform.releases.artefacts import EXCLUDED, check_checksums
from curation_platform.releases.inputs import ReleaseSources, score_provenance, selection_frame
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

    @property
    def ok(self) -> bool:
        return (not (self.mismatched or self.missing or self.unlisted or self.pins_missing)
                and self.uids_identical is not False)


def verify_release(release_uri: str, s3: S3Settings | None = None, rederive: bool = True) -> Verification:
    """Check every file against SHA256SUMS, then (``rederive``) re-run the recipe on the pinned tables."""
    release = open_release(release_uri, s3)
    files = check_checksums(release_uri, s3)
    same, added, removed = None, 0, 0
    pins_missing = _missing_pins(release, s3) if rederive else []
    if rederive and not pins_missing:
        stored = set(read_samples(release, s3)["uid"].to_list())
        derived = set(_rederive(release, s3))
        same, added, removed = stored == derived, len(stored - derived), len(derived - stored)
    return Verification(release.release_id, files.checked, files.mismatched, files.missing, files.unlisted, same,
                        added, removed, pins_missing)


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


def _rederive(release: Release, s3: S3Settings | None) -> list[str]:
    manifest = release.manifest
    recipe = parse_recipe(manifest["recipe"]["text"], manifest["recipe"]["file"].endswith(".yaml"))
    sources = ReleaseSources(**manifest["sources"], s3=s3)
    versions = {name: entry["version"] for name, entry in manifest["lancedb_tables"].items()}
    frame = selection_frame(recipe, sources, versions)
    _, uids = select(recipe, frame, sources, score_provenance(sources, versions), versions.get(EMBEDDINGS_TABLE))
    excluded: set[str] = set()
    if manifest.get("exclusions"):
        excluded = set(storage.read_bytes(storage.join(release.uri, EXCLUDED), s3).decode().split())
    return [uid for uid in uids.to_list() if uid not in excluded]


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
