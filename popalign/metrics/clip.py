"""CLIP score and optional learned scorers (PickScore, aesthetics), loaded from local folders or hub ids."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from popalign.errors import UserError, load_reason
from popalign.metrics.fid import as_float_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder(nn.Module):
    """A transformers ``CLIPModel`` + tokenizer from a folder or hub id, with tensor preprocessing.

    Images are resized (shorter side, bicubic, antialiased), centre-cropped and normalised with the
    checkpoint's ``preprocessor_config.json`` (OpenAI CLIP values when absent), so no PIL or
    torchvision round trip is needed. Embeddings are L2-normalised.
    """

    def __init__(self, model_name_or_path: str, local_files_only: bool = False) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel
        from transformers.image_processing_base import ImageProcessingMixin

        src, kw = str(model_name_or_path), {"local_files_only": local_files_only}
        try:
            self.model = CLIPModel.from_pretrained(src, **kw).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        except OSError as e:
            raise UserError(f"{src}: cannot load a CLIP model and tokenizer ({load_reason(e)})") from e
        try:
            cfg = ImageProcessingMixin.get_image_processor_dict(src, **kw)[0]
        except OSError:
            cfg = {}
        side = self.model.config.vision_config.image_size
        size, crop = cfg.get("size", side), cfg.get("crop_size", side)
        self.resize = size.get("shortest_edge", side) if isinstance(size, dict) else int(size)
        self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        self.register_buffer("mean", torch.tensor(cfg.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("image_std", CLIP_STD)).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> ClipEncoder:
        return super().train(False)  # a frozen scorer: always eval, whatever the caller's mode

    @staticmethod
    def _pooled(out: Tensor | object) -> Tensor:
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[N, D]`` of uint8 or [0, 1] float images ``[N,3,H,W]``."""
        x = as_float_images(images).to(self.mean.device)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]].clamp(0, 1)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        return F.normalize(self._pooled(self.model.get_image_features(pixel_values=x)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[N, D]`` (truncated to the model's context length)."""
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        tok = {k: v.to(self.mean.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(self._pooled(self.model.get_text_features(**tok)).float(), dim=-1)

    def cosine(self, images: Tensor, texts: str | Sequence[str]) -> Tensor:
        """Cosine similarity of each image with its caption (one string is used for all) -> ``[N]``."""
        texts = [texts] * images.shape[0] if isinstance(texts, str) else list(texts)
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} captions")
        return (self.embed_images(images) * self.embed_texts(texts)).sum(-1)


class CLIPScore(Metric):
    """CLIP score ``100 * max(cos(E_img(x), E_txt(c)), 0)`` averaged over image-caption pairs.

    The torchmetrics convention, with any CLIP checkpoint loadable by ``CLIPModel.from_pretrained``
    (a local folder or a hub id). The CLIP weights are a submodule (they follow ``.to(device)``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, model_name_or_path: str, local_files_only: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.encoder = ClipEncoder(model_name_or_path, local_files_only)
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, text: str | Sequence[str]) -> None:
        """Add images ``[N,3,H,W]`` (uint8 or float in [0, 1]) with one caption each (or one for all)."""
        score = 100 * self.encoder.cosine(images, text).clamp(min=0)
        self.score_sum += score.to(self.score_sum).sum()
        self.n += score.numel()

    def compute(self) -> Tensor:
        """The mean clamped score over all pairs seen (NaN before any update)."""
        return (self.score_sum / self.n).float()


@runtime_checkable
class Scorer(Protocol):
    """Scores image-prompt pairs, higher = better: ``scorer(images [N,3,H,W], prompts [N]) -> [N]``."""

    name: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


class PickScoreScorer(nn.Module):
    """PickScore: ``exp(logit_scale) * cos(E_img, E_txt)`` with the PickScore_v1 CLIP-H weights."""

    name = "pickscore"

    def __init__(self, model_name_or_path: str, local_files_only: bool = True) -> None:
        super().__init__()
        self.encoder = ClipEncoder(model_name_or_path, local_files_only)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.encoder.model.logit_scale.exp() * self.encoder.cosine(images, prompts)


def _linear_chain(state: dict[str, Tensor], source: Path) -> nn.Sequential:
    """``nn.Linear`` layers from ``<prefix>.<i>.weight`` (and ``.bias``) tensors, in order of ``i``."""
    order = {}
    for key, w in state.items():
        m = re.search(r"(\d+)\.weight$", key)
        if key.endswith("weight") and (m is None or w.ndim != 2):
            raise UserError(f"{source}: {key} is not a '<prefix>.<i>.weight' matrix")
        if m:
            order[int(m.group(1))] = key
    layers = []
    for i in sorted(order):
        w, b = state[order[i]], state.get(order[i][: -len("weight")] + "bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.load_state_dict({"weight": w} | ({"bias": b} if b is not None else {}))
        layers.append(lin)
    if not layers:
        raise UserError(f"{source}: no linear layers found")
    return nn.Sequential(*layers).eval().requires_grad_(False)


class AestheticScorer(nn.Module):
    """LAION-style aesthetic score: a chain of linear layers on the normalised CLIP image embedding.

    ``folder`` holds a CLIP model (ViT-L/14 for the LAION predictor) and ``aesthetic_head.safetensors``
    with ``<prefix>.<i>.weight`` / ``.bias`` tensors, applied in order of ``i`` (the LAION head has no
    activations; convert its ``.pth`` with ``torch.load(weights_only=True)`` + ``save_file``).
    """

    name = "aesthetic"

    def __init__(self, folder: str, local_files_only: bool = True) -> None:
        super().__init__()
        from safetensors.torch import load_file

        head = Path(folder) / "aesthetic_head.safetensors"
        if not head.is_file():
            raise UserError(f"{head}: no aesthetic head found")
        self.encoder = ClipEncoder(folder, local_files_only)
        self.head = _linear_chain(load_file(str(head)), head)

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return self.head(self.encoder.embed_images(images)).squeeze(-1)


KNOWN_SCORERS = ("pickscore", "hpsv2", "aesthetic")


def _build_scorer(name: str, path: str | None) -> Scorer:
    if name == "pickscore":
        if path:
            return PickScoreScorer(path)
        try:  # the hub id, but only from the local cache
            return PickScoreScorer("yuvalkirstain/PickScore_v1")
        except UserError:
            raise UserError(
                "yuvalkirstain/PickScore_v1 is not in the local Hugging Face cache; pass "
                "pickscore=<folder with its CLIPModel and the CLIP-ViT-H-14 tokenizer>"
            ) from None
    if name == "aesthetic":
        if not path:
            raise UserError("needs aesthetic=<folder with a CLIP model and aesthetic_head.safetensors>")
        return AestheticScorer(path)
    if importlib.util.find_spec("hpsv2") is None:
        raise UserError("the hpsv2 package is not installed")
    raise UserError("the hpsv2 package unpickles its checkpoints (torch.load), which popalign does not do")


def optional_scorers(names: Sequence[str]) -> tuple[dict[str, Scorer], list[str]]:
    """Build the extra scorers that can run here: ``(available by name, notes on the skipped ones)``.

    Each entry is ``name`` or ``name=<local folder>``; names are those in :data:`KNOWN_SCORERS`.
    Nothing is downloaded: a scorer whose package or weights are absent is skipped with a note.
    """
    available: dict[str, Scorer] = {}
    notes: list[str] = []
    for spec in names:
        name, _, path = (s.strip() for s in spec.partition("="))
        name = name.lower()
        if name not in KNOWN_SCORERS:
            raise UserError(f"unknown scorer {name!r}; known: {', '.join(KNOWN_SCORERS)}")
        try:
            available[name] = _build_scorer(name, path or None)
        except UserError as e:
            notes.append(f"scorer {name} skipped: {e}")
    return available, notes
