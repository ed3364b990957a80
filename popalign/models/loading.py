"""Loading SDXL components, the frozen reference, and LoRA adapters.

Everything loads with diffusers' ``from_pretrained`` from a hub id (``stabilityai/stable-diffusion-xl-base-1.0``)
or a local diffusers folder, so the tiny pipelines the tests save and real SDXL go through the same code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from popalign.errors import UserError, load_reason

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FINGERPRINT_KEY = "popalign_base_fingerprint"
# a Hugging Face repo id: "name" or "namespace/name", letters, digits, "-", "_", "."
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


# the first versions whose ``from_pretrained`` takes ``dtype=`` (later ones warn on ``torch_dtype=``)
_DTYPE_KWARG_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


def dtype_kwarg(dtype: torch.dtype, library: str = "diffusers") -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` for a ``from_pretrained`` of ``library`` where the installed version takes
    it (diffusers >= 0.40, transformers >= 4.56), else ``{"torch_dtype": dtype}`` for older ones."""
    from importlib.metadata import version

    release = tuple(int(x) for x in re.findall(r"\d+", version(library))[:2])
    return {"dtype" if release >= _DTYPE_KWARG_SINCE[library] else "torch_dtype": dtype}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (also accepts ``bf16``/``fp16``/``fp32``)."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "half": "float16",
        "float": "float32",
    }
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` could be a hub repo id; ``./x``, ``/x``, ``~/x``, ``a/b/c`` and ``..`` cannot."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def check_model_source(name: str, what: str) -> str:
    """``name`` with ``~`` expanded; :class:`UserError` when it is a path (it cannot be a hub id) that is
    not there, so a missing local folder is reported as such instead of being looked up on the hub."""
    path = os.path.expanduser(name)
    if not os.path.exists(path) and not looks_like_hub_id(name):
        raise UserError(f"{name}: {what} not found (no such file or folder)")
    return path


def _check_component(path: str, subfolder: str) -> None:
    # local folders get a clear error; hub ids are left to huggingface_hub
    check_model_source(path, "model")
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, subfolder)):
        raise UserError(f"{path}: no '{subfolder}/' folder; expected a diffusers pipeline folder")


def load_unet(
    pretrained_model: str, subfolder: str = "unet", revision: str | None = None, variant: str | None = None
):
    """``UNet2DConditionModel.from_pretrained(pretrained_model, subfolder="unet")`` in float32."""
    from diffusers import UNet2DConditionModel

    _check_component(pretrained_model, subfolder)
    return loaded(
        pretrained_model,
        "UNet",
        lambda: UNet2DConditionModel.from_pretrained(
            pretrained_model,
            subfolder=subfolder,
            revision=revision,
            variant=variant,
            **dtype_kwarg(torch.float32),
        ),
    )


def load_noise_scheduler(pretrained_model: str, subfolder: str = "scheduler", revision: str | None = None):
    """A ``DDPMScheduler`` from the pipeline's scheduler config (its betas and prediction type).

    Training only needs ``add_noise``/``get_velocity``, which depend on the beta schedule alone, so any
    compatible scheduler config (SDXL ships an Euler one) gives the same forward process.
    """
    from diffusers import DDPMScheduler

    _check_component(pretrained_model, subfolder)
    return loaded(
        pretrained_model,
        "noise scheduler",
        lambda: DDPMScheduler.from_pretrained(pretrained_model, subfolder=subfolder, revision=revision),
    )


def loaded(source: str, what: str, load):
    """``load()``, with the errors of a hub id that is unknown, not cached offline or private, or of a
    folder diffusers cannot read (``OSError``, ``ValueError``, bad JSON) as one :class:`UserError` line:
    ``SOURCE: cannot load the WHAT (reason)``."""
    try:
        return load()
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot load the {what} ({load_reason(err)})") from None


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype=dtype)``, in place. A diffusers model that keeps no modules in float32 (SDXL's
    UNet and VAE keep none) is cast with ``nn.Module.to``: diffusers' own ``to`` (0.42) warns about
    such modules on every cast, even when the list is empty."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(dtype=dtype)
    return nn.Module.to(model, dtype=dtype)


def frozen_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients) in ``dtype``: the reference for full fine-tuning."""
    ref = cast(copy.deepcopy(model), dtype)
    ref.requires_grad_(False)
    return ref.eval()


def add_lora(
    unet: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
) -> nn.Module:
    """Freeze ``unet`` and attach trainable peft LoRA adapters (diffusers' ``add_adapter``).

    The adapters' up-projections start at zero, so the adapted UNet starts equal to the base; with
    adapters disabled it *is* the base, which is how LoRA runs get their reference for free.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config)
    return unet


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def load_lora_weights(pipe, source: str) -> None:
    """``pipe.load_lora_weights(source)`` for an export folder, a weights file or a hub id. A folder
    holding :data:`LORA_WEIGHT_NAME` names that file: diffusers before 0.42 refuses to guess a local
    folder's file name in offline mode (``HF_HUB_OFFLINE=1``). A full UNet export (a UNet
    ``config.json`` in it or in its ``unet/``) given here is a :class:`UserError` saying so."""
    named = os.path.isfile(os.path.join(source, LORA_WEIGHT_NAME))
    if not named and any(os.path.isfile(os.path.join(source, *p, "config.json")) for p in (["unet"], [])):
        raise UserError(f"{source}: a UNet export (full weights), not LoRA weights; pass it as --unet")
    pipe.load_lora_weights(source, **({"weight_name": LORA_WEIGHT_NAME} if named else {}))


def base_fingerprint(unet: nn.Module) -> str:
    """A short hash of a base UNet: its config and a strided sample (≤ 256 values) of every base weight.

    LoRA tensors are skipped and peft's ``.base_layer.`` names mapped back, so an adapted UNet has its
    base's fingerprint. Recorded at the start of training as ``checkpoint["popalign_base_fingerprint"]``,
    it lets export refuse a base other than the one the run was trained against.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    for key in sorted(state):
        flat = state[key].detach().flatten()
        h.update(key.encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
