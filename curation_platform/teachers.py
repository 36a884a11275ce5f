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
"""

from __future__ import annotations

import hashlib
import json
import re
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
_CACHE_DIR = Path.home() / ".cache" / "curation_platform" / "checkpoints"


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
        return cls(
            size=int(size),
            mean=tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=resize_mode,
            jpeg_draft=jpeg_draft,
        )


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
    if not storage.is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"teacher checkpoint not found: {uri}")
        return path
    entry = storage.file_entry(uri, s3)
    if entry is None:
        raise FileNotFoundError(f"teacher checkpoint not found: {uri}")
    parent, name = uri.rsplit("/", 1)
    cached = _CACHE_DIR / hashlib.sha256(parent.encode()).hexdigest()[:24] / name  # siblings stay together
    if not cached.exists() or cached.stat().st_size != entry.size:
        storage.write_bytes_atomic(str(cached), storage.read_bytes(uri, s3))
    return cached


def load_teacher(spec: TeacherSpec, device: str | torch.device = "cpu", s3: S3Settings | None = None,
                 jpeg_draft: bool = True) -> Teacher:
    """Build the open_clip model for ``spec`` and load its weights safely (no pickled code)."""
    import open_clip

    if spec.pretrained:
        model = open_clip.create_model(spec.architecture, pretrained=spec.pretrained, device="cpu")
        tokenizer = open_clip.get_tokenizer(spec.architecture)
        model_config = open_clip.get_model_config(spec.architecture)
        weights_sha256 = _pretrained_sha256(spec)
    elif spec.is_directory:
        config_path = _localise(storage.join(spec.checkpoint, CONFIG_FILE), s3)
        weights_path = _localise(storage.join(spec.checkpoint, WEIGHTS_FILE), s3)
        model = open_clip.create_model(f"local-dir:{config_path.parent}", device="cpu")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{config_path.parent}")
        model_config = json.loads(config_path.read_text())["model_cfg"]
        weights_sha256 = file_sha256(weights_path)
    else:
        if not spec.architecture:
            raise ValueError(f"checkpoint file {spec.checkpoint!r} needs an architecture (e.g. ViT-B-32)")
        weights_path = _localise(spec.checkpoint, s3)
        model = open_clip.create_model(spec.architecture, pretrained=None, device="cpu")
        open_clip.load_checkpoint(model, str(weights_path), weights_only=True)
        tokenizer = open_clip.get_tokenizer(spec.architecture)
        model_config = open_clip.get_model_config(spec.architecture)
        weights_sha256 = file_sha256(weights_path)
    preprocessing = Preprocessing.from_open_clip(open_clip.get_model_preprocess_cfg(model), jpeg_draft)
    teacher = Teacher(spec, model, tokenizer, preprocessing, dict(model_config), weights_sha256)
    return teacher.to(device)


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
