"""Dagster code location of the curation platform (thin wiring around ``curation_platform``)."""
