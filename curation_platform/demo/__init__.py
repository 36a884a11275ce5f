"""Synthetic, semantically structured image-text pools with labelled defects, for demos and tests."""

from curation_platform.demo.corruptions import CorruptionKind, CorruptionRates
from curation_platform.demo.pool import DemoPoolConfig, DemoPoolSummary, SplitSummary, build_demo_pool

__all__ = [
    "CorruptionKind",
    "CorruptionRates",
    "DemoPoolConfig",
    "DemoPoolSummary",
    "SplitSummary",
    "build_demo_pool",
]
