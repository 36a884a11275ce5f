"""Files the platform writes honour the umask (issue 17): a training job running as another user of a
shared cluster can read pool shards, validated outputs and releases."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation_platform import storage
from curation_platform.file_modes import current_umask
from curation_platform.formats.img2dataset import atomic_output
from curation_platform.releases.artefacts import publish_folder


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_pool_files_validated_outputs_and_releases_get_the_umask_modes(tmp_path: Path, umask: int) -> None:
    shard = tmp_path / "00000.tar"
    with atomic_output(shard) as temporary:
        temporary.write_bytes(b"tar bytes")
    storage.write_bytes_atomic(str(tmp_path / "validated" / "samples" / "00000.parquet"), b"parquet bytes")
    staging = tmp_path / "staging"
    (staging / "report").mkdir(parents=True)
    staging.chmod(0o700)  # as TemporaryDirectory makes it
    for name in ("SHA256SUMS", "subset.npy", "report/report.md"):
        (staging / name).write_bytes(b"x")
        (staging / name).chmod(0o600)
    release = Path(publish_folder(staging, str(tmp_path / "releases"), "demo", 1, None))
    files = [shard, tmp_path / "validated" / "samples" / "00000.parquet", *(p for p in release.rglob("*") if p.is_file())]
    folders = [release, release / "report"]
    assert {_mode(path) for path in files} == {0o666 & ~umask}
    assert {_mode(path) for path in folders} == {0o777 & ~umask}
