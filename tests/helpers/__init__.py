"""Helpers shared by the tests: plain functions and constants, no fixtures (those live in ``conftest.py``).

Tests import from here, never from one another:

- ``shards``: hand-made shards (``ShardBuilder``) and the crafted hostile shard;
- ``demo``: small demo pools (the one factory every demo-pool fixture calls);
- ``teachers``: tiny random-weight teachers and the tiny training configuration;
- ``recipes``: release recipe texts (``NEGCLIP_NORMSIM``, which ``benchmarks/release_scale.py`` runs too);
- ``s3``: the local SeaweedFS S3 server the ``s3_server`` fixture starts, and uploads to it;
- ``processes``: stopping process groups and finding free loopback ports.
"""
