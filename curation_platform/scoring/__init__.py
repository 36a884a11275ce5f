"""Density-ratio scores of SCORES.md: the platform's stable scoring API."""

from curation_platform.scoring.scores import (
    LogitStats,
    TargetStats,
    WhiteningStats,
    clip_score,
    importance_weights,
    kl_divergence,
    kl_divergence_reverse,
    log_density_ratio,
    logit_stats,
    neg_clip_loss,
    neg_clip_loss_from_stats,
    norm_sim,
    norm_sim_2,
    norm_sim_dynamic,
    norm_sim_inf,
    whitened_kl,
)

__all__ = [
    "LogitStats",
    "TargetStats",
    "WhiteningStats",
    "clip_score",
    "importance_weights",
    "kl_divergence",
    "kl_divergence_reverse",
    "log_density_ratio",
    "logit_stats",
    "neg_clip_loss",
    "neg_clip_loss_from_stats",
    "norm_sim",
    "norm_sim_2",
    "norm_sim_dynamic",
    "norm_sim_inf",
    "whitened_kl",
]
