"""Zero-shot evaluation sets in clip_benchmark's local webdataset layout: the demo's, and any folder of them.

clip_benchmark reads a ``wds/<name>`` dataset from a root laid out as (``build_wds_dataset`` in
``clip_benchmark/datasets/builder.py``)::

    <root>/test/nshards.txt                         number of shards N
    <root>/test/0.tar ... <root>/test/{N-1}.tar     samples: KEY.jpg|png|webp plus KEY.cls (int) or KEY.txt
    <root>/classnames.txt                           one class name per line (classification)
    <root>/zeroshot_classification_templates.txt    one prompt template per line, ``{c}`` = class name
    <root>/dataset_type.txt                         "retrieval" for retrieval sets (else classification)

:func:`build_demo_benchmarks` writes the demo pool's held-out ``eval`` split in that layout under
``<out>/wds/<name>/``, so ``--dataset wds/<name> --dataset_root <out>/wds/<name>`` evaluates it:

* one classification set per eval task (``demo_domain``, ``demo_shape``, ``demo_texture``,
  ``demo_digit``, ``demo_time_of_day``), labels = class indices in the order of the demo's
  ``eval_classes.json``, class names written as words and prompt templates phrased the way demo
  captions are (:data:`DEMO_CLASSNAMES`, :data:`DEMO_TEMPLATES`);
* ``demo_retrieval``: every eval image with its caption (image<->text recall@k);
* one *prompted-domain* set per domain an importance-weighting prompt targets
  (``demo_domain_shapes`` for "a photo of a geometric shape"): the ``demo_domain`` samples of that
  domain, classified among all four domains, so its ``acc1`` is ``demo_domain``'s per-class recall
  of that domain (clip_benchmark reports no per-class figures). It is a subset of ``demo_domain``:
  leave it out of a mean over sets. :data:`PROMPTED_DOMAIN_TASKS` says which sets measure a prompt.

Output is deterministic (tar members carry fixed metadata): rebuilding gives the same bytes.
:func:`discover_benchmarks` lists the sets under any folder, e.g. a local copy of clip_benchmark's
public webdatasets (``wds_imagenet1k``, ``wds_vtab-cifar10``, ...).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from curation_platform.demo.evaluation import EVAL_TASKS, EvalLabel
from curation_platform.demo.pool import EVAL_CLASSES_FILE, EVAL_LABELS_FILE
from curation_platform.file_modes import apply_default_modes
from curation_platform.formats.img2dataset import TAR_MEMBER_MODE, TAR_MEMBER_MTIME
from curation_platform.shard_reader import (
    IMAGE_EXTENSIONS,
    TarReadSummary,
    TarSample,
    UnsafeEntry,
    iter_tar_samples,
    split_member_name,
)

Task = Literal["zeroshot_classification", "zeroshot_retrieval"]
CLASSIFICATION: Task = "zeroshot_classification"
RETRIEVAL: Task = "zeroshot_retrieval"

SPLIT = "test"
WDS_DIR = "wds"  # <out>/wds/<name>/ is one set's dataset_root
NSHARDS_FILE = "nshards.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
PUBLIC_PREFIX = "wds_"  # clip_benchmark's public sets are folders wds_<dataset_cleaned>
DEFAULT_SAMPLES_PER_SHARD = 5_000
DEMO_EVAL_SPLIT = "eval"

DEMO_PREFIX = "demo_"
DEMO_RETRIEVAL = "demo_retrieval"
DEMO_TASK_SETS: tuple[str, ...] = tuple(f"{DEMO_PREFIX}{task}" for task in EVAL_TASKS)

# Class names as words, in the demo captions' vocabulary (a label missing here is used as written).
DEMO_CLASSNAMES: dict[str, dict[str, str]] = {
    "domain": {"shapes": "geometric shape", "glyphs": "printed character", "textures": "texture pattern",
               "scenes": "landscape"},
    "shape": {},  # circle, square, ...: already words
    "texture": {"stripes": "striped", "checkerboard": "checkered", "dots": "polka dot", "grid": "grid",
                "waves": "wavy"},
    "digit": {},  # "0".."9": captions mostly write the numeral ("the digit 3", "the number 3")
    "time_of_day": {"day": "daytime", "night": "night"},
}
# A handful of prompts per task, worded like the demo captions (see curation_platform/demo/captions.py).
DEMO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "domain": ("a photo of a {c}.", "a drawing of a {c}.", "an illustration of a {c}.", "a picture of a {c}.",
               "clip art of a {c}."),
    "shape": ("a photo of a {c}.", "a drawing of a {c}.", "a {c} shape.", "clip art of a {c}.",
              "an illustration of a {c}.", "a single {c} on a background."),
    "texture": ("a {c} pattern.", "a {c} texture.", "abstract {c} wallpaper.", "a close-up of {c} fabric.",
                "a seamless {c} texture."),
    "digit": ("the digit {c}.", "the number {c}.", "the numeral {c}.", "a picture of the character '{c}'.",
              "the digit {c} printed on a background."),
    "time_of_day": ("a {c} scene.", "a {c} landscape.", "a drawing of a {c} scene.", "a cartoon {c} landscape.",
                    "a {c} scene in the countryside."),
}

# Importance-weighting prompts of the demo's recipes -> the demo domain each one asks for.
DEMO_PROMPTED_DOMAINS: dict[str, str] = {"a photo of a geometric shape": "shapes"}


def prompted_domain_set(domain: str) -> str:
    """``shapes`` -> ``demo_domain_shapes``: the domain-task samples of one domain."""
    return f"{DEMO_PREFIX}domain_{domain}"


def _domain_tasks() -> dict[str, str]:
    """Demo domain -> the eval task whose classes live in it (``shapes`` -> ``shape``)."""
    return {EvalLabel(task, classes[0]).domain: task for task, classes in EVAL_TASKS.items() if task != "domain"}


def prompted_domain_tasks(prompted_domains: Mapping[str, str] = DEMO_PROMPTED_DOMAINS) -> dict[str, tuple[str, ...]]:
    """Prompt -> the demo sets that measure its domain: the task classifying within that domain (if any),
    then the domain's prompted-domain set (its recall in the 4-way domain task)."""
    tasks = _domain_tasks()
    return {
        prompt: tuple([f"{DEMO_PREFIX}{tasks[domain]}"] if domain in tasks else []) + (prompted_domain_set(domain),)
        for prompt, domain in prompted_domains.items()
    }


# "a photo of a geometric shape" -> ("demo_shape", "demo_domain_shapes")
PROMPTED_DOMAIN_TASKS: dict[str, tuple[str, ...]] = prompted_domain_tasks(DEMO_PROMPTED_DOMAINS)


@dataclass(frozen=True)
class BenchmarkSet:
    """One clip_benchmark wds set: evaluate it as ``--dataset wds/<name> --dataset_root <root>``."""

    name: str
    root: str
    task: Task
    samples: int
    split: str = SPLIT
    classnames: tuple[str, ...] = field(default=(), repr=False)  # classification only

    @property
    def dataset(self) -> str:
        return f"{WDS_DIR}/{self.name}"


@dataclass(frozen=True)
class _Sample:
    key: str
    image: bytes
    image_ext: str
    caption: str


def build_demo_benchmarks(
    demo_dir: Path,
    out_dir: Path,
    prompted_domains: Mapping[str, str] = DEMO_PROMPTED_DOMAINS,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
) -> dict[str, Path]:
    """Write the demo's eval split as clip_benchmark wds sets under ``out_dir/wds/``; name -> dataset root.

    ``demo_dir`` is a built demo pool (``eval/`` shards, ``eval_labels.parquet``, ``eval_classes.json``);
    it is only read. ``prompted_domains`` (prompt -> demo domain) chooses the prompted-domain sets.
    Each set is written to a temporary folder and swapped in whole; a task with no samples gets no set.
    """
    demo_dir, out_dir = Path(demo_dir), Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    classes: dict[str, list[str]] = json.loads((demo_dir / EVAL_CLASSES_FILE).read_text(encoding="utf-8"))
    labels = {row["key"]: row for row in pq.read_table(demo_dir / EVAL_LABELS_FILE).to_pylist()}
    samples = _read_eval_samples(demo_dir / DEMO_EVAL_SPLIT)
    if not samples:
        raise ValueError(f"{demo_dir / DEMO_EVAL_SPLIT} holds no eval images")
    by_task: dict[str, list[tuple[_Sample, int]]] = {task: [] for task in classes}
    for sample in samples:
        row = labels.get(sample.key)
        if row is None:
            raise ValueError(f"eval sample {sample.key} has no row in {EVAL_LABELS_FILE}")
        task_classes = classes.get(row["task"])
        if task_classes is None or row["label"] not in task_classes:
            raise ValueError(f"eval sample {sample.key}: label {row['task']}/{row['label']} not in {EVAL_CLASSES_FILE}")
        by_task[row["task"]].append((sample, task_classes.index(row["label"])))

    wds_root = out_dir / WDS_DIR
    wds_root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task, task_classes in classes.items():
        if by_task[task]:
            name = f"{DEMO_PREFIX}{task}"
            written[name] = _write_classification(wds_root / name, by_task[task], _classnames(task, task_classes),
                                                  _templates(task), samples_per_shard)
    domain_classes = classes.get("domain", [])
    for domain in dict.fromkeys(prompted_domains.values()):
        if domain not in domain_classes:
            raise ValueError(f"prompted domain {domain!r} is not a demo domain {domain_classes}")
        subset = [(sample, label) for sample, label in by_task["domain"] if domain_classes[label] == domain]
        if subset:
            name = prompted_domain_set(domain)
            written[name] = _write_classification(wds_root / name, subset, _classnames("domain", domain_classes),
                                                  _templates("domain"), samples_per_shard)
    captioned = [sample for sample in samples if sample.caption]
    written[DEMO_RETRIEVAL] = _write_set(
        wds_root / DEMO_RETRIEVAL,
        [(sample, {"txt": sample.caption.encode("utf-8")}) for sample in captioned],
        {DATASET_TYPE_FILE: "retrieval\n"},
        samples_per_shard,
    )
    return written


def discover_benchmarks(root: str | Path, split: str = SPLIT) -> list[BenchmarkSet]:
    """Every clip_benchmark wds set in ``root`` (itself one, or its sub-folders), by name.

    A set is a folder holding ``<split>/nshards.txt``; its name is the folder's, less the ``wds_``
    prefix of clip_benchmark's public sets (``wds_vtab-cifar10`` -> ``vtab-cifar10``). The task comes
    from ``dataset_type.txt`` (``retrieval`` -> zeroshot_retrieval, anything else or none ->
    zeroshot_classification); samples are counted from the tar headers (keys with an image).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no benchmark folder at {root}")
    if _is_set(root, split):
        folders = [root]
    else:
        folders = sorted(child for child in root.iterdir()
                         if child.is_dir() and not child.name.startswith(".") and _is_set(child, split))
    return [_describe_set(folder, split) for folder in folders]


def _is_set(folder: Path, split: str) -> bool:
    return (folder / split / NSHARDS_FILE).is_file()


def _describe_set(folder: Path, split: str) -> BenchmarkSet:
    name = folder.name.removeprefix(PUBLIC_PREFIX) or folder.name
    type_file = folder / DATASET_TYPE_FILE
    dataset_type = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    task = RETRIEVAL if dataset_type == "retrieval" else CLASSIFICATION
    classnames: tuple[str, ...] = ()
    if task == CLASSIFICATION:
        for required in (CLASSNAMES_FILE, TEMPLATES_FILE):  # clip_benchmark cannot classify without both
            if not (folder / required).is_file():
                raise ValueError(f"{folder} is a classification set without {required}")
        classnames = tuple(line.strip() for line in (folder / CLASSNAMES_FILE).read_text(encoding="utf-8")
                           .splitlines())
    nshards = int((folder / split / NSHARDS_FILE).read_text(encoding="utf-8"))
    samples = sum(_count_samples(folder / split / f"{index}.tar") for index in range(nshards))
    return BenchmarkSet(name=name, root=str(folder), task=task, samples=samples, split=split, classnames=classnames)


def _count_samples(tar_path: Path) -> int:
    """Keys with an image member, from the headers only (a seekable tar skips member data)."""
    keys: set[str] = set()
    with tarfile.open(tar_path, mode="r:") as archive:
        for info in archive:
            split = split_member_name(info.name)
            if info.isreg() and split is not None and split[1] in IMAGE_EXTENSIONS:
                keys.add(split[0])
    return len(keys)


def _classnames(task: str, labels: Sequence[str]) -> list[str]:
    words = DEMO_CLASSNAMES.get(task, {})
    return [words.get(label, label.replace("_", " ")) for label in labels]


def _templates(task: str) -> tuple[str, ...]:
    return DEMO_TEMPLATES.get(task, ("a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}."))


def _read_eval_samples(split_dir: Path) -> list[_Sample]:
    """The split's samples with an image, in shard then key order; a damaged shard is an error."""
    samples: list[_Sample] = []
    for tar_path in sorted(split_dir.glob("[!.]*.tar")):
        summary = TarReadSummary()
        with tar_path.open("rb") as stream:
            for item in iter_tar_samples(stream, summary):
                problem = _problem(item)
                if problem:
                    raise ValueError(f"{tar_path}: {problem}")
                if not isinstance(item, TarSample) or "image" not in item.payloads or item.image_ext is None:
                    continue  # failed downloads have no image; their labels are not used
                caption = item.payloads.get("txt", b"").decode("utf-8")
                samples.append(_Sample(item.key, item.payloads["image"], item.image_ext,
                                       " ".join(caption.split())))  # one caption per line in the wds .txt
        if summary.error:
            raise ValueError(f"{tar_path}: {summary.error}")
    return samples


def _problem(item: TarSample | UnsafeEntry) -> str | None:
    if isinstance(item, UnsafeEntry):
        return f"unsafe member {item.name!r} ({item.detail})"
    return None if item.problem is None else f"sample {item.key}: {item.problem[1]}"


def _write_classification(
    root: Path, labelled: Sequence[tuple[_Sample, int]], classnames: Sequence[str], templates: Iterable[str],
    samples_per_shard: int,
) -> Path:
    metadata = {
        CLASSNAMES_FILE: "".join(f"{name}\n" for name in classnames),
        TEMPLATES_FILE: "".join(f"{template}\n" for template in templates),
        DATASET_TYPE_FILE: "classification\n",
    }
    members = [(sample, {"cls": str(label).encode("ascii")}) for sample, label in labelled]
    return _write_set(root, members, metadata, samples_per_shard)


def _write_set(
    root: Path, members: Sequence[tuple[_Sample, dict[str, bytes]]], metadata: Mapping[str, str],
    samples_per_shard: int,
) -> Path:
    """Write one set into a temporary sibling folder, then swap it in for ``root`` whole."""
    temporary = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        split_dir = temporary / SPLIT
        split_dir.mkdir()
        shards = [members[start:start + samples_per_shard] for start in range(0, len(members), samples_per_shard)]
        for index, shard in enumerate(shards):
            _write_tar(split_dir / f"{index}.tar", shard)
        (split_dir / NSHARDS_FILE).write_text(f"{len(shards)}\n", encoding="utf-8")
        for file_name, text in metadata.items():
            (temporary / file_name).write_text(text, encoding="utf-8")
        apply_default_modes(temporary)  # mkdtemp made it 0700
        if root.exists():
            retired = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old.", suffix=".tmp"))
            os.replace(root, retired / root.name)
            os.replace(temporary, root)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return root


def _write_tar(path: Path, shard: Sequence[tuple[_Sample, dict[str, bytes]]]) -> None:
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for sample, extra in shard:
            for ext, data in ((sample.image_ext, sample.image), *extra.items()):
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MEMBER_MTIME
                info.mode = TAR_MEMBER_MODE
                archive.addfile(info, io.BytesIO(data))
