"""Small demo pools for the tests: the one factory that every demo-pool fixture calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_small_demo_pool(out: Path, **config: Any) -> Path:
    """Build a demo pool (every split: pool, reference, target, eval, ground truth) into ``out`` with
    ``DemoPoolConfig(out=out, **config)``; returns ``out``.

    The keyword arguments are ``DemoPoolConfig``'s fields (``shards``, ``samples_per_shard``, ``seed``,
    ``reference_samples``, ...): each caller states the sizes it relies on.
    """
    from curation_platform.demo import DemoPoolConfig, build_demo_pool  # imported when a pool is built

    build_demo_pool(DemoPoolConfig(out=out, **config))
    return out
