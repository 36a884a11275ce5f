"""Malformed teacher files: each one fails to load with one ``TeacherLoadError`` line naming the file and the
problem (issue 15), never a traceback from open_clip, torch, safetensors or json, and never runs pickled code."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
from pathlib import Path

import open_clip
import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from curation_platform.cli import main
from curation_platform.teachers import CONFIG_FILE, WEIGHTS_FILE, TeacherLoadError, TeacherSpec, load_teacher
from tests.helpers.teachers import TINY_CONFIG, tiny_teacher_dir

ARCH = "TeacherFilesTiny"  # TINY_CONFIG registered as a named open_clip architecture


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher directory; its architecture is also registered as ``ARCH`` for checkpoint files."""
    configs = tmp_path_factory.mktemp("configs")
    (configs / f"{ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(configs)
    return tiny_teacher_dir(tmp_path_factory.mktemp("good") / "teacher")


@pytest.fixture
def teacher_dir(tmp_path: Path, good: Path) -> Path:
    """A copy of the good teacher directory, for a test to break."""
    return Path(shutil.copytree(good, tmp_path / "teacher"))


def refused(spec: TeacherSpec, file: Path, phrase: str) -> str:
    """Load ``spec``; it must fail with one TeacherLoadError line naming ``file`` and containing ``phrase``."""
    with pytest.raises(TeacherLoadError) as caught:
        load_teacher(spec)
    message = str(caught.value)
    assert message.startswith(f"{file}: "), message
    assert phrase in message, message
    assert "\n" not in message
    return message


class Payload:
    """Unpickled by a full unpickler, this writes a marker file: the test fails if the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def write_pickle(path: Path, marker: Path, zipped: bool) -> Path:
    state = {"logit_scale": torch.ones([]), "payload": Payload(marker)}
    torch.save(state, path) if zipped else path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.mark.parametrize(("suffix", "zipped"), [(".pt", True), (".pth", False), (".bin", True)])
def test_a_pickle_with_code_is_refused_without_running_it(tmp_path: Path, good: Path, suffix: str,
                                                          zipped: bool) -> None:
    checkpoint = write_pickle(tmp_path / f"x{suffix}", tmp_path / "pwned", zipped)
    refused(TeacherSpec(architecture=ARCH, checkpoint=str(checkpoint)), checkpoint, "refused: the pickle holds code")
    assert not (tmp_path / "pwned").exists()


def saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "phrase"), [
    (b"", "cannot load the weights (EOFError)"),
    (b"not a checkpoint", "refused: the pickle holds code, objects or opcodes"),
    (saved([1, 2]), "holds a list, not a state dict of tensors"),
    (saved({}), "holds an empty dict, not a state dict of tensors"),
    (saved({"a": 1}), "missing positional_embedding, text_projection and "),
])
def test_a_pickle_that_is_no_state_dict_says_so(tmp_path: Path, good: Path, data: bytes, phrase: str) -> None:
    checkpoint = tmp_path / "x.pt"
    checkpoint.write_bytes(data)
    refused(TeacherSpec(architecture=ARCH, checkpoint=str(checkpoint)), checkpoint, phrase)


def _header(entries: object) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(("damage", "phrase"), [
    (lambda data: struct.pack("<Q", 2**40) + data[8:], "declares a 1099511627776-byte header"),
    (lambda data: data[:-100], "truncated: its tensors need"),
    (lambda data: struct.pack("<Q", 5) + b"{abc}" + data[13:], "not a safetensors file: malformed header"),
    (lambda data: _header([1, 2]) + data[-64:], "not a safetensors file: malformed header"),
    (lambda data: _header({"x": {"dtype": "F32", "shape": [4]}}) + data[-16:], "malformed header (KeyError"),
    (lambda data: data[:5], "too short for a header"),
    (lambda data: _header({"__metadata__": {"format": "pt"}}), "holds no tensors"),
])
def test_a_damaged_safetensors_file_is_caught_before_safetensors_reads_it(
        teacher_dir: Path, monkeypatch: pytest.MonkeyPatch, damage, phrase: str) -> None:
    weights = teacher_dir / WEIGHTS_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    for module, reader in ((safetensors, "safe_open"), (safetensors.torch, "load_file")):
        monkeypatch.setattr(module, reader, lambda *args, **kwargs: pytest.fail("safetensors read it"))
    refused(TeacherSpec(checkpoint=str(teacher_dir)), weights, phrase)


def test_a_safetensors_file_our_check_passes_still_fails_in_one_line(teacher_dir: Path) -> None:
    weights = teacher_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b"trailing")  # safetensors wants its tensors to cover the file
    refused(TeacherSpec(checkpoint=str(teacher_dir)), weights, "cannot load the weights (SafetensorError: Error while "
            "deserializing header: incomplete metadata, file not fully covered)")


def test_weights_of_another_shape_name_the_offending_tensors(teacher_dir: Path) -> None:
    weights = teacher_dir / WEIGHTS_FILE
    state = load_file(weights)
    state["text_projection"] = torch.zeros(32, 64)
    state["visual.proj"] = torch.zeros(16, 32)
    state["ln_final.weight"] = torch.zeros(8)
    save_file(state, weights)
    message = refused(TeacherSpec(checkpoint=str(teacher_dir)), weights, "weights do not fit the architecture")
    assert "size mismatch for" in message
    assert "and 1 more" in message
    assert sum(name in message for name in ("text_projection", "visual.proj", "ln_final.weight")) == 2


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path, good: Path) -> None:
    state = load_file(good / WEIGHTS_FILE)
    del state["logit_scale"]
    state["visual.extra"] = torch.zeros(1)
    checkpoint = tmp_path / "partial.pt"
    torch.save(state, checkpoint)
    message = refused(TeacherSpec(architecture=ARCH, checkpoint=str(checkpoint)), checkpoint,
                      "weights do not fit the architecture: missing logit_scale; unexpected visual.extra")
    assert message.endswith("unexpected visual.extra")


@pytest.mark.parametrize(("config", "phrase"), [
    ("{not json", "not a JSON file (Expecting property name"),
    ("[1, 2]", "not an open_clip config"),
    ({"preprocess_cfg": {"size": 32}}, "not an open_clip config"),
    ({"model_cfg": TINY_CONFIG, "preprocess_cfg": [32]}, "`preprocess_cfg` is not a JSON object"),
    ({"model_cfg": {"embed_dim": 32}}, "open_clip cannot build the model (KeyError: 'text_cfg')"),
    ({"model_cfg": {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": "two"}}},
     "open_clip cannot build the model (TypeError"),
])
def test_an_invalid_config_is_named(teacher_dir: Path, config, phrase: str) -> None:
    path = teacher_dir / CONFIG_FILE
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    refused(TeacherSpec(checkpoint=str(teacher_dir)), path, phrase)


def _rewrite_config(teacher_dir: Path, text_cfg: dict | None = None, preprocess_cfg: dict | None = None,
                    vision_cfg: dict | None = None) -> Path:
    path = teacher_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    config["model_cfg"]["text_cfg"].update(text_cfg or {})
    config["model_cfg"]["vision_cfg"].update(vision_cfg or {})
    config["preprocess_cfg"].update(preprocess_cfg or {})
    path.write_text(json.dumps(config))
    return path


def test_a_tokenizer_that_needs_transformers_without_it(teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rewrite_config(teacher_dir, text_cfg={"hf_tokenizer_name": "bert-base-uncased"})
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    refused(TeacherSpec(checkpoint=str(teacher_dir)), path,
            "cannot build its tokenizer (ModuleNotFoundError: import of transformers halted")


def test_a_tokenizer_that_fails_to_build(teacher_dir: Path) -> None:
    path = _rewrite_config(teacher_dir, text_cfg={"tokenizer_kwargs": {"no_such_option": 1}})
    refused(TeacherSpec(checkpoint=str(teacher_dir)), path, "cannot build its tokenizer (TypeError")


@pytest.mark.parametrize(("preprocess_cfg", "vision_cfg", "phrase"), [
    ({"interpolation": "lanczos"}, {}, "interpolation 'lanczos' is not supported (bicubic, bilinear, nearest)"),
    ({"resize_mode": "longest"}, {}, "resize_mode 'longest' is not supported (shortest, squash)"),
    ({}, {"image_size": [32, 64]}, "non-square input size [32, 64] is not supported"),  # open_clip takes the model's
    ({"mean": [0.5]}, {}, "mean [0.5] and std [0.26862954, 0.26130258, 0.27577711] need one value per RGB channel"),
])
def test_unsupported_preprocessing_is_refused_at_load_time(teacher_dir: Path, preprocess_cfg: dict, vision_cfg: dict,
                                                           phrase: str) -> None:
    path = _rewrite_config(teacher_dir, preprocess_cfg=preprocess_cfg, vision_cfg=vision_cfg)
    refused(TeacherSpec(checkpoint=str(teacher_dir)), path, f"unsupported preprocessing ({phrase})")


def test_every_interpolation_the_loader_supports_loads(teacher_dir: Path) -> None:
    _rewrite_config(teacher_dir, preprocess_cfg={"interpolation": "nearest"})
    assert load_teacher(TeacherSpec(checkpoint=str(teacher_dir))).preprocessing.interpolation == "nearest"


def test_missing_files_and_architectures(tmp_path: Path, teacher_dir: Path) -> None:
    (teacher_dir / WEIGHTS_FILE).unlink()
    refused(TeacherSpec(checkpoint=str(teacher_dir)), teacher_dir / WEIGHTS_FILE, "not found")
    refused(TeacherSpec(checkpoint=str(tmp_path / "nowhere")), tmp_path / "nowhere" / CONFIG_FILE, "not found")
    refused(TeacherSpec(architecture=ARCH, checkpoint=str(tmp_path / "x.pt")), tmp_path / "x.pt", "not found")
    refused(TeacherSpec(checkpoint=str(tmp_path / "x.pt")), tmp_path / "x.pt", "needs an architecture")
    refused(TeacherSpec(architecture="No-Such-Arch", checkpoint=str(tmp_path / "x.pt")), tmp_path / "x.pt",
            "'No-Such-Arch' is not an open_clip architecture")


@pytest.mark.parametrize("command", [["score", "--lance", "lance"],
                                     ["embed", "pool", "--validated", "validated", "--lance", "lance"]])
def test_the_cli_shows_one_error_line(tmp_path: Path, good: Path, command: list[str]) -> None:
    checkpoint = write_pickle(tmp_path / "x.pt", tmp_path / "pwned", zipped=True)
    result = CliRunner().invoke(main, [*command, "--teacher", str(checkpoint), "--arch", ARCH])
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert result.exit_code in (1, 2), result.output  # the inputs are checked first (issue 17): either is one line
    assert isinstance(result.exception, SystemExit)  # click's ClickException, not a crash CliRunner caught
    assert "Traceback" not in result.output
    assert len(errors) == 1
    assert errors[0].startswith((f"Error: {checkpoint}: refused: the pickle holds code", "Error: Invalid value"))
    assert not (tmp_path / "pwned").exists()
