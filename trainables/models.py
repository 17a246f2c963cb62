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

import re
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
    common = _timm_kwargs(num_classes)
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


def _timm_kwargs(num_classes: int) -> dict[str, Any]:
    return dict(num_classes=num_classes, in_chans=1, drop_path_rate=0.0)


class WeightsFileError(InitError):
    """An init's weight file is not a checkpoint, or not one of the model's architecture (`create_meta_model`).

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


META = torch.device("meta")
"""Tensors with shapes and dtypes but no storage: a model built there costs no memory and no initialization."""


def create_meta_model(model: str, init: ResolvedInit, num_classes: int = len(LABELS)) -> nn.Module:
    """The network `create_model` builds for ``init``, on the meta device (`META`), in a fraction of a second and
    without memory: the same timm call, and the init's weight file loaded as `create_model` loads it (timm's
    checkpoint filter, the RGB stem folded to one channel, the head dropped; a dpsweep checkpoint strictly) but
    read for its tensors' names and shapes only (`checkpoint_shapes`), never its values. Never downloads.

    Raises:
        WeightsFileError: the weight file is not a checkpoint, or its tensors are not the model's.
    """
    common = _timm_kwargs(num_classes)
    if init.kind == "random" or init.weights is None:
        with META:
            return timm.create_model(model if init.kind != "timm" else init.timm_name, pretrained=False, **common)
    path = Path(init.weights)
    how = "safetensors" if init.kind == "checkpoint" else "timm"
    shapes = checkpoint_shapes(path, how)
    try:
        with META:
            if init.kind == "timm":  # timm's own loading (`load_pretrained`), from the given tensors
                overlay = dict(state_dict=shapes)
                return timm.create_model(init.timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **common)
            net = timm.create_model(model, pretrained=False, **common)
            net.load_state_dict(shapes)
            return net
    except (KeyError, RuntimeError, ValueError, AssertionError) as error:
        with META:
            bare = timm.create_model(model, pretrained=False, **common)
        adapted = _adapted_tensors(init.timm_name) if init.kind == "timm" else set()
        differences = _mismatch(bare, shapes, adapted) or _first_line(error)
        raise WeightsFileError(
            f"{path} does not hold {init.timm_name} weights ({differences}); "
            f"point it at the .safetensors/.pth file of {init.timm_name}",
            path,
        ) from None


def checkpoint_shapes(path: Path, how: str = "timm") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as meta tensors (names, shapes, dtypes; no values read).

    ``how``: ``timm`` reads the file as timm's `~timm.models.load_state_dict` does (safetensors by the
    ``.safetensors`` suffix, else ``torch.load`` with ``weights_only``; the EMA, ``state_dict`` or ``model`` entry of
    a training checkpoint; ``module.`` prefixes removed); ``safetensors`` as `load_weights` does (a safetensors file
    whatever its name).

    Raises:
        WeightsFileError: the file cannot be read as such a checkpoint (text, truncated, a pickled object).
    """
    safetensors = how == "safetensors" or path.name.endswith(".safetensors")
    try:
        if safetensors:
            return _safetensors_shapes(path)
        checkpoint = torch.load(path, map_location=META, weights_only=True)
    except OSError as error:
        raise WeightsFileError(f"{path} cannot be read ({error.strerror or error}); make it readable", path) from None
    except Exception as error:  # every reader's own error type: all mean "not such a checkpoint"
        kind = "safetensors file" if safetensors else "checkpoint"
        raise WeightsFileError(
            f"{path} is not a {kind} ({_first_line(error)}); point it at the model's "
            ".safetensors (or .pth) weight file",
            path,
        ) from None
    return _timm_state_dict(checkpoint, path)


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The header of a safetensors file as meta tensors (the tensors' bytes are not read)."""
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(path), framework="pt") as file:
        for name in file.keys():
            tensor = file.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.float32)
            shapes[name] = torch.empty(tensor.get_shape(), dtype=dtype, device=META)
    return shapes


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors' dtype names -> torch's (another dtype reads as float32: only names and shapes are checked)."""


def _timm_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict timm's `~timm.models.load_state_dict` takes from a loaded checkpoint."""
    from timm.models import clean_state_dict

    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if key in ("state_dict_ema", "model_ema") and checkpoint.get(key) is None:
                continue
            if key in checkpoint:
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsFileError(
            f"{path} holds no state dict (a mapping of tensor names to tensors, got {type(checkpoint).__name__}); "
            "point it at the model's .safetensors (or .pth) weight file",
            path,
        )
    state: dict[str, torch.Tensor] = clean_state_dict(checkpoint)
    return state


def _adapted_tensors(timm_name: str) -> set[str]:
    """The tensors timm adapts when it loads pretrained weights: the stem (folded to one channel), the head
    (dropped)."""
    cfg = _pretrained_cfg(timm_name)
    if cfg is None:
        return set()
    names = [*_as_tuple(cfg.first_conv), *_as_tuple(cfg.classifier)]
    return {f"{name}.{kind}" for name in names for kind in ("weight", "bias")}


def _as_tuple(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names or ())


def _mismatch(model: nn.Module, shapes: dict[str, torch.Tensor], adapted: set[str]) -> str:
    """What differs between a model's tensors and a checkpoint's, in a few words ("" if nothing obvious); the
    ``adapted`` tensors may differ in shape or be absent."""
    own = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [name for name in own if name not in shapes and name not in adapted]
    unexpected = [name for name in shapes if name not in own and name not in adapted]
    reshaped = [
        f"{name} {tuple(shapes[name].shape)} instead of {shape}"
        for name, shape in own.items()
        if name in shapes and name not in adapted and tuple(shapes[name].shape) != shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} tensors are missing, e.g. {', '.join(missing[:2])}")
    if unexpected:
        parts.append(f"{len(unexpected)} are not the model's, e.g. {', '.join(unexpected[:2])}")
    if reshaped:
        parts.append(f"{len(reshaped)} have other shapes, e.g. {reshaped[0]}")
    return "; ".join(parts)


def _first_line(error: BaseException) -> str:
    """An error's first line, without terminal colour codes (torch.load's have them), at most 200 characters."""
    if "Weights only load failed" in str(error):
        return "it holds pickled Python objects besides tensors, which timm's loading refuses (weights_only)"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


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
