"""Dagster code location of the curation platform (thin wiring around ``curation_platform``)."""

import warnings

import dagster as dg

# Partitioned asset checks are "preview" in dagster 1.13 and the per-shard checks rely on them.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
