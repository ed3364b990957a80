"""Export a trained policy as stock diffusers weights, with a model card.

A training checkpoint holds trainable state only, so the policy is rebuilt on its base model: the base
UNet (plus LoRA adapters for LoRA runs) with the checkpoint's ``policy.*`` (or EMA) weights loaded over
it. Never the ``reference.*`` weights. :func:`export_checkpoint` then writes

* full fine-tuning: ``DIR/unet/`` (config + safetensors), or with ``pipeline`` a complete pipeline
  folder whose other components come from the base;
* LoRA: ``DIR/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(DIR)``, or with ``merge``
  the adapters merged into a full UNet laid out as above;
* ``DIR/README.md``: the model card (see :func:`render_model_card`).

Everything is written to a hidden sibling folder that is renamed to ``DIR`` only once complete.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from popalign import files
from popalign.errors import UserError, first_line, load_reason
from popalign.model_card import CardFacts, find_run_config, read_mapping, render_model_card
from popalign.models.loading import (
    DEFAULT_LORA_TARGETS,
    FINGERPRINT_KEY,
    add_lora,
    base_fingerprint,
    cast,
    dtype_kwarg,
    load_unet,
    looks_like_hub_id,
    parse_dtype,
)

# hyper-parameters may hold paths; rebuilding a path from its parts runs no code
_SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


def load_training_checkpoint(path: str | Path) -> dict:
    """A :class:`~popalign.module.PopAlignModule` checkpoint read with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and ``pathlib`` paths are accepted. Raises :class:`UserError` for a
    missing file, a file that is not a checkpoint, a damaged one (an archive member failing its CRC),
    or a checkpoint of another model.
    """
    path = Path(path)
    if path.is_dir() and (path / "latest").is_file():  # DeepSpeed's: a tag file beside the tag's folder
        convert = (
            "from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict"
        )
        raise UserError(
            f"{path}: is a DeepSpeed checkpoint folder, not a checkpoint file; make it one with "
            f"`python -c \"{convert} as c; c('{path}', '{path}.consolidated')\"` (it unpickles the folder's "
            f"files: only for checkpoints you trust), then export {path}.consolidated"
        )
    if path.is_dir():
        raise UserError(
            f"{path}: is a folder, not a checkpoint file; a sharded FSDP checkpoint becomes one with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}` (writes {path.name}.consolidated)"
        )
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this is not one)"
        )
    try:
        # torch.load never checks the archive's CRCs: a checkpoint damaged by a copy or a disk would
        # export wrong weights without a word (reads the whole file once, at disk speed)
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(err)})") from err
    if damaged is not None:
        raise UserError(
            f"{path}: damaged: its member {damaged} fails the archive's CRC check (a broken copy or disk); "
            "export another checkpoint or copy this one again"
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            # mmap: only the tensors export touches are read (not the optimizer state, several times the UNet)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises KeyError, EOFError, UnpicklingError... for a non-checkpoint
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(err)})") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    if not any(k.startswith("policy.") for k in ckpt["state_dict"]) or "pretrained_model" not in hparams:
        raise UserError(
            f"{path}: not a popalign training checkpoint (no 'policy.*' weights or 'pretrained_model')"
        )
    return ckpt


def _run_folders(ckpt: dict, ckpt_path: Path) -> list[Path]:
    """Where training may have run, nearest first: the checkpoint folder training recorded (Lightning's
    ``ModelCheckpoint`` stores it absolute), the checkpoint's folder now, and the ancestors of both."""
    states = (ckpt.get("callbacks") or {}).values()
    recorded = [
        Path(s["dirpath"]) for s in states if isinstance(s, dict) and isinstance(s.get("dirpath"), str)
    ]
    folders: list[Path] = []
    for start in [p for p in recorded if p.is_absolute()] + [ckpt_path.resolve().parent]:
        folders += [f for f in (start, *start.parents) if f not in folders]
    return folders


def resolve_base(base: str, ckpt: dict, ckpt_path: str | Path) -> str:
    """The recorded base model as a path or hub id that loads from the current folder.

    ``pretrained_model`` is recorded as it was given, often relative to the folder training ran in
    (``runs/tiny/model``). A relative path that is not here is looked up under the run's folders (see
    :func:`_run_folders`); the first that holds it wins. Anything else is returned unchanged.
    """
    path = os.path.expanduser(base)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    found = next((f / path for f in _run_folders(ckpt, Path(ckpt_path)) if (f / path).is_dir()), None)
    return str(found) if found is not None else base


def _load_base_unet(base: str, ckpt_path: Path, given: bool) -> nn.Module:
    """The base's UNet; a failure blames ``--base`` when ``given``, else the checkpoint's record."""
    path = os.path.expanduser(base)
    if given:
        whose, advice = f"--base {base}", "pass a diffusers pipeline folder or hub id"
    else:
        whose, advice = f"{ckpt_path}: its base model {base}", "pass --base with the base it was trained on"
    if not os.path.isdir(path) and (os.path.exists(path) or not looks_like_hub_id(base)):
        where = "" if given else " (here or in the run's folders)"
        problem = "is not a folder" if os.path.exists(path) else f"is not found{where}"
        raise UserError(f"{whose} {problem}; {advice}")
    try:
        return load_unet(path)
    except UserError as err:
        raise UserError(f"{whose}: {err}; {advice}") from err
    except (OSError, ValueError) as err:  # hub id unknown/offline, or not a diffusers UNet
        raise UserError(f"{whose}: cannot load it ({first_line(err)}); {advice}") from err


def _check_finite(weights: dict[str, torch.Tensor], ckpt_path: Path) -> None:
    """:class:`UserError` for a weight holding NaN/inf: the run diverged (the archive passed its CRC
    check in :func:`load_training_checkpoint`, so the file holds what training saved)."""
    for name, tensor in weights.items():
        finite = torch.isfinite(tensor) if tensor.is_floating_point() else None
        if finite is None or bool(finite.all()):
            continue
        bad = int(finite.numel() - finite.sum())
        raise UserError(
            f"{ckpt_path}: {name} holds {bad} NaN/inf values (the run diverged); export an earlier checkpoint"
        )


def _trained_weights(
    ckpt: dict, unet: nn.Module, ckpt_path: Path, base: str, ema: bool
) -> dict[str, torch.Tensor]:
    """The checkpoint's ``policy.*`` tensors (EMA averages over the trainable ones), checked against ``unet``."""
    state = ckpt["state_dict"]
    weights = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if ema:
        # EMA.shadow.<i> follows the order of the policy's trainable parameters
        shadows = {k[len("ema.shadow.") :]: v for k, v in state.items() if k.startswith("ema.shadow.")}
        if not shadows:
            raise UserError(
                f"{ckpt_path}: --ema asked, but the run kept no EMA weights (train with ema_decay set)"
            )
        if set(shadows) != {str(i) for i in range(len(trainable))}:
            raise UserError(
                f"{ckpt_path}: {len(shadows)} EMA tensors for {len(trainable)} trainable weights on base {base!r}"
            )
        weights.update({name: shadows[str(i)] for i, name in enumerate(trainable)})
    params = dict(unet.named_parameters())
    # frozen weights (LoRA's base) are the base's: popalign's checkpoints leave them out, a DeepSpeed
    # folder made one file by Lightning's converter holds them; the fingerprint check tells a wrong base
    weights = {k: v for k, v in weights.items() if k not in params or params[k].requires_grad}
    expected = set(trainable) | (set(unet.state_dict()) - set(params))  # trainable + buffers
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(
            f"{ckpt_path}: its weights do not fit base {base!r} ({len(missing)} missing, {len(extra)} unexpected, "
            f"e.g. {example}); pass --base with the base it was trained on"
        )
    target = unet.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != target[name].shape:
            raise UserError(
                f"{ckpt_path}: {name} has shape {tuple(tensor.shape)} but base {base!r} expects "
                f"{tuple(target[name].shape)}; pass --base with the base it was trained on"
            )
    _check_finite(weights, ckpt_path)
    return weights


def rebuild_policy(
    ckpt: dict, ckpt_path: str | Path, base: str | None = None, ema: bool = False
) -> nn.Module:
    """The trained policy UNet in float32: ``base`` (default: the recorded one) + adapters + trained weights."""
    ckpt_path = Path(ckpt_path)
    hp = ckpt["hyper_parameters"]
    given = base is not None
    base = base or resolve_base(hp["pretrained_model"], ckpt, ckpt_path)
    unet = _load_base_unet(base, ckpt_path, given)
    recorded = ckpt.get(FINGERPRINT_KEY)
    if recorded is not None and recorded != (found := base_fingerprint(unet)):
        raise UserError(
            f"{ckpt_path}: trained on a base with fingerprint {recorded}, but {base} has {found}; "
            "pass --base with the base it was trained on"
        )
    if hp.get("lora_rank") is not None:
        add_lora(
            unet, hp["lora_rank"], hp.get("lora_alpha"), hp.get("lora_target_modules") or DEFAULT_LORA_TARGETS
        )
    unet.load_state_dict(_trained_weights(ckpt, unet, ckpt_path, base, ema), strict=False)
    return unet.eval()


def _write_full(unet: nn.Module, out: Path, base: str, dtype: torch.dtype, pipeline: bool) -> None:
    if dtype != torch.float32:
        cast(unet, dtype)
    if not pipeline:
        unet.save_pretrained(out / "unet", safe_serialization=True)
        return
    from diffusers import DiffusionPipeline

    try:  # every other component comes from the base, as stored there
        pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(base), unet=unet, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        raise UserError(f"{base}: cannot load the base pipeline for --pipeline ({load_reason(err)})") from err
    pipe.save_pretrained(out, safe_serialization=True)


def _write_lora(unet: nn.Module, out: Path, dtype: torch.dtype) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    config, layers = unet.peft_config["default"], get_peft_model_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers={k: v.to(dtype) for k, v in layers.items()},
        unet_lora_adapter_metadata=config.to_dict(),  # so load_lora_weights applies lora_alpha / r
    )


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    pipeline: bool = False,
    merge: bool = False,
    ema: bool = False,
    dtype: str = "fp32",
    config: str | Path | None = None,
    data_summary: str | Path | None = None,
    metrics: str | Path | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Export the policy of training checkpoint ``ckpt`` to the folder ``out``; returns ``out``.

    Args:
        base: base model (hub id or folder) overriding the one recorded in the checkpoint.
        pipeline: write a complete pipeline folder (full or merged UNet + the base's other components).
        merge: LoRA only: merge the adapters into the UNet instead of writing adapter weights.
        ema: export the run's EMA weights instead of the last ones.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (or ``float32``, ``bfloat16``, ``float16``) for the written
            weights.
        config: the run's LightningCLI ``config.yaml`` (default: found next to the checkpoint).
        data_summary, metrics: JSON files described in the model card.
        overwrite: replace an existing ``out``.
        push_to_hub: upload the folder to this Hugging Face repo afterwards. When the upload fails, the
            :class:`UserError` says so; ``out`` is complete and stays.
    """
    ckpt_path, out = Path(ckpt), Path(out)
    torch_dtype = parse_dtype(dtype)
    # a training run or a base model folder is never replaced, --overwrite or not
    files.check_replaceable(
        out, overwrite, is_export_output, "an export (no README.md model card of popalign export)"
    )
    # read every input before the slow part, so a bad file fails fast
    checkpoint = load_training_checkpoint(ckpt_path)
    hp = checkpoint["hyper_parameters"]
    lora = hp.get("lora_rank") is not None
    if merge and not lora:
        raise UserError(f"{ckpt_path}: --merge applies to LoRA checkpoints; this one is a full fine-tune")
    if pipeline and lora and not merge:
        raise UserError(f"{ckpt_path}: a LoRA checkpoint makes a full pipeline only with --merge")
    config_path, config_note = (
        (Path(config), None) if config is not None else find_run_config(ckpt_path, checkpoint)
    )
    facts = CardFacts(
        name=push_to_hub or out.name,
        where=push_to_hub or str(out),
        base=base or resolve_base(hp["pretrained_model"], checkpoint, ckpt_path),
        kind="lora" if lora and not merge else ("merged" if lora else "full"),
        pipeline=pipeline,
        ema=ema,
        dtype=str(torch_dtype).removeprefix("torch."),
        hparams=dict(hp),
        step=checkpoint.get("global_step"),
        fingerprint=checkpoint.get(FINGERPRINT_KEY),
        config=read_mapping(config_path) if config_path is not None else None,
        config_note=config_note,
        data_summary=read_mapping(data_summary) if data_summary is not None else None,
        data_hparams=checkpoint.get("datamodule_hyper_parameters"),
        metrics=read_mapping(metrics) if metrics is not None else None,
    )
    for path in (ckpt_path, facts.base, config_path, data_summary, metrics):  # --overwrite removes out
        if path is not None and os.path.exists(path) and Path(path).resolve().is_relative_to(out.resolve()):
            raise UserError(f"{out}: holds {path}, which this export reads; choose another --out")
    unet = rebuild_policy(checkpoint, ckpt_path, base, ema=ema)  # None: the recorded base

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.sibling(out, "partial")
    tmp.mkdir()
    try:
        if facts.kind == "lora":
            _write_lora(unet, tmp, torch_dtype)
        else:
            if lora:
                unet.fuse_lora()  # W += (alpha / r) · B A, then drop the adapter modules
                unet.unload_lora()
            _write_full(unet, tmp, facts.base, torch_dtype, pipeline)
        (tmp / "README.md").write_text(render_model_card(facts), encoding="utf-8")
        files.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub:
        push_folder_to_hub(out, push_to_hub, private=private)
    return out


def is_export_output(folder: Path) -> bool:
    """Whether ``folder`` holds what ``export`` writes: a ``README.md`` model card whose front matter is
    tagged ``popalign`` (the only non-empty folders ``--overwrite`` replaces)."""
    try:
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    front = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    try:
        meta = yaml.safe_load(front[1]) if front else None
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and "popalign" in (meta.get("tags") or [])


def push_folder_to_hub(folder: str | Path, repo: str, private: bool = False) -> Any:
    """Create (if needed) the model repo ``repo`` on the Hugging Face hub and upload ``folder`` to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="popalign export")
    except Exception as err:  # offline, no token, no rights: each is the user's to fix
        later = f"hf upload {repo} {shlex.quote(str(folder))}" + (" --private" if private else "")
        raise UserError(
            f"{folder}: could not push to the hub repo {repo} ({first_line(err)}); the export in {folder} is "
            f"complete: upload just that folder later with `{later}`"
        ) from err
