"""Zero-shot evaluation of a student CLIP checkpoint with clip_benchmark, in-process.

Each benchmark is one call of clip_benchmark's own ``clip_benchmark.cli.run(args)``, with an
``argparse.Namespace`` built from clip_benchmark's own parser defaults for ``eval``
(:func:`clip_benchmark_defaults`) and the few fields this evaluation sets. clip_benchmark writes its
JSON (``{"dataset", "model", "pretrained", "task", "metrics", "language"}``) to
``<out_dir>/<name>.json``; :func:`evaluate_checkpoint` returns those dicts as written and
:func:`summarise` flattens them.

Nothing downloads: the model must be an open_clip config registered in this process
(``open_clip.add_model_config``) with open_clip's own BPE tokenizer (no ``hf_*`` towers or tokenizer,
no pretrained timm tower) and the checkpoint a local file (open_clip_train's ``{"epoch", "name",
"state_dict"}`` form, or a bare state dict).

What clip_benchmark does on its own, and how it is handled here:

* ``get_parser_args()`` parses ``sys.argv``: it is called with ``sys.argv = ["clip_benchmark", "eval"]``.
* ``run()`` picks its device itself (``cuda`` whenever CUDA is available): ``device="cpu"`` hides CUDA
  for the duration of the call, ``device="cuda:N"`` makes N the current CUDA device.
* ``dataset_root`` and ``output`` go through ``str.format`` (``{dataset}``, ``{dataset_cleaned}``, ...):
  braces in the paths are escaped; ``dataset_root`` is a set's own folder, not a template.
* ``run()`` seeds torch's global RNG (``args.seed``, 0) and loads the model anew for every set.
* ``acc5`` is NaN (JSON ``NaN``) for a set of fewer than five classes, as clip_benchmark writes it.
* sklearn warns "y_pred contains classes not in y_true" whenever a set lacks samples of some class
  (always, for a prompted-domain subset such as ``demo_domain_shapes``); that warning is silenced here.
* AMP defaults on CUDA only: autocast on CPU is bfloat16, slower and less exact on most CPUs.
* clip_benchmark 1.6.2's top-k ``accuracy`` calls ``float()`` on a 1-element array, which NumPy >= 2.4
  refuses (``TypeError: only 0-dimensional arrays ...``, LAION-AI/CLIP_benchmark#147, open): where the
  installed one fails on a probe, the same computation with ``.item()`` stands in for it during the call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from curation_platform.evaluation.benchmark_sets import CLASSIFICATION, RETRIEVAL, BenchmarkSet

RECALL_K = (1, 5)
CLASSIFICATION_METRICS = ("acc1", "mean_per_class_recall")
MEAN_ACC1 = "zeroshot_mean_acc1"
_HUB_TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")


def clip_benchmark_defaults() -> argparse.Namespace:
    """clip_benchmark's own defaults for its ``eval`` subcommand, from its own parser."""
    from clip_benchmark.cli import get_parser_args

    with mock.patch.object(sys, "argv", ["clip_benchmark", "eval"]):
        _, args = get_parser_args()
    return args


def benchmark_args(model_name: str, checkpoint: str, benchmark: BenchmarkSet, output: Path, *,
                   batch_size: int = 128, num_workers: int = 0, amp: bool = False,
                   verbose: bool = False) -> argparse.Namespace:
    """The Namespace ``clip_benchmark.cli.run`` gets for one set: its defaults plus these fields."""
    args = clip_benchmark_defaults()
    args.model_type = "open_clip"
    args.model = model_name
    args.pretrained = checkpoint
    args.dataset = benchmark.dataset
    args.dataset_root = _escape_format(benchmark.root)
    args.split = benchmark.split
    args.task = benchmark.task
    args.output = _escape_format(str(output))
    args.recall_k = list(RECALL_K)
    args.batch_size = batch_size
    args.num_workers = num_workers
    args.amp = amp
    args.verbose = verbose
    args.language = "en"
    args.skip_existing = False
    return args


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str,
    benchmarks: Sequence[BenchmarkSet],
    out_dir: Path,
    *,
    batch_size: int = 128,
    device: str = "cpu",
    num_workers: int = 0,
    amp: bool | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``checkpoint`` of the registered open_clip config ``model_name`` on every set; name ->
    clip_benchmark's JSON dict, as written to ``out_dir/<name>.json``.

    ``amp=None`` uses mixed precision on CUDA only. ``verbose`` lets clip_benchmark print its reports.
    """
    _check_offline(model_name, checkpoint)
    names = [benchmark.name for benchmark in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be unique, got {names}")
    for benchmark in benchmarks:
        if "{" in benchmark.root or "}" in benchmark.root:  # webdataset brace-expands the shard pattern
            raise ValueError(f"benchmark root must not contain braces: {benchmark.root}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_amp = device.startswith("cuda") if amp is None else amp

    from clip_benchmark.cli import run

    results: dict[str, dict[str, Any]] = {}
    with _device_scope(device), _numpy_safe_accuracy(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        for benchmark in benchmarks:
            output = out_dir / f"{benchmark.name}.json"
            output.unlink(missing_ok=True)  # a stale file must never pass for this run's result
            run(benchmark_args(model_name, str(checkpoint), benchmark, output, batch_size=batch_size,
                               num_workers=num_workers, amp=use_amp, verbose=verbose))
            results[benchmark.name] = json.loads(output.read_text(encoding="utf-8"))
    return results


def summarise(results: Mapping[str, Mapping[str, Any]], *,
              mean_over: Collection[str] | None = None) -> dict[str, float]:
    """Flat metrics: ``<name>/acc1`` and ``<name>/mean_per_class_recall`` per classification set
    (``<name>/mean_average_precision`` for a multi-label one), ``<name>/image_retrieval_recall@k`` and
    ``<name>/text_retrieval_recall@k`` per retrieval set, and ``zeroshot_mean_acc1``: the mean acc1 of
    the classification sets named in ``mean_over`` (default: all of them; pass
    ``benchmark_sets.DEMO_TASK_SETS`` to keep subsets such as ``demo_domain_shapes`` out)."""
    flat: dict[str, float] = {}
    accuracies: list[float] = []
    for name, result in results.items():
        metrics = result["metrics"]
        if result["task"] == CLASSIFICATION:
            keys = [key for key in (*CLASSIFICATION_METRICS, "mean_average_precision") if key in metrics]
            if "acc1" in metrics and (mean_over is None or name in mean_over):
                accuracies.append(float(metrics["acc1"]))
        elif result["task"] == RETRIEVAL:
            keys = [key for key in metrics if "_retrieval_recall@" in key]
        else:
            keys = list(metrics)
        flat.update({f"{name}/{key}": float(metrics[key]) for key in keys})
    if accuracies:
        flat[MEAN_ACC1] = math.fsum(accuracies) / len(accuracies)
    return flat


def _escape_format(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _check_offline(model_name: str, checkpoint: str) -> None:
    """Refuse what would make open_clip reach a hub: an unregistered or schema'd name, a non-file checkpoint."""
    import open_clip

    config = open_clip.get_model_config(model_name) if ":" not in model_name else None
    if config is None:
        raise ValueError(f"{model_name!r} is not a registered open_clip config; register its JSON with "
                         "open_clip.add_model_config first")
    hub_parts = [key for key in _HUB_TEXT_KEYS if config.get("text_cfg", {}).get(key)]
    if config.get("vision_cfg", {}).get("timm_model_pretrained"):
        hub_parts.append("timm_model_pretrained")
    if hub_parts:
        raise ValueError(f"{model_name!r} would load {hub_parts} from a hub; use open_clip's own towers")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint file at {checkpoint} (a pretrained tag would download)")


@contextlib.contextmanager
def _device_scope(device: str) -> Iterator[None]:
    """Make clip_benchmark's own choice (``cuda`` if available, else ``cpu``) land on ``device``."""
    import torch

    if device == "cpu":
        with mock.patch.object(torch.cuda, "is_available", return_value=False):
            yield
        return
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for but CUDA is not available")
        with torch.cuda.device(torch.device(device)):
            yield
        return
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@contextlib.contextmanager
def _numpy_safe_accuracy() -> Iterator[None]:
    """Stand in for clip_benchmark's top-k ``accuracy`` where it breaks on this NumPy (see the module doc)."""
    import torch
    from clip_benchmark.metrics import zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.eye(2), torch.arange(2), topk=(1,))
    except TypeError:
        with mock.patch.object(zeroshot_classification, "accuracy", _topk_accuracy):
            yield
        return
    yield


def _topk_accuracy(output: Any, target: Any, topk: Sequence[int] = (1,)) -> list[float]:
    """clip_benchmark's ``accuracy``, line for line, with ``.item()`` for the scalar."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().item()) / n for k in topk]
