"""Teachers: CLIP-like models whose embeddings and logit scale estimate density ratios.

A teacher is an open_clip architecture plus weights from one of three sources:

* an open_clip pretrained tag (``TeacherSpec(architecture="ViT-B-32", pretrained="openai")``),
  downloaded to open_clip's usual cache where a hub is reachable;
* a checkpoint file, local or ``s3://`` (``.safetensors``, or a torch pickle loaded with
  ``weights_only=True``), for a named architecture;
* a teacher directory in open_clip's ``local-dir`` layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), local or ``s3://``: what ``train-teacher`` writes.

``teacher_id`` fingerprints everything that changes an embedding (model config, weights sha256,
preprocessing, tokenizer, logit scale and bias), so embeddings of different teachers never mix.
Whatever is wrong with a teacher's files, loading it fails with one :class:`TeacherLoadError` line
naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from curation_platform import storage
from curation_platform.storage import S3Settings

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
FINGERPRINT_VERSION = 1
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # the resampling filters embedding/loader.py applies
_CACHE_DIR = Path.home() / ".cache" / "curation_platform" / "checkpoints"
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on its JSON header


class TeacherLoadError(ValueError):
    """A teacher that cannot be loaded, in one line: ``<file>: <problem>``."""


@dataclass(frozen=True)
class TeacherSpec:
    """Where a teacher comes from; exactly one of ``pretrained`` / ``checkpoint`` is set."""

    architecture: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.checkpoint is None):
            raise ValueError("a teacher needs exactly one of `pretrained` (an open_clip tag) or `checkpoint`")
        if self.pretrained and not self.architecture:
            raise ValueError(f"pretrained tag {self.pretrained!r} needs an architecture (e.g. ViT-B-32)")

    @property
    def is_directory(self) -> bool:
        """A checkpoint without a weights-file suffix is a ``local-dir`` style teacher directory."""
        return self.checkpoint is not None and not re.search(r"\.(safetensors|pt|pth|bin)$", self.checkpoint)

    def describe(self) -> str:
        if self.pretrained:
            return f"{self.architecture} / open_clip tag {self.pretrained}"
        return f"{self.architecture or 'teacher directory'} / {self.checkpoint}"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (part of the teacher's identity)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    jpeg_draft: bool = True  # decode JPEGs at a reduced DCT scale >= size first (faster, not bit-exact)

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any], jpeg_draft: bool = True) -> Preprocessing:
        size = cfg.get("size", 224)
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"non-square input size {size} is not supported")
            size = size[0]
        resize_mode = cfg.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {resize_mode!r} is not supported (shortest, squash)")
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in INTERPOLATIONS:  # else the embedding loader fails on every image
            raise ValueError(f"interpolation {interpolation!r} is not supported ({', '.join(INTERPOLATIONS)})")
        mean = tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        std = tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean {list(mean)} and std {list(std)} need one value per RGB channel")
        return cls(size=int(size), mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode,
                   jpeg_draft=jpeg_draft)


@dataclass
class Teacher:
    """A loaded teacher: model in eval mode plus everything needed to embed consistently."""

    spec: TeacherSpec
    model: torch.nn.Module
    tokenizer: Any
    preprocessing: Preprocessing
    model_config: dict[str, Any]
    weights_sha256: str
    teacher_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.teacher_id = fingerprint(self)

    @property
    def logit_scale(self) -> float:
        """``a = exp(logit_scale)``: the inverse temperature of SCORES.md."""
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().item())

    @property
    def embed_dim(self) -> int:
        return int(self.model_config["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Teacher:
        self.model.to(device)
        return self

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float input (N, 3, S, S) -> L2-normalised float32 embeddings."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, context_length) -> L2-normalised float32 embeddings."""
        if not self._text_is_trimmable:
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return F.normalize(self._encode_trimmed(tokens).float(), dim=-1)

    @property
    def _text_is_trimmable(self) -> bool:
        """CLIP's causal text tower pooled at the end token never reads the padding after it."""
        import open_clip  # already imported: the model is an open_clip model

        model = self.model
        return (isinstance(model, open_clip.model.CLIP) and model.text_pool_type in ("argmax", "eos")
                and model.attn_mask is not None)

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` on the batch cut to its longest caption: the same embeddings (the causal
        mask hides the padding from every earlier position) for context_length / longest fewer FLOPs."""
        from open_clip.transformer import text_global_pool

        model = self.model
        used = (tokens != 0).any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is None:
            return x
        return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection

    def describe(self) -> dict[str, Any]:
        """What manifests and metadata record about the teacher."""
        return {
            "teacher_id": self.teacher_id,
            "source": self.spec.describe(),
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "weights_sha256": self.weights_sha256,
            "preprocessing": asdict(self.preprocessing),
            "context_length": self.context_length,
        }


def fingerprint(teacher: Teacher) -> str:
    """Stable id: an architecture slug plus a sha256 over everything that changes an embedding."""
    identity = {
        "version": FINGERPRINT_VERSION,
        "model_config": teacher.model_config,
        "weights_sha256": teacher.weights_sha256,
        "preprocessing": asdict(teacher.preprocessing),
        "tokenizer": {"type": type(teacher.tokenizer).__name__, "context_length": teacher.context_length},
        "logit_scale": round(teacher.logit_scale, 6),
        "logit_bias": None if teacher.logit_bias is None else round(teacher.logit_bias, 6),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()
    vision = teacher.model_config.get("vision_cfg", {})
    slug = re.sub(r"[^a-z0-9]+", "-", (teacher.spec.architecture or f"custom-w{vision.get('width', 'x')}").lower())
    return f"{slug.strip('-')}-{digest[:16]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _localise(uri: str, s3: S3Settings | None) -> Path:
    """A local path for ``uri``: itself, or an S3 object cached by its URI (re-fetched if resized)."""
    if storage.is_local(uri):
        path = Path(storage.absolute(uri))
        if not path.exists():
            raise TeacherLoadError(f"{uri}: not found")
        return path
    entry = storage.file_entry(uri, s3)
    if entry is None:
        raise TeacherLoadError(f"{uri}: not found")
    parent, name = uri.rsplit("/", 1)
    cached = _CACHE_DIR / hashlib.sha256(parent.encode()).hexdigest()[:24] / name  # siblings stay together
    if not cached.exists() or cached.stat().st_size != entry.size:
        storage.write_bytes_atomic(str(cached), storage.read_bytes(uri, s3))
    return cached


def load_teacher(spec: TeacherSpec, device: str | torch.device = "cpu", s3: S3Settings | None = None,
                 jpeg_draft: bool = True) -> Teacher:
    """Build the open_clip model for ``spec`` and load its weights safely (no pickled code); each stage
    turns what goes wrong into one :class:`TeacherLoadError` naming the file."""
    import open_clip

    if spec.pretrained:
        source, name = spec.describe(), spec.architecture
        with _stage(source, "open_clip cannot provide it"):
            model = open_clip.create_model(name, pretrained=spec.pretrained, device="cpu")
            weights_sha256 = _pretrained_sha256(spec)
        model_config = open_clip.get_model_config(name)
    else:
        if spec.is_directory:
            source = storage.join(spec.checkpoint, CONFIG_FILE)
            weights_uri = storage.join(spec.checkpoint, WEIGHTS_FILE)
            config_path = _localise(source, s3)
            model_config, name = _read_config(config_path, source), f"local-dir:{config_path.parent}"
        else:
            source = weights_uri = spec.checkpoint
            if not spec.architecture:
                raise TeacherLoadError(f"{source}: a checkpoint file needs an architecture (e.g. ViT-B-32)")
            model_config, name = open_clip.get_model_config(spec.architecture), spec.architecture
            if model_config is None:
                raise TeacherLoadError(f"{source}: {spec.architecture!r} is not an open_clip architecture")
        weights_path = _localise(weights_uri, s3)
        with _stage(weights_uri, "cannot load the weights"):
            _check_weights(weights_path, weights_uri)
        pretrained = None if spec.is_directory else str(weights_path)  # a local-dir model loads its own weights
        with _stage(source, "open_clip cannot build the model"), _fitting(weights_uri):
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        weights_sha256 = file_sha256(weights_path)
    with _stage(source, "cannot build its tokenizer"):
        tokenizer = open_clip.get_tokenizer(name)
    with _stage(source, "unsupported preprocessing"):
        preprocessing = Preprocessing.from_open_clip(open_clip.get_model_preprocess_cfg(model), jpeg_draft)
    teacher = Teacher(spec, model, tokenizer, preprocessing, dict(model_config), weights_sha256)
    return teacher.to(device)


@contextmanager
def _stage(subject: str, problem: str) -> Iterator[None]:
    """One loading stage: whatever it raises becomes ``subject: problem (reason)``, one line, no traceback."""
    try:
        yield
    except TeacherLoadError:
        raise
    except Exception as error:  # open_clip, torch, safetensors and json raise many types; each is a bad teacher
        raise TeacherLoadError(f"{subject}: {problem} ({_reason(error)})") from error


def _reason(error: Exception) -> str:
    """The first line of ``error``'s message, after its type unless a ValueError's message says it all."""
    lines = str(error).strip().splitlines()
    if lines and isinstance(error, ValueError):
        return lines[0]
    return ": ".join([type(error).__name__, *lines[:1]])


def _read_config(path: Path, uri: str) -> dict[str, Any]:
    """``model_cfg`` of a teacher directory's config, checked before open_clip reads it."""
    with _stage(uri, "not a JSON file"):
        config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise TeacherLoadError(f"{uri}: not an open_clip config (a JSON object with a `model_cfg` object)")
    if not isinstance(config.get("preprocess_cfg", {}), dict):
        raise TeacherLoadError(f"{uri}: `preprocess_cfg` is not a JSON object")
    return config["model_cfg"]


def _check_weights(path: Path, uri: str) -> None:
    """Read the weights file before open_clip does, so what it then meets is a readable set of tensors: a
    safetensors file whose header fits the file, or a torch pickle of a state dict under ``weights_only=True``
    (open_clip retries a TypeError without weights_only, and torch < 2.6 would then run the pickle)."""
    if path.suffix == ".safetensors":
        _check_safetensors(path, uri)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TeacherLoadError(f"{uri}: refused: the pickle holds code, objects or opcodes that weights_only "
                               "loading does not allow (give a safetensors file or a plain state dict)") from error
    if not isinstance(state, dict) or not state:
        held = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise TeacherLoadError(f"{uri}: holds {held}, not a state dict of tensors")


def _check_safetensors(path: Path, uri: str) -> None:
    """The header's declared length and the tensors' extent against the file's size before safetensors reads
    anything (a forged length allocates nothing, a truncated copy says so), then safetensors' own header check."""
    from safetensors import safe_open

    size = path.stat().st_size
    if size < 8:
        raise TeacherLoadError(f"{uri}: not a safetensors file ({size} bytes, too short for a header)")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise TeacherLoadError(f"{uri}: not a safetensors file (it declares a {length}-byte header, "
                                   f"the file has {size} bytes)")
        header = handle.read(length)
    with _stage(uri, "not a safetensors file: malformed header"):
        tensors = [entry for key, entry in json.loads(header).items() if key != "__metadata__"]
        end = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
    if not tensors:
        raise TeacherLoadError(f"{uri}: holds no tensors")
    if end > size - 8 - length:
        raise TeacherLoadError(f"{uri}: truncated: its tensors need {end} bytes of data, the file has "
                               f"{size - 8 - length}")
    with safe_open(path, framework="pt"):  # safetensors' own validation of the header, reading no tensor
        pass


@contextmanager
def _fitting(uri: str) -> Iterator[None]:
    """torch's strict ``load_state_dict`` error (a line per kind of misfit) as one line naming a few tensors."""
    try:
        yield
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
            raise
        misfits: dict[str, list[str]] = {"missing": [], "unexpected": [], "size mismatch for": []}
        for line in lines[1:]:
            if line.startswith(("Missing key(s)", "Unexpected key(s)")):
                misfits[line.split()[0].lower()] += re.findall(r'"([^"]+)"', line)
            elif line.startswith("size mismatch for "):
                misfits["size mismatch for"].append(line.split()[3].rstrip(":"))
        found = "; ".join(f"{kind} {_some(names)}" for kind, names in misfits.items() if names)
        raise TeacherLoadError(f"{uri}: weights do not fit the architecture: {found or lines[-1]}") from error


def _some(names: list[str]) -> str:
    """Up to two of ``names`` and how many more: enough to find the misfit, short enough for one line."""
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def _pretrained_sha256(spec: TeacherSpec) -> str:
    """sha256 of the pretrained file in open_clip's cache (``create_model`` has just fetched it)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.architecture, spec.pretrained)
    if not cfg:
        raise ValueError(f"{spec.pretrained!r} is not an open_clip pretrained tag of {spec.architecture}")
    return file_sha256(Path(download_pretrained(cfg)))


def save_teacher_directory(model: torch.nn.Module, model_config: dict[str, Any], preprocess: dict[str, Any],
                           out_uri: str, extra: dict[str, Any] | None = None, s3: S3Settings | None = None) -> str:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors``: open_clip's ``local-dir``."""
    from safetensors.torch import save

    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    config = {"model_cfg": model_config, "preprocess_cfg": preprocess, **(extra or {})}
    storage.write_bytes_atomic(storage.join(out_uri, WEIGHTS_FILE), save(state), s3)
    storage.write_bytes_atomic(storage.join(out_uri, CONFIG_FILE), json.dumps(config, indent=2).encode(), s3)
    return out_uri
