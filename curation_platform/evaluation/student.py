"""Train a student CLIP from scratch on webdataset shards with open_clip's own trainer (``open_clip_train``).

The trainer runs in this process (``open_clip_train.main.main`` with a command line built from an
:class:`~curation_platform.evaluation.scales.EvalScale`), reading shards with ``--dataset-resampled``
as DataComp's ``train.py`` does, so compute is samples seen. A custom student config (the demo
scale's) is registered with open_clip first.

Importance-weighted releases train with the paper's importance-weighted loss (IWL): each pair's
CLIP loss is multiplied by its weight (self-normalised within the batch). open_clip_train has no
per-sample weights, so :func:`_importance_weighted` adds them for the length of one run and
nowhere else: the trainer's webdataset pipeline keeps its sampling, shuffling and batching, and
its ``to_tuple`` stage appends each sample's weight (from the exported ``.json``) to the token row
as the bit pattern of a float64; a forward pre-hook on the model strips that column and hands the
weights to :class:`WeightedClipLoss`. Every run also seeds the pipeline's sample shuffle (see
:class:`_SeededWebdataset`), so the same data, scale and seed train the same student.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from curation_platform.evaluation.scales import EvalScale


@dataclass(frozen=True)
class StudentRun:
    """One trained student: where its checkpoint is and exactly what compute it had."""

    checkpoint: Path
    model: str
    seed: int
    steps: int
    samples_seen: int
    batch_size: int
    precision: str
    weighted: bool
    device: str
    final_loss: float | None  # the trainer's running mean loss over the last epoch

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "seed": self.seed, "steps": self.steps, "samples_seen": self.samples_seen,
                "batch_size": self.batch_size, "precision": self.precision, "weighted": self.weighted,
                "device": self.device, "final_loss": self.final_loss}


def register_model(scale: EvalScale) -> None:
    """Make ``scale.model`` known to open_clip (a no-op for built-in configs such as ViT-B-32)."""
    import open_clip

    if scale.model_cfg is None:
        if scale.model not in open_clip.list_models():
            raise ValueError(f"open_clip has no model config {scale.model!r}")
        return
    known = open_clip.get_model_config(scale.model)
    if known is not None:
        if known != scale.model_cfg:
            raise ValueError(f"open_clip already holds another config named {scale.model!r}")
        return
    folder = Path(tempfile.mkdtemp(prefix="curation-student-config-"))
    (folder / f"{scale.model}.json").write_text(json.dumps(scale.model_cfg))
    open_clip.add_model_config(folder)


def trainer_arguments(scale: EvalScale, train_data: str, logs: Path, name: str, seed: int, device: str) -> list[str]:
    """open_clip_train's command line for one arm and seed (what DataComp's ``train.py`` passes)."""
    return [
        "--train-data", train_data, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-num-samples", str(scale.samples_per_checkpoint), "--epochs", str(scale.checkpoints),
        "--batch-size", str(scale.batch_size), "--lr", str(scale.lr), "--wd", str(scale.weight_decay),
        "--beta2", str(scale.beta2), "--warmup", str(scale.warmup_steps), "--model", scale.model,
        "--precision", scale.trainer_precision(), "--workers", str(scale.workers), "--seed", str(seed),
        "--device", device, "--logs", str(logs), "--name", name, "--save-frequency", str(scale.checkpoints),
        "--log-every-n-steps", str(max(1, scale.steps // 10)), "--report-to", "",
    ]


def train_student(train_data: str, out_dir: Path, scale: EvalScale, seed: int, *, weighted: bool = False,
                  device: str | None = None) -> StudentRun:
    """Train one student on ``train_data`` (a brace pattern of webdataset shards) for exactly
    ``scale.samples_seen`` samples; ``weighted`` trains with the samples' ``weight`` (IWL)."""
    from open_clip_train import main as trainer

    register_model(scale)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = f"seed{seed}"
    logs = Path(out_dir)
    shutil.rmtree(logs / name, ignore_errors=True)  # open_clip_train refuses an existing experiment: rerun afresh
    logs.mkdir(parents=True, exist_ok=True)
    arguments = trainer_arguments(scale, train_data, logs, name, seed, device)
    threads = torch.get_num_threads()
    try:
        if scale.threads:
            torch.set_num_threads(scale.threads)
        with (_log_to_file_only(), _seeded_pipeline(seed, weighted),
              _importance_weighted() if weighted else contextlib.nullcontext()):
            status = trainer.main(arguments)
    finally:
        torch.set_num_threads(threads)
    checkpoint = logs / name / "checkpoints" / f"epoch_{scale.checkpoints}.pt"
    if status not in (None, 0) or not checkpoint.exists():
        raise RuntimeError(f"open_clip_train did not finish (status {status}); see {logs / name / 'out.log'}")
    samples_seen, final_loss = trained_samples(logs / name)
    if samples_seen != scale.samples_seen:
        raise RuntimeError(f"open_clip_train saw {samples_seen} samples, not the scale's {scale.samples_seen}")
    return StudentRun(checkpoint=checkpoint, model=scale.model, seed=seed, steps=samples_seen // scale.batch_size,
                      samples_seen=samples_seen, batch_size=scale.batch_size, precision=scale.trainer_precision(),
                      weighted=weighted, device=device, final_loss=final_loss)


TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Loss: ([0-9.e+-]+) \(([0-9.e+-]+)\)")


def trained_samples(run_dir: Path) -> tuple[int, float | None]:
    """Samples the trainer itself reports having seen (the last ``Train Epoch`` line of each epoch), and
    the running mean loss of the last epoch: the equal-compute accounting comes from the trainer's log."""
    last: dict[int, tuple[int, float]] = {}
    for match in TRAIN_LINE.finditer((run_dir / "out.log").read_text()):
        last[int(match[1])] = (int(match[2]), float(match[5]))
    if not last:
        return 0, None
    return sum(seen for seen, _ in last.values()), last[max(last)][1]


@contextlib.contextmanager
def _log_to_file_only() -> Iterator[None]:
    """open_clip_train's ``setup_logging`` sets every logger of the process to INFO and adds a stderr
    handler; for the length of a run it only gets its ``out.log`` (read by :func:`trained_samples`), and
    handlers already on the root logger hear warnings only."""
    from open_clip_train import main

    root = logging.getLogger()
    level, handlers = root.level, []
    quieted = {handler: handler.level for handler in root.handlers}  # e.g. a basicConfig stderr handler
    for handler in quieted:
        handler.setLevel(max(handler.level, logging.WARNING))

    def file_only(log_file: str | None, log_level: int, include_host: bool = False) -> None:
        if log_file:
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
            handler.setLevel(log_level)
            root.addHandler(handler)
            handlers.append(handler)
        root.setLevel(min(level or logging.WARNING, log_level))

    saved = main.setup_logging
    main.setup_logging = file_only
    try:
        yield
    finally:
        main.setup_logging = saved
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        for handler, handler_level in quieted.items():
            handler.setLevel(handler_level)
        root.setLevel(level)


# -- importance-weighted loss ---------------------------------------------------------------------

def _weights_as_token_column(weight: float) -> torch.Tensor:
    return torch.from_numpy(np.array([weight], dtype=np.float64).view(np.int64))


class WeightedClipLoss(torch.nn.Module):
    """CLIP's symmetric InfoNCE with per-pair weights: ``sum_i w_i l_i / sum_i w_i`` (single process)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                sample_weight: torch.Tensor, output_dict: bool = False, **_: Any):
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        per_pair = (F.cross_entropy(logits, labels, reduction="none")
                    + F.cross_entropy(logits.T, labels, reduction="none")) / 2
        weights = sample_weight.to(per_pair.dtype)
        loss = (weights * per_pair).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
        return {"contrastive_loss": loss} if output_dict else loss


class _SeededWebdataset:
    """open_clip_train's view of ``webdataset`` for one run: ``shuffle`` gets a seeded generator (webdataset
    seeds an unseeded one from the pid and the clock, which would make a run depend on when it ran) and,
    for IWL, ``to_tuple("image", "text")`` appends each sample's weight to its token row."""

    def __init__(self, webdataset: Any, seed: int, weighted: bool) -> None:
        self._wds, self._seed, self._weighted = webdataset, seed, weighted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wds, name)

    def shuffle(self, bufsize: int, initial: int = 100, rng: random.Random | None = None, **kwargs: Any):
        return self._wds.shuffle(bufsize, initial, rng=rng or random.Random(self._seed), **kwargs)

    def to_tuple(self, *keys: str):
        if not self._weighted or keys != ("image", "text"):
            return self._wds.to_tuple(*keys)

        def with_weight(sample: dict) -> tuple:
            meta = sample.get("json") or {}
            if "weight" not in meta:
                raise ValueError(f"sample {sample.get('__key__')} has no weight in its json (export with weights)")
            weight = float(meta["weight"])
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"sample {sample.get('__key__')} has weight {weight}")
            return sample["image"], torch.cat([sample["text"], _weights_as_token_column(weight)])

        return self._wds.map(with_weight)


@contextlib.contextmanager
def _seeded_pipeline(seed: int, weighted: bool) -> Iterator[None]:
    from open_clip_train import data

    saved = data.wds
    data.wds = _SeededWebdataset(saved, seed, weighted)
    try:
        yield
    finally:
        data.wds = saved


@contextlib.contextmanager
def _importance_weighted() -> Iterator[None]:
    from open_clip_train import main

    create_model = main.create_model_and_transforms

    def weighted_model(*args: Any, **kwargs: Any):
        model, *rest = create_model(*args, **kwargs)
        pending: list[torch.Tensor] = []

        def split_weights(_module, inputs):
            image, text = inputs
            pending[:] = [text[:, -1].contiguous().view(torch.float64)]
            return image, text[:, :-1]

        def attach_weights(_module, _inputs, output):
            output["sample_weight"] = pending.pop()
            return output

        model.register_forward_pre_hook(split_weights)
        model.register_forward_hook(attach_weights)
        return (model, *rest)

    saved = (main.create_model_and_transforms, main.create_loss)
    main.create_model_and_transforms = weighted_model
    main.create_loss = lambda args: WeightedClipLoss()
    try:
        yield
    finally:
        main.create_model_and_transforms, main.create_loss = saved
