"""Do the scores measure what the papers say? AUROCs on the demo pool against its ground truth.

    python benchmarks/score_evidence.py --home curation_home

Run after ``curation-platform demo`` (which trains the demo teacher, embeds and scores the pool
against the target split with the demo prompts). This harness, unlike the pipeline, reads the demo's
ground-truth sidecar. It re-scores the home's pool in place against a one-domain target (the target
split's ``shapes`` images) for the NormSim hypothesis. Prints JSON; the numbers go to docs/scoring.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl

from curation_platform.embedding.engine import EmbedConfig
from curation_platform.scoring.pipeline import EmbeddingSet, ScoreParams, prompt_column
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

    clean, generic = pl.col("corruption") == "clean", pl.col("corruption") == "generic_caption"
    misaligned = pl.col("corruption") == "misaligned"
    percentiles = frame.with_columns(
        (pl.col(name).rank("average") / pl.len()).alias(f"{name}_percentile") for name in ("clip_score", "neg_clip_loss")
    ).filter(generic)
    result = {
        "teacher_id": teacher.teacher_id,
        "scoring": context.describe(),
        "samples": frame.height,
        "auroc_clean_vs_misaligned": {name: area(name, clean, misaligned) for name in ("clip_score", "neg_clip_loss")},
        "generic_caption_mean_percentile": {
            name: round(float(percentiles[f"{name}_percentile"].mean()), 4) for name in ("clip_score", "neg_clip_loss")},
        "auroc_specific_vs_generic_caption": {name: area(name, clean, generic) for name in ("kl_text", "kl_image")},
        "auroc_shapes_vs_other_domains": {
            name: area(name, pl.col("domain") == "shapes", pl.col("domain") != "shapes")
            for name in ("norm_sim_inf", "norm_sim_2", prompt_column(PROMPTS["shapes"]))},
        "auroc_textures_vs_other_domains": {
            prompt_column(PROMPTS["textures"]): area(prompt_column(PROMPTS["textures"]),
                                                     pl.col("domain") == "textures", pl.col("domain") != "textures")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
