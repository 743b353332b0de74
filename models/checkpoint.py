"""Reading and writing inference checkpoints: `NAME.safetensors` (tensors) + `NAME.json` (the model card).

The card alone rebuilds the networks (config), says where they came from (data, steps, device, metrics, library
versions) and pins the tensor file by sha256. Loading never unpickles anything and refuses a tensor file that does
not match its card, saying which check failed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .disentangler import Disentangler
from .framing import FRAMINGS

FORMAT = "did-checkpoint/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


def resolve_device(name: str) -> torch.device:
    """A --device / DID_DEVICE value: 'auto' is CUDA when present, else the CPU; a CUDA device on a machine
    without CUDA is refused here, with the flag's value, rather than at the first tensor moved there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CheckpointError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CheckpointError(f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                                  f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 on the CPU is emulated and slow."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def compute_dtype(device: torch.device, name: str) -> tuple[torch.dtype, str | None]:
    """The dtype a model computes in on `device` when `name` (a DTYPES key) is asked for, and why, where it is not
    the one asked for: CUDA computes in any of them; the CPU in float32, or bfloat16 where the CPU has it natively."""
    dtype = DTYPES[name]
    if device.type == "cuda" or dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16()):
        return dtype, None
    why = "this CPU has no native bf16 (AVX512-BF16 or AMX)" if dtype == torch.bfloat16 else "float16 is computed on CUDA only"
    return torch.float32, f"{name} on {device}: {why}; computing in float32"


def paths(path: str | Path, default: str = "model") -> tuple[Path, Path]:
    """(card, tensors) for 'DIR/NAME', 'DIR/NAME.json', 'DIR/NAME.safetensors' or a directory holding `default`.json."""
    p = Path(path)
    if p.is_dir():
        p = p / default
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"did": v("did"), "torch": torch.__version__, "safetensors": v("safetensors"), "python": platform.python_version()}


def write_tensors(state: dict[str, torch.Tensor], path: Path, fmt: str = FORMAT) -> None:
    """Write a safetensors file atomically (temporary name, then rename), readable by a service running as another user."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": fmt})
    tmp.chmod(0o644)
    tmp.replace(path)


def write_card(card: dict[str, Any], path: Path) -> None:
    """Write a JSON card atomically; written after its tensor file, so a reader never sees a card without tensors."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(path)


def save(
    model: Disentangler,
    path: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    dtype: str = "float32",
    framing: str = "none",
    notes: str | None = None,
) -> Path:
    """Write the model's tensors (cast to `dtype`) and its card; returns the card's path. `notes` is free text for
    the card's readers (how and where the model was trained, what it does not do well). `framing` says where its
    training images put a face (`models.framing`): the service aligns uploads to it.

    The tensor file is written first and the card last, each through a temporary name, so a reader never sees
    a card that points at a half-written tensor file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, not {framing!r}")
    card_path, tensor_path = paths(path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    write_tensors(state, tensor_path)
    card = {
        "format": FORMAT,
        "name": card_path.stem,
        "variant": model.config.variant,
        "domains": {"a": model.config.domain_a, "b": model.config.domain_b},
        "framing": framing,
        "config": model.config.to_dict(),
        "tensors": {
            "file": tensor_path.name,
            "sha256": sha256(tensor_path),
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "bytes": tensor_path.stat().st_size,
        },
        "training": training or {},
        "metrics": metrics or {},
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if notes:
        card["notes"] = notes
    write_card(card, card_path)
    return card_path


def read_card(path: str | Path, fmt: str = FORMAT, what: str = "model card") -> dict[str, Any]:
    """The card of format `fmt`, checked for its required sections (tensors are not read); errors call it `what`."""
    card_path, _ = paths(path)
    if not card_path.is_file():
        raise CheckpointError(f"{card_path}: {what} not found")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{card_path}: {what} is not valid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("format") != fmt:
        raise CheckpointError(f"{card_path}: not a {fmt} {what} (format={card.get('format') if isinstance(card, dict) else None!r})")
    for key in ("config", "tensors"):
        if not isinstance(card.get(key), dict):
            raise CheckpointError(f"{card_path}: {what} has no '{key}' section")
    return card


class Stored(NamedTuple):
    """A card and its tensors as read from disk, after the sha256 check."""

    card: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    file: Path  # the tensor file, named in errors


def read_checkpoint(path: str | Path, fmt: str = FORMAT, what: str = "model card") -> Stored:
    """The card of format `fmt` at `path` and its tensors, read only once their file's sha256 matches the card's
    pin; models and the judge both load through here."""
    card_path, _ = paths(path)
    card = read_card(card_path, fmt, what)
    tensor_path = card_path.parent / card["tensors"].get("file", card_path.stem + ".safetensors")
    if not tensor_path.is_file():
        raise CheckpointError(f"{card_path}: tensor file {tensor_path.name} not found")
    digest = sha256(tensor_path)
    if digest != card["tensors"].get("sha256"):
        raise CheckpointError(
            f"{tensor_path}: sha256 {digest[:16]}... does not match the card's {str(card['tensors'].get('sha256'))[:16]}... "
            "(the tensor file was changed or belongs to another card)"
        )
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{tensor_path}: not a readable safetensors file ({e})") from None
    return Stored(card, stored, tensor_path)


def load_state(module: torch.nn.Module, stored: Stored) -> None:
    """Load the stored tensors into `module`, cast to its dtypes, after checking every name and shape: a mismatch is
    a CheckpointError naming the tensor file and the first few differences."""
    tensor_path, stored = stored.file, stored.tensors
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [
        f"{k} has shape {tuple(stored[k].shape)}, the card's config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in stored and stored[k].shape != v.shape
    ]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{tensor_path}: tensors do not match the card's config: {'; '.join(problems[:5])}{more}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in stored.items()})


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Disentangler:
    """Rebuild the model from its card and load its tensors, in eval mode on `device`; `model.card` holds the card."""
    card_path, _ = paths(path)
    stored = read_checkpoint(card_path)
    try:
        config = ModelConfig.from_dict(stored.card["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{card_path}: invalid model config ({e})") from None
    model = Disentangler(config)
    load_state(model, stored)
    model.card = stored.card
    return model.to(device=device, dtype=dtype).eval()
