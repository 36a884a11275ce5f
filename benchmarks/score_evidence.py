"""Do the scores measure what the papers say? AUROCs on the demo pool against its ground truth.

    python benchmarks/score_evidence.py --home curation_home

Run after ``curation-platform demo`` (which trains the demo teacher, embeds and scores the pool
against the target split with the demo prompts). This harness, unlike the pipeline, reads the demo's
ground-truth sidecar. It re-scores the home's pool in place against a one-domain target (the target
split's ``shapes`` images) for the NormSim hypothesis. Prints JSON; the numbers go to docs/scoring.md.

Generic captions come in two flavours (ground truth ``corruption_detail``): ``boilerplate`` ("click
here", ``IMG_2041.jpg``) and ``underspecified`` (on-topic but true of many images, "some geometric
shapes"). For each flavour and for clean and misaligned pairs it reports the mean pool percentile
under CLIPScore and negCLIPLoss, the AUROC of clean against the group, and negCLIPLoss's batch
penalty ``a * (clip_score - neg_clip_loss)`` (nats) split into its two halves: the image side
``logsumexp_j a s(u_i, v_j)`` over the batch's captions and the text side ``logsumexp_j a s(u_j, v_i)``
over its images, the one the paper's mechanism is about (a caption similar to many images pays it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from curation_platform.embedding.engine import EmbedConfig
from curation_platform.embedding.sinks import LanceSink, vectors
from curation_platform.scoring import scores
from curation_platform.scoring.pipeline import EmbeddingSet, ScoreParams, ScoringContext, prompt_column
from curation_platform.scoring.run import auroc, build_context, embed_target, read_scores, score_pool
from curation_platform.teachers import TeacherSpec, load_teacher

PROMPTS = {"shapes": "a photo of a geometric shape", "textures": "a checkerboard or striped texture pattern"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path("curation_home"))
    args = parser.parse_args()
    home = args.home.resolve()
    teacher = load_teacher(TeacherSpec(checkpoint=str(home / "teacher")))
    truth = pl.read_parquet(home / "demo" / "ground_truth.parquet")

    target = embed_target(teacher, str(home / "demo" / "target"), EmbedConfig(workers=0))
    shapes = set(truth.filter((pl.col("split") == "target") & (pl.col("domain") == "shapes"))["uid"].to_list())
    keep = [index for index, uid in enumerate(target.uids) if uid in shapes]
    one_domain = EmbeddingSet(target.set_id + "-shapes", teacher.teacher_id, [target.uids[i] for i in keep],
                              target.image[keep], None, {"source": "demo target split, shapes only"})
    lance = str(home / "lancedb")
    params = ScoreParams(reference_size=1000, neg_clip_batch_size=1024, neg_clip_repeats=10,
                         prompts=tuple(PROMPTS.values()))
    context = build_context(teacher, lance, params, one_domain)
    score_pool(context, lance)
    frame = pl.from_arrow(read_scores(lance, teacher.teacher_id)).join(
        truth.filter(pl.col("split") == "pool"), on="uid")

    def area(column: str, positive: pl.Expr, negative: pl.Expr) -> float:
        return round(auroc(frame.filter(positive)[column].to_numpy(), frame.filter(negative)[column].to_numpy()), 4)

    frame = frame.join(penalty_halves(context, lance, teacher.embed_dim, frame["shard"].unique().to_list()), on="uid")
    clean, generic = pl.col("corruption") == "clean", pl.col("corruption") == "generic_caption"
    misaligned = pl.col("corruption") == "misaligned"
    groups = {
        "clean": clean,
        "misaligned": misaligned,
        "generic_caption": generic,
        "generic_underspecified": generic & (pl.col("corruption_detail") == "underspecified"),
        "generic_boilerplate": generic & (pl.col("corruption_detail") == "boilerplate"),
    }
    ranked = frame.with_columns((pl.col(name).rank("average") / pl.len()).alias(f"{name}_percentile")
                                for name in ("clip_score", "neg_clip_loss"))

    def group_stats(name: str, members: pl.Expr) -> dict:
        group = ranked.filter(members)
        if group.is_empty():
            return {"samples": 0}
        shift = group["neg_clip_loss_percentile"] - group["clip_score_percentile"]
        stats = {
            "samples": group.height,
            "mean_percentile": {score: round(float(group[f"{score}_percentile"].mean()), 4)
                                for score in ("clip_score", "neg_clip_loss")},
            "mean_percentile_shift_neg_clip_loss_minus_clip_score": round(float(shift.mean()), 4),
            "share_ranked_lower_by_neg_clip_loss": round(float((shift < 0).mean()), 4),
            "mean_cosine_to_own_image": round(float(group["clip_score"].mean()), 4),
            # how many reference images the caption fits: the paper's "similar to many images"
            "mean_reference_images_closer_to_caption_than_own_image": round(
                float(group["caption_images_closer"].mean()), 1),
            "mean_max_cosine_caption_to_reference_images": round(float(group["caption_max_cosine"].mean()), 4),
            "mean_batch_penalty_nats": {side: round(float(group[f"penalty_{side}"].mean()), 3)
                                        for side in ("total", "image_side", "text_side")},
        }
        if name != "clean":
            stats["auroc_clean_vs_group"] = {score: area(score, clean, members)
                                             for score in ("clip_score", "neg_clip_loss", "kl_text")}
        return stats

    result = {
        "teacher_id": teacher.teacher_id,
        "scoring": context.describe(),
        "samples": frame.height,
        # the halves recombine to the stored score: a * (clip_score - neg_clip_loss) = total penalty
        "penalty_check_max_abs_error_nats": float((
            frame["penalty_total"] - context.logit_scale * (frame["clip_score"] - frame["neg_clip_loss"])).abs().max()),
        "auroc_clean_vs_misaligned": {name: area(name, clean, misaligned) for name in ("clip_score", "neg_clip_loss")},
        "generic_caption_mean_percentile": {
            name: round(float(ranked.filter(generic)[f"{name}_percentile"].mean()), 4)
            for name in ("clip_score", "neg_clip_loss")},
        "groups": {name: group_stats(name, members) for name, members in groups.items()},
        "auroc_specific_vs_generic_caption": {name: area(name, clean, generic) for name in ("kl_text", "kl_image")},
        "auroc_specific_vs_generic_caption_by_flavour": {
            flavour: {name: area(name, clean, groups[f"generic_{flavour}"]) for name in ("kl_text", "kl_image")}
            for flavour in ("underspecified", "boilerplate")
            if not frame.filter(groups[f"generic_{flavour}"]).is_empty()},
        "auroc_shapes_vs_other_domains": {
            name: area(name, pl.col("domain") == "shapes", pl.col("domain") != "shapes")
            for name in ("norm_sim_inf", "norm_sim_2", prompt_column(PROMPTS["shapes"]))},
        "auroc_textures_vs_other_domains": {
            prompt_column(PROMPTS["textures"]): area(prompt_column(PROMPTS["textures"]),
                                                     pl.col("domain") == "textures", pl.col("domain") != "textures")},
    }
    print(json.dumps(result, indent=2))


def penalty_halves(context: ScoringContext, lance: str, dim: int, shards: list[str]) -> pl.DataFrame:
    """negCLIPLoss's batch penalty per pool sample, split into its halves (nats, batch = i + the reference).

    ``a * (clip_score - neg_clip_loss) = (image_side + text_side) / 2`` when every batch holds the
    whole reference (batch size >= N + 1, as here); the sides are logsumexps including the pair itself.
    Also how strongly, and to how many reference images, the caption is similar (max cosine, and the
    count of reference images closer to the caption than its own image).
    """
    a, reference = context.logit_scale, context.reference
    rows = []
    for shard in sorted(shards):
        table = LanceSink(lance).read_shard(shard, context.teacher_id, dim)
        image, text = vectors(table, "image_embedding"), vectors(table, "text_embedding")
        own = a * np.sum(image.astype(np.float64) * text, axis=1)
        image_side = np.logaddexp(scores.logit_stats(image, reference.text, a).logsumexp.cpu().numpy(), own)
        text_side = np.logaddexp(scores.logit_stats(text, reference.image, a).logsumexp.cpu().numpy(), own)
        caption_to_images = text.astype(np.float64) @ reference.image.T.astype(np.float64)
        rows.append(pl.DataFrame({
            "uid": table.column("uid").to_pylist(),
            "penalty_image_side": image_side,
            "penalty_text_side": text_side,
            "penalty_total": (image_side + text_side) / 2,
            "caption_max_cosine": caption_to_images.max(axis=1),
            "caption_images_closer": (caption_to_images > own[:, None] / a).sum(axis=1),
        }))
    return pl.concat(rows)


if __name__ == "__main__":
    main()
