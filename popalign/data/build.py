"""``popalign build``: preferred and dispreferred populations from labelled images, as training shards.

For every neutral prompt, each of ``G`` groups holds:

* a *preferred* population of ``K`` images of its augmented prompts, balanced to the axes' joint
  target ``p``: ``n_c`` members of joint class ``c``, ``K * p_c`` rounded so that the ``G`` groups of
  a prompt are balanced together too (:func:`group_quotas`), drawn without replacement; an image is
  usable only when its labels agree with every class its prompt names and are not ``unknown`` (the
  others are excluded and counted);
* a *dispreferred* population of ``K`` images of the neutral prompt itself.

Both are captioned with the neutral prompt, encoded once per prompt with both SDXL text encoders.
Each group also stores the embeddings of the augmented captions its preferred members came from
(``source_prompt_embeds``), for the trainer's identity-prompt preservation term; ``--no-source-embeds``
leaves them out.
Latents come from ``generate`` (VAE-encoded here only for images without ``latent.npy``). The shards
follow ``docs/shards.md``; ``summary.json`` records the counts. Shards are built in ``OUT/.partial``
and moved into place when all are written; a re-run with unchanged inputs (the labels' and prompt
table's content, the image shards' sizes and mtimes, the flags) does nothing while every shard still
has the size ``summary.json`` recorded (else it rebuilds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popalign import files
from popalign.data.axes import UNKNOWN, BiasAxis, Intersection, load_axes
from popalign.data.encode import (
    TEXT_COMPONENTS,
    TextEncoders,
    encode_images,
    require_components,
    time_ids,
)
from popalign.data.images import image_shards, iter_image_samples
from popalign.data.label import read_labels
from popalign.data.pipeline import component_kwargs
from popalign.data.prompts import PromptRow, read_prompt_table
from popalign.errors import UserError, first_line, load_reason

#: how ``build`` draws populations from unchanged inputs; part of the up-to-date check, so shards drawn by
#: an earlier rule are rebuilt (2: a prompt's groups balanced together, :func:`group_quotas`)
DRAW_RULE = 2


@dataclass
class BuildSettings:
    """How populations are drawn: ``K`` members each, ``G`` groups per neutral prompt."""

    population_size: int = 16
    groups_per_prompt: int = 4
    seed: int = 0
    shard_size: int = 100
    source_embeds: bool = True  # also store each preferred member's own caption embedding

    def check(self) -> None:
        for name in ("population_size", "groups_per_prompt", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def group_quotas(
    target: Sequence[float], size: int, groups: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Counts ``n_gc`` for ``groups`` populations of ``size`` members, balanced per group and together.

    Each group gets ``floor(size * p_c)`` of every class; its ``size - sum(floor)`` extra members go
    to the classes furthest below their share of all groups so far, ``d_c = (g + 1) * size * p_c -
    sum_{j < g} n_jc - floor(size * p_c)``, among classes whose share is not whole; equal ones in random
    order with ``rng``, else lowest index first. One group is largest-remainder rounding (``p = (0.5,
    0.3, 0.2)``, ``size = 4``: exact (2, 1.2, 0.8) -> (2, 1, 1)). Every ``n_gc`` is the floor or the
    ceiling of ``size * p_c``, and each class's total over the first groups stays near its share
    (within one member in every one of 20 000 random cases the tests draw). With ``p`` uniform over 6
    classes, 8 groups of 8 give every class 10 or 11 of the 64 members; rounding each group on its own
    (ties drawn per group) gave one prompt of the demo 8 members of one class and 13 of another.
    """
    exact = np.asarray(target, dtype=float) * size
    floors = np.floor(exact + 1e-9).astype(int)
    whole = exact - floors <= 1e-9  # such a class never takes an extra member
    given = np.zeros(len(exact))
    quotas = []
    for g in range(groups):
        deficit = np.where(whole, -np.inf, np.round((g + 1) * exact - given - floors, 9))
        order = rng.permutation(len(exact)) if rng is not None else np.arange(len(exact))
        ranked = order[np.argsort(-deficit[order], kind="stable")]
        counts = floors.copy()
        counts[ranked[: size - floors.sum()]] += 1
        given += counts
        quotas.append(counts)
    return quotas


@dataclass
class _Image:
    key: str
    labels: dict
    source: str
    seed: int
    latent: np.ndarray | None
    pixels: np.ndarray | None


def _fingerprint(shards: Sequence[Path], texts: Sequence[Path], **extra: Any) -> str:
    """What a build depends on: each image shard's path, size and mtime (shards are written once and
    can be large), the *content* of the text inputs (labels, prompt table: re-running ``prompts`` or
    ``label`` rewrites them unchanged, which must not force a rebuild), and ``extra``."""
    try:
        stats = [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in shards]
        digests = [(str(p), hashlib.sha256(p.read_bytes()).hexdigest()) for p in texts]
    except OSError as err:
        raise UserError(f"{err.filename}: cannot read ({err.strerror or err})") from None
    return hashlib.sha256(
        json.dumps([stats, digests, extra], sort_keys=True, default=str).encode()
    ).hexdigest()


def _vae_geometry(source: str) -> tuple[int, int]:
    """(latent channels, downsampling factor) from a VAE config."""
    from diffusers import AutoencoderKL

    try:
        cfg = AutoencoderKL.load_config(source, **component_kwargs(source, "vae"))
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot read the VAE config ({load_reason(err)})") from None
    return int(cfg.get("latent_channels", 4)), 2 ** (len(cfg["block_out_channels"]) - 1)


def _check_source(s: Any, row: PromptRow, prompts: Path) -> None:
    """``UserError`` when an image was sampled from another prompt (or classes) than its table row:
    prompt ids are positional, so images of another prompt table carry the same ids."""
    for field, stored, table_value in (
        ("prompt", s.meta["prompt"], row.prompt),
        ("classes", s.meta.get("classes", row.classes), row.classes),
    ):
        if stored != table_value:
            raise UserError(
                f"{s.where}: prompt_id {s.prompt_id!r} was generated from {field} {stored!r}, but {prompts} "
                f"says {table_value!r} (images of another prompt table: generate it into another folder)"
            )


def _foreign_shards(out: Path, previous: dict) -> list[str]:
    """``shard-*.tar`` in ``out`` that no earlier build wrote (a build cut off while moving its
    shards in leaves ``out/.partial``: then every shard counts as its own)."""
    if (out / ".partial").is_dir():
        return []
    ours = set(previous.get("shards", [])) if isinstance(previous.get("shards"), list) else set()
    return sorted(p.name for p in out.glob("shard-*.tar") if p.name not in ours)


def _shards_intact(out: Path, previous: dict) -> bool:
    """Every shard ``previous`` lists is in ``out`` with the size recorded when it was written.

    Sizes catch the usual damage (a truncated copy, a full disk) without reading the shards. A
    summary without them (written before they were recorded) counts as damaged: the rebuild writes
    the same bytes and records the sizes, once, where checking the tars' structure would read every
    shard on every re-run.
    """
    names, sizes = previous.get("shards"), previous.get("shard_bytes")
    if not (isinstance(names, list) and isinstance(sizes, list) and len(names) == len(sizes)):
        return False
    return all((out / n).is_file() and (out / n).stat().st_size == size for n, size in zip(names, sizes))


def _index_images(
    images: Path, labels: Path, prompts: Path, label_rows: dict, table: dict, geometry: tuple
) -> dict:
    """prompt_id -> its images, checking them against the labels, the prompt table and each other."""
    by_prompt: dict[str, list[_Image]] = defaultdict(list)
    seen, size = set(), None
    for s in iter_image_samples(images):
        if s.prompt_id not in table:
            raise UserError(f"{s.where}: prompt_id {s.prompt_id!r} is not in {prompts}")
        _check_source(s, table[s.prompt_id], prompts)
        row = label_rows.get(s.key)
        if row is None:
            raise UserError(
                f"{labels}: no label for {s.where}; the labels do not match the images (run popalign label)"
            )
        if row["prompt_id"] != s.prompt_id:
            raise UserError(
                f"{labels}: label of {s.key!r} is for prompt {row['prompt_id']!r}, the image's is {s.prompt_id!r}"
            )
        if row.get("image_sha1", s.digest) != s.digest:
            raise UserError(
                f"{labels}: label of {s.key!r} is of another image than {s.where} "
                "(the images changed since labelling: re-run popalign label)"
            )
        hw = s.image_size()
        if hw != (s.meta["height"], s.meta["width"]) or (size is not None and hw != size):
            want = size or (s.meta["height"], s.meta["width"])
            raise UserError(
                f"{s.where}: image is {hw[0]}x{hw[1]}, expected {want[0]}x{want[1]} (images of the wrong size)"
            )
        size = hw
        latent = s.latent()
        channels, f = geometry
        if latent is not None and latent.shape != (channels, hw[0] // f, hw[1] // f):
            raise UserError(
                f"{s.where}: latent.npy has shape {list(latent.shape)}, the model's VAE gives {[channels, hw[0] // f, hw[1] // f]}"
            )
        pixels = s.image() if latent is None else None
        by_prompt[s.prompt_id].append(
            _Image(s.key, row["labels"], s.meta["prompt"], int(s.meta["seed"]), latent, pixels)
        )
        seen.add(s.key)
    extra = sorted(set(label_rows) - seen)
    if extra:
        raise UserError(
            f"{labels}: {len(extra)} labelled images are not in {images} (e.g. {extra[0]!r}); the labels do not match the images"
        )
    return {"by_prompt": by_prompt, "size": size}


def _plan(
    rows: Sequence[PromptRow], by_prompt: dict, joint: Intersection, s: BuildSettings, summary: dict
) -> list:
    """(neutral row, group index, preferred images, dispreferred images) for every group to write."""
    axes, k = joint.axes, s.population_size
    plan = []
    for row in (r for r in rows if r.kind == "neutral"):
        neutral = by_prompt.get(row.prompt_id, [])
        pools: list[list[_Image]] = [[] for _ in range(joint.num_classes)]
        for aug in (r for r in rows if r.kind == "augmented" and r.neutral_id == row.neutral_id):
            for img in by_prompt.get(aug.prompt_id, []):
                if any(img.labels[a.name] == UNKNOWN for a in axes):
                    summary["excluded"]["unknown"] += 1
                elif any(a.name in aug.classes and img.labels[a.name] != aug.classes[a.name] for a in axes):
                    summary["excluded"]["label_disagreed"] += 1
                else:
                    pools[joint.index(img.labels)].append(img)
        rng = np.random.default_rng([s.seed, zlib.crc32(row.neutral_id.encode())])
        quotas = group_quotas(joint.target, k, s.groups_per_prompt, rng)
        need = np.max(quotas, axis=0)
        short = [
            f"{joint.class_names[c]} {len(p)}/{need[c]}" for c, p in enumerate(pools) if len(p) < need[c]
        ]
        reason = f"{len(neutral)} neutral images, need {k}" if len(neutral) < k else None
        if short:
            reason = "too few usable augmented images (class usable/needed): " + ", ".join(short[:4])
        if reason:
            summary["prompts"]["skipped"].append(
                {"neutral_id": row.neutral_id, "prompt": row.prompt, "reason": reason}
            )
            continue
        for g, quota in enumerate(quotas):
            pref = [
                pools[c][i] for c, q in enumerate(quota) for i in rng.choice(len(pools[c]), q, replace=False)
            ]
            pref = [pref[i] for i in rng.permutation(k)]
            disp = [neutral[i] for i in rng.choice(len(neutral), k, replace=False)]
            plan.append((row, g, pref, disp))
    return plan


def _count(plan: list, joint: Intersection) -> dict:
    counts: dict[str, Any] = {}
    for side, idx in (("preferred", 2), ("dispreferred", 3)):
        per_axis = {a.name: Counter() for a in joint.axes}
        joint_counts: Counter = Counter()
        for item in plan:
            for img in item[idx]:
                for a in joint.axes:
                    per_axis[a.name][img.labels[a.name]] += 1
                names = [img.labels[a.name] for a in joint.axes]
                joint_counts[UNKNOWN if UNKNOWN in names else "/".join(names)] += 1
        counts[side] = {
            **{n: dict(sorted(c.items())) for n, c in per_axis.items()},
            "joint": dict(sorted(joint_counts.items())),
        }
    return counts


def build_populations(
    images: str | Path,
    labels: str | Path,
    prompts: str | Path,
    model: str,
    out: str | Path,
    axes: Sequence[BiasAxis] | None = None,
    settings: BuildSettings | None = None,
    vae: str | None = None,
    device: str = "cpu",
) -> dict:
    """Build population shards in ``out`` and return the summary (also written to ``out/summary.json``).

    The previous shards are replaced only once the new ones are complete; when no group can be
    built, ``out`` is left as it is and the summary (``groups_written`` 0) only returned. ``UserError``
    when an image's prompt differs from its table row (images of another prompt table), or when
    ``out`` holds ``shard-*.tar`` that no earlier build wrote.
    """
    from popalign.data.schema import PopulationGroup
    from popalign.data.shards import PopulationShardWriter

    s = settings or BuildSettings()
    s.check()
    images, labels, prompts, out = Path(images), Path(labels), Path(prompts), Path(out)
    require_components(model, TEXT_COMPONENTS + (() if vae else ("vae",)))  # before any work
    rows = read_prompt_table(prompts)
    if axes is None:
        axes = load_axes(dict.fromkeys(a for r in rows for a in r.classes))
    if not axes:
        raise UserError(f"{prompts}: no augmented rows name an axis; pass --axes")
    joint = Intersection(axes)
    inputs = _fingerprint(
        image_shards(images),
        [labels, prompts],
        model=model,
        vae=vae,
        axes=[a.to_dict() for a in axes],
        settings=asdict(s),
        draw_rule=DRAW_RULE,
    )
    old = out / "summary.json"
    damaged = ""
    try:
        previous = json.loads(old.read_text(encoding="utf-8")) if old.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        previous, damaged = {}, f"; {old} is unreadable ({first_line(err)})"  # no shards beside it: rebuild
    if not isinstance(previous, dict):
        previous, damaged = {}, f"; {old} is not a JSON object"
    foreign = _foreign_shards(out, previous)  # training would read them beside ours: never "up to date"
    if not foreign and previous.get("inputs") == inputs and _shards_intact(out, previous):
        return {**previous, "up_to_date": True}
    # else rebuild, as for changed inputs: a damaged shard is replaced like an outdated one
    if foreign:
        raise UserError(
            f"{out / foreign[0]}: {len(foreign)} shard(s) in {out} that popalign build did not write "
            f"(no {old.name} lists them{damaged}); use another --out or remove them"
        )

    label_rows = read_labels(labels, axes)
    index = _index_images(
        images, labels, prompts, label_rows, {r.prompt_id: r for r in rows}, _vae_geometry(vae or model)
    )
    summary: dict[str, Any] = {
        "groups_written": 0, "population_size": s.population_size, "groups_per_prompt": s.groups_per_prompt,
        "seed": s.seed, "axes": [a.name for a in axes], "target": dict(zip(joint.class_names, joint.target)),
        "prompts": {"neutral": sum(r.kind == "neutral" for r in rows), "built": 0, "skipped": []},
        "excluded": {"label_disagreed": 0, "unknown": 0}, "image_size": list(index["size"]),
        "model": model, "vae_encoded": 0,
    }  # fmt: skip
    plan = _plan(rows, index["by_prompt"], joint, s, summary)
    summary["prompts"]["built"] = len({item[0].prompt_id for item in plan})
    if not plan:  # nothing to replace the previous shards with: leave OUT as it is
        return {**summary, "shards": [], "counts": _count(plan, joint)}

    captions = list(dict.fromkeys(item[0].prompt for item in plan))
    if s.source_embeds:
        captions = list(dict.fromkeys(captions + [i.source for item in plan for i in item[2]]))
    row_of = {caption: c for c, caption in enumerate(captions)}
    embeds, pooled = (
        TextEncoders.from_pretrained(model, device=device).encode(captions) if captions else (None, None)
    )
    missing = list({id(i): i for item in plan for i in (*item[2], *item[3]) if i.latent is None}.values())
    if missing:
        import torch
        from diffusers import AutoencoderKL

        from popalign.models.loading import dtype_kwarg

        source = vae or model
        net = AutoencoderKL.from_pretrained(
            source, **dtype_kwarg(torch.float32), **component_kwargs(source, "vae")
        )
        net.to(device).eval()
        for start in range(0, len(missing), 16):
            chunk = missing[start : start + 16]
            for img, z in zip(chunk, encode_images(net, np.stack([i.pixels for i in chunk]))):
                img.latent = z
        summary["vae_encoded"] = len(missing)

    staging = out / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    h, w = index["size"]
    with PopulationShardWriter(staging, prefix="shard", maxcount=s.shard_size) as writer:
        for row, g, pref, disp in plan:
            c = row_of[row.prompt]
            sources = list(dict.fromkeys(i.source for i in pref)) if s.source_embeds else []
            rows = [row_of[x] for x in sources]
            meta = {
                "prompt": row.prompt, "prompt_id": row.prompt_id, "neutral_id": row.neutral_id,
                "axes": [a.name for a in axes],
                "preferred_labels": [{a.name: i.labels[a.name] for a in axes} for i in pref],
                "dispreferred_labels": [{a.name: i.labels[a.name] for a in axes} for i in disp],
                "preferred_sources": [i.source for i in pref], "dispreferred_sources": [i.source for i in disp],
                "preferred_keys": [i.key for i in pref], "dispreferred_keys": [i.key for i in disp],
                "seeds": [i.seed for i in (*pref, *disp)],
            } | ({"sources": sources} if s.source_embeds else {})  # fmt: skip
            writer.write(PopulationGroup(
                key=f"{row.neutral_id}-g{g:04d}",
                preferred=np.stack([i.latent for i in pref]).astype(np.float16),
                dispreferred=np.stack([i.latent for i in disp]).astype(np.float16),
                prompt_embeds=embeds[c], pooled_prompt_embeds=pooled[c], time_ids=time_ids(h, w), meta=meta,
                source_prompt_embeds=embeds[rows] if sources else None,
                source_pooled_prompt_embeds=pooled[rows] if sources else None,
            ))  # fmt: skip
    # from here until the new summary, the folder is visibly incomplete (and .partial marks the
    # shards in it as this build's, should it be cut off)
    old.unlink(missing_ok=True)
    for stale in out.glob("shard-*.tar"):
        stale.unlink()  # all ours: _foreign_shards found none
    names = []
    for path in writer.paths:
        names.append(Path(path).name)
        os.replace(path, out / names[-1])
    # a list beside ``shards``, not a dict by name: the model card shows a long list as a count
    sizes = [(out / n).stat().st_size for n in names]
    summary.update(
        groups_written=len(plan), shards=names, shard_bytes=sizes, counts=_count(plan, joint), inputs=inputs
    )
    files.write_json(old, summary)
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    p, e = summary["prompts"], summary["excluded"]
    lines = [
        f"groups written: {summary['groups_written']} in {len(summary['shards'])} shard(s)"
        + (" (up to date, nothing rebuilt)" if summary.get("up_to_date") else ""),
        f"neutral prompts: {p['neutral']}, built {p['built']}, skipped {len(p['skipped'])}",
        f"excluded augmented images: {e['label_disagreed']} label disagreed, {e['unknown']} unknown",
    ]
    lines += [f"  skipped {x['neutral_id']} ({x['prompt']}): {x['reason']}" for x in p["skipped"][:10]]
    for side in ("preferred", "dispreferred"):
        joint = summary.get("counts", {}).get(side, {}).get("joint", {})
        lines.append(f"{side}: " + ", ".join(f"{k} {v}" for k, v in joint.items()))
    return "\n".join(lines)
