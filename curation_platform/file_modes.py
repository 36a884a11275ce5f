"""File modes that honour the umask, for files made through ``mkstemp`` / ``mkdtemp`` (always 0600 /
0700): pool shards, validated outputs and release folders are read by training jobs that may run as
another user of a shared cluster, so they get the modes ``open`` and ``mkdir`` would have given them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UMASK_LINE = re.compile(r"^Umask:\s*([0-7]+)$", re.MULTILINE)


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``); elsewhere set-and-restore."""
    try:
        match = _UMASK_LINE.search(Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_default_modes(root: Path) -> None:
    """Give ``root`` (a file, or a folder and everything under it) the umask's default modes."""
    if root.is_file():
        root.chmod(file_mode())
        return
    root.chmod(dir_mode())
    for path in root.rglob("*"):
        path.chmod(dir_mode() if path.is_dir() else file_mode())
