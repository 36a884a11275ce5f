"""Release recipe texts shared by the release tests and ``benchmarks/release_scale.py``."""

from __future__ import annotations

# The published negCLIPLoss -> NormSim chain without the demo recipe's decontaminate and dedup stages
# (partitionable stages only: each rank is cut from per-shard summaries).
NEGCLIP_NORMSIM = """
name = "negclip-normsim"
description = "negCLIPLoss top 30%, then NormSim_inf to 20% of the pool"

[[stage]]
type = "top_fraction"
score = "neg_clip_loss"
fraction = 0.30

[[stage]]
type = "top_fraction"
score = "norm_sim_inf"
fraction = 0.20
"""
