"""CLIP models through open_clip: architecture registry, weight resolution, adapters, logits.

The offline tiny architecture (``dmnsp-tiny``: 12 layers per tower, width 64, 28 px, patch 7,
context 16) ships as a JSON config in ``dmnsp/model_configs`` and is registered on first use.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import add_adapters

_registered = False


class ModelError(ValueError):
    """Unknown architecture or unusable model settings."""


class WeightsError(RuntimeError):
    """Pretrained weights cannot be found or loaded; the message says how to supply them."""


def register_package_models() -> None:
    """Make the package's architecture configs known to open_clip (idempotent, on first use)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(Path(str(resources.files("dmnsp").joinpath("model_configs"))))
        _registered = True


def list_models() -> list[str]:
    """Every architecture name open_clip can build here, the package's own included."""
    register_package_models()
    return open_clip.list_models()


def package_models() -> list[str]:
    """Architectures shipped with dmnsp (usable offline with random or local weights)."""
    return sorted(
        p.name[:-5]
        for p in resources.files("dmnsp").joinpath("model_configs").iterdir()
        if p.name.endswith(".json")
    )


def _network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_weights(cfg: dict, cache_dir: str | None) -> bool:
    """Whether open_clip would find these tag weights without the network."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        for name in names:
            if isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str):
                return True
    url = cfg.get("url", "")
    if url:
        folder = cache_dir or os.path.expanduser("~/.cache/clip")
        if os.path.isfile(os.path.join(folder, os.path.basename(url))):
            return True
    return False


def resolve_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """Check that ``pretrained`` can be loaded before building anything, failing fast offline.

    Args:
        model_name: open_clip architecture.
        pretrained: tag, local file path, or None (random init).
        cache_dir: open_clip download cache.

    Returns:
        What to pass to open_clip as ``pretrained``.

    Raises:
        ModelError: unknown architecture or tag.
        WeightsError: a file that does not exist, or a tag neither cached nor downloadable now.
    """
    names = list_models()
    if model_name not in names:
        import difflib

        close = difflib.get_close_matches(model_name, names, n=3)
        raise ModelError(
            f"unknown model_name {model_name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (`python -m dmnsp list-models` lists all; note open_clip writes ViT-B-16, not ViT-B/16)"
        )
    if pretrained is None or pretrained == "":
        return None
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path or os.path.exists(pretrained):
        if not os.path.isfile(pretrained):  # a FIFO or folder is never opened (torch.load would block)
            what = "is not a regular file" if os.path.exists(pretrained) else "does not exist"
            raise WeightsError(
                f"pretrained weights file {pretrained} {what}; give the path of a .pt/.bin/.safetensors "
                "checkpoint (for the tiny model run `python -m dmnsp pretrain` first)"
            )
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ModelError(
            f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: {', '.join(tags) or 'none'} "
            "(or give a local checkpoint path)"
        )
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if _cached_weights(cfg, cache_dir) or _network_available():
        return pretrained
    raise WeightsError(
        f"weights {model_name}/{pretrained} are not in the cache "
        f"({cache_dir or 'the default Hugging Face / ~/.cache/clip cache'}) and the internet is not reachable. "
        "Supply them in one of three ways: (1) on a machine with internet run "
        f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}', "
        "cache_dir='WEIGHTS')\"` and copy WEIGHTS here, then set `cache_dir: WEIGHTS`; "
        "(2) set `pretrained:` to a local .pt/.bin/.safetensors file; (3) run where the internet is reachable."
    )


def _load_problem(exc: Exception) -> str:
    """One short line for why a weights file did not load (torch's own messages run to paragraphs,
    and its advice to retry with ``weights_only=False`` would run a pickle's code)."""
    text = (str(exc).strip().splitlines() or [""])[0].strip() or type(exc).__name__
    if text.startswith("Weights only load failed"):
        return "it is not a plain tensor checkpoint (torch's safe loader refused it)"
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class ClipBundle:
    """A CLIP with adapters plus what is needed to feed it."""

    model: nn.Module
    tokenizer: Any
    train_transform: Any
    eval_transform: Any
    model_name: str


def create_clip(
    model_name: str,
    pretrained: str | None = None,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    adapter_dim: int | None = 64,
    adapter_scale: float = 0.1,
    adapter_dropout: float = 0.1,
) -> ClipBundle:
    """Build an open_clip CLIP in fp32, inject adapters, freeze the backbone.

    Args:
        model_name: open_clip architecture (``dmnsp-tiny`` for the offline model).
        pretrained: tag (``openai``), local checkpoint path, or None for seeded random weights.
        cache_dir: open_clip weight cache.
        device: where to put the model.
        seed: seed of the random init (backbone when not pretrained, adapters always).
        adapter_dim: bottleneck r; None builds the plain model (pretraining).
        adapter_scale: adapter output scale s.
        adapter_dropout: adapter dropout p.

    Returns:
        A :class:`ClipBundle`; transforms use the train crop scale (0.9, 1.0) of the reference.
    """
    weights = resolve_weights(model_name, pretrained, cache_dir)
    torch.manual_seed(seed)
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            precision="fp32",
            device="cpu",
            cache_dir=cache_dir,
            aug_cfg={"scale": (0.9, 1.0)},
        )
    except Exception as exc:  # open_clip raises many types (unpickling, size mismatch, download)
        if weights and os.path.isfile(weights):
            raise WeightsError(
                f"could not load weights {weights} into {model_name}: {_load_problem(exc)}. The file is corrupt or "
                "was made for another architecture; rebuild it (dmnsp pretrain) or point `pretrained` at the right file"
            ) from exc
        raise WeightsError(f"could not build {model_name} with pretrained={pretrained!r}: {exc}") from exc
    model.logit_scale.requires_grad_(False)
    if adapter_dim is not None:
        torch.manual_seed(seed)
        add_adapters(model, adapter_dim, adapter_scale, adapter_dropout)
    model.to(device)
    return ClipBundle(model, open_clip.get_tokenizer(model_name), train_tf, eval_tf, model_name)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text features."""
    return F.normalize(model.encode_text(tokens), dim=-1)


def encode_image(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features."""
    return F.normalize(model.encode_image(images), dim=-1)


def logit_scale(model: nn.Module, setting: str | float) -> torch.Tensor:
    """The factor of the logits (run key ``logit_scale``, resolved), a float32 scalar on the model's device.

    ``"checkpoint"``: ``exp(logit_scale)`` of the loaded weights, computed in float32 from the frozen
    parameter as the reference's forward does (100 for OpenAI's ViT-B/16, 14.3 for a freshly
    initialised CLIP, whatever a self-pretrained one reached); a number: that constant.
    """
    if setting == "checkpoint":
        return model.logit_scale.detach().exp()
    return torch.tensor(float(setting), dtype=torch.float32, device=model.logit_scale.device)


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """``scale * norm(f_img) · norm(f_txt)^T`` (features already normalised), multiplied in the
    reference's order: ``(scale * f_img) @ f_txt^T``."""
    return scale * image_features @ text_features.t()


def prompts(class_names: list[str], template: str) -> list[str]:
    """Text prompts, one per class name."""
    return [template.format(name) for name in class_names]


def tokenize_prompts(tokenizer, class_names: list[str], template: str) -> torch.Tensor:
    """Tokenized prompts, one row per class, as training, evaluation and pretraining feed them.

    A text context shorter than a prompt cuts it (the tiny model keeps 16 tokens): when two
    differently named classes end up with the same tokens the model cannot tell them apart, so
    this refuses; a prompt that only fills the whole context is warned about.

    Raises:
        ModelError: naming both classes, the context length and the fix.
    """
    texts = prompts(class_names, template)
    tokens = tokenizer(texts)
    seen: dict[tuple, int] = {}
    for i, row in enumerate(tokens.tolist()):
        j = seen.setdefault(tuple(row), i)
        if j != i and class_names[j] != class_names[i]:
            raise ModelError(
                f"prompts {texts[j]!r} and {texts[i]!r} are identical after tokenization: the model's text "
                f"context holds {tokens.shape[1]} tokens and cuts the class names off; use a shorter "
                "prompt_template (or pretrain.templates), e.g. 'a photo of a {}.', or shorter class names"
            )
    full = [texts[i] for i in range(len(texts)) if tokens[i, -1] != 0]
    if full:
        warnings.warn(
            f"{len(full)} prompt(s) fill the whole {tokens.shape[1]}-token text context and may be cut, "
            f"e.g. {full[0]!r}; a shorter prompt_template keeps the class names whole",
            stacklevel=2,
        )
    return tokens


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → CUDA when available (a free GPU slot is chosen by the caller), else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {spec!r} was requested but CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use device: auto or cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device {spec!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return dev
