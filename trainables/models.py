"""Model initializations as named recipes, and model creation (timm ConvNeXt, 1 input channel, 5 labels).

An init is named in a sweep and resolved to weights *before* any trial starts (`resolve_init`):

- ``random``: timm's default initialization, no weights.
- ``imagenet``: the architecture's supervised ImageNet-1k weights (timm tag ``<model>.fb_in1k``).
- ``dinov3``: self-supervised DINOv3 LVD-1689M weights (timm tag ``<model>.dinov3_lvd1689m``).
- ``domain``: our own non-private supervised pretraining on a public source dataset (`trainables.pretrain`);
  keeps that checkpoint's 5-label head.
- any full timm tag ``<model>.<tag>`` (e.g. ``convnext_small.dinov3_lvd1689m``).

Weights of timm tags come from a local file named in the sweep (``init_weights``) or from the Hugging Face
cache (never downloaded at run time; set HF_HUB_OFFLINE=1 on clusters without internet). A missing weight
is an error saying how to supply it; there is no silent random fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from trainables.data.labels import LABELS
from trainables.data.loaders import CacheSplitDataset, evaluation_batches
from trainables.errors import UserError

TIMM_TAG_ALIASES: dict[str, str] = {"imagenet": "fb_in1k", "dinov3": "dinov3_lvd1689m"}
"""Named inits that are a pretrained tag of the sweep's architecture."""

INIT_NAMES: tuple[str, ...] = ("random", "domain", *TIMM_TAG_ALIASES)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class InitError(UserError, ValueError):
    """An init name cannot be resolved to weights."""


@dataclass(frozen=True)
class ResolvedInit:
    """Where an init's weights come from.

    Attributes:
        name: the init's name in the sweep.
        kind: ``random``, ``timm`` (a pretrained timm tag; ImageNet/DINOv3 heads are replaced) or
            ``checkpoint`` (a full dpsweep model state dict, head included).
        timm_name: ``<arch>`` or ``<arch>.<tag>`` to pass to ``timm.create_model``.
        weights: local weight file, or None for random.
    """

    name: str
    kind: str
    timm_name: str
    weights: str | None


def timm_tag_for(init: str, model: str) -> str | None:
    """The full timm name ``<arch>.<tag>`` an init refers to (checked to exist in timm), or None for
    random/domain."""
    if init in ("random", "domain"):
        return None
    if init in TIMM_TAG_ALIASES:
        timm_name = f"{model}.{TIMM_TAG_ALIASES[init]}"
    elif "." in init:
        arch = init.split(".", 1)[0]
        if arch != model:
            raise InitError(f"init {init!r} is a weight tag for {arch!r} but the sweep's model is {model!r}")
        timm_name = init
    else:
        raise InitError(
            f"unknown init {init!r}; choose one of {INIT_NAMES} or a timm tag like '{model}.dinov3_lvd1689m'"
        )
    if _pretrained_cfg(timm_name) is None:
        tags = [name for name in timm.list_pretrained(f"{model}.*")]
        raise InitError(f"timm has no pretrained weights {timm_name!r} (init {init!r}); {model} has {tags}")
    return timm_name


def _pretrained_cfg(timm_name: str) -> PretrainedCfg | None:
    try:
        return get_pretrained_cfg(timm_name)
    except RuntimeError:  # timm raises for a tag its architecture does not have
        return None


def find_in_hf_cache(timm_name: str) -> Path | None:
    """Path of a timm tag's weight file in the local Hugging Face cache, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id=cfg.hf_hub_id, filename=filename)
        if isinstance(found, str):
            return Path(found)
    return None


def resolve_init(
    init: str, model: str, weights_file: str | None = None, domain_checkpoint: Path | None = None
) -> ResolvedInit:
    """Resolve an init name to a weight source, or raise `InitError` with the exact fix.

    Args:
        init: the init's name in the sweep.
        model: timm architecture, e.g. ``convnext_small``.
        weights_file: a local weight file given in the sweep for this init (.safetensors/.pth).
        domain_checkpoint: the pretrain stage's output, for ``domain``.
    """
    if model not in timm.list_models():
        raise InitError(f"unknown model {model!r}; use a timm architecture such as convnext_small, convnext_tiny")
    if init == "random":
        return ResolvedInit(init, "random", model, None)
    if init == "domain":
        if domain_checkpoint is None or not Path(domain_checkpoint).exists():
            raise InitError(
                f"init 'domain' needs the pretrain stage's checkpoint, not found at {domain_checkpoint}; "
                "run `dpsweep pretrain SWEEP.yaml` (or `dpsweep sweep`, which runs it first)"
            )
        return ResolvedInit(init, "checkpoint", model, str(domain_checkpoint))
    timm_name = timm_tag_for(init, model)
    assert timm_name is not None
    if weights_file is not None:
        if not Path(weights_file).is_file():
            raise InitError(
                f"init_weights.{init}: file {weights_file} does not exist; point it at the .safetensors/.pth "
                f"file of {timm_name}"
            )
        return ResolvedInit(init, "timm", timm_name, str(weights_file))
    cached = find_in_hf_cache(timm_name)
    if cached is None:
        cfg = get_pretrained_cfg(timm_name)
        set_weights = f"set `init_weights: {{{init}: /path/to/model.safetensors}}` in the sweep file"
        if cfg is None or not cfg.hf_hub_id:  # timm knows no Hugging Face repository to download from
            raise InitError(f"weights for init {init!r} ({timm_name}) are not available offline; {set_weights}")
        raise InitError(
            f"weights for init {init!r} ({timm_name}) are not available offline. Either download them once on a "
            f"machine with internet (`huggingface-cli download {cfg.hf_hub_id}`, then copy ~/.cache/huggingface) "
            f"or {set_weights}"
        )
    return ResolvedInit(init, "timm", timm_name, str(cached))


def create_model(model: str, init: ResolvedInit, num_classes: int = len(LABELS)) -> nn.Module:
    """Build a 1-channel timm model with a ``num_classes`` head from a resolved init.

    Pretrained RGB stems are folded to one channel by timm (sum over RGB). ``drop_path_rate`` is 0: DP
    requires a deterministic forward per sample (Opacus' functorch path re-runs it).
    """
    common: dict[str, Any] = dict(num_classes=num_classes, in_chans=1, drop_path_rate=0.0)
    if init.kind == "random":
        return timm.create_model(model, pretrained=False, **common)
    if init.kind == "timm":
        return timm.create_model(
            init.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=init.weights), **common
        )
    if init.kind == "checkpoint":
        if init.weights is None:
            raise InitError(f"init {init.name!r} is a checkpoint init without a weight file")
        net = timm.create_model(model, pretrained=False, **common)
        net.load_state_dict(load_weights(Path(init.weights)))
        return net
    raise InitError(f"unknown init kind {init.kind!r}")


def save_weights(model: nn.Module, path: Path) -> None:
    """Save a model's state dict as safetensors (atomic: tmp file + rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@torch.no_grad()
def predict(model: nn.Module, dataset: CacheSplitDataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [n, k] and labels [n, k] over a whole split, in eval mode (the train/eval mode is kept)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, labels = [], []
    for x, y in evaluation_batches(dataset, batch_size):
        scores.append(torch.sigmoid(model(x.to(device))).cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(labels)
