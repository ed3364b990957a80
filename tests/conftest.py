"""Shared fixtures: a tiny SDXL-architecture pipeline saved once per session, what the data stages make
with it (prompt table, images, labels), and helpers: batch builders, a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from popalign.cli import main
from popalign.commands import torch_threads
from popalign.data.axes import load_axes
from popalign.data.images import iter_image_samples
from popalign.data.pipeline import load_pipeline
from popalign.data.prompts import expand_prompts, write_prompt_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the cores of this worker's share (`make test` runs two pytest-xdist workers)
ALL_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(1)  # tiny models: threading costs more than it gives, on a shared 2-core box


def all_threads():
    """This worker's share of torch's default thread count, for the world's base model (about 1 M
    parameters, batches of 64) and the demo: the one place threads pay."""
    return torch_threads(ALL_THREADS)


# 16 px images, VAE downsampling x2 -> latents 4 x 8 x 8; text dims D = 2 * 32, pooled Dp = 32
TINY_IMAGE = 16
TINY_LATENT = 8
TINY_D = 64
TINY_DP = 32


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_sdxl(path, TinySDXLConfig(image_size=TINY_IMAGE))
    return str(path)


def make_batch(pairs: int = 2, groups: int = 1, seed: int = 0, sources: bool = False) -> dict:
    """A batch in the DataModule's layout: rows i and i + P are a pair of group `group[i]`.

    With ``sources`` it also holds each preferred row's own caption embedding (``source_*``)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    group = torch.arange(pairs) * groups // pairs
    batch = {
        "latents": torch.randn(n, 4, TINY_LATENT, TINY_LATENT, generator=g).half(),
        "prompt_embeds": torch.randn(n, 77, TINY_D, generator=g).half(),
        "pooled_prompt_embeds": torch.randn(n, TINY_DP, generator=g).half(),
        "time_ids": torch.tensor([TINY_IMAGE, TINY_IMAGE, 0, 0, TINY_IMAGE, TINY_IMAGE], dtype=torch.float32)
        .expand(n, 6)
        .clone(),
        "preferred": torch.arange(n) < pairs,
        "group": group.repeat(2),
    }
    if sources:
        batch["source_prompt_embeds"] = torch.randn(pairs, 77, TINY_D, generator=g).half()
        batch["source_pooled_prompt_embeds"] = torch.randn(pairs, TINY_DP, generator=g).half()
    return batch


def frechet_by_numpy(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two feature matrices [N, F], independently of popalign.metrics: numpy mean and covariance
    (ddof 1), and tr((S1 S2)^{1/2}) as the sum of square roots of the eigenvalues of S1 S2 (real and
    >= 0 for two PSD matrices; rounding negatives of singular covariances clipped to 0)."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False, ddof=1), np.cov(fake, rowvar=False, ddof=1)
    tr_root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root)


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture(scope="session")
def world_base(tmp_path_factory) -> str:
    """The synthetic world's default biased base model, built once per run (minutes).

    pytest-xdist workers share it: the first to ask builds it under a file lock in the run's common
    temporary folder, and ``build_base_model`` finds it cached for the others."""
    from filelock import FileLock

    from popalign.world.base import build_base_model

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker has its own basetemp below the run's
        root = root.parent
    with FileLock(str(root / "world_base.lock")), all_threads():
        return str(build_base_model(root / "world_base", progress=False))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the world's base model first: under pytest-xdist the worker that takes them starts
    the minutes-long build at once (and no other worker waits on its lock) while the other runs the
    rest."""
    items.sort(key=lambda item: "world_base" not in getattr(item, "fixturenames", ()))


def replace_build(monkeypatch, fake) -> None:
    """Stand ``fake`` in for ``train_cli._build`` and start, as ``_build`` does, with no trainers: a
    SIGTERM-stopped trainer an earlier test left alive in this process would make any stop (a Ctrl-C,
    a config error) read as SIGTERM."""
    from popalign import train_cli

    monkeypatch.setattr(train_cli, "_build", fake)
    monkeypatch.setattr(train_cli, "_TRAINERS", weakref.WeakSet())


@pytest.fixture
def umask_022():
    """The usual umask, under which a new file is 0644: files made 0600 then show."""
    umask = os.umask(0o022)
    yield 0o022
    os.umask(umask)


def assert_usual_modes(out, umask: int) -> None:
    """``out`` and every folder and file below it have the mode a new one gets under ``umask``: others
    can read them."""
    for path in [out, *out.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, f"{path}: {oct(path.stat().st_mode & 0o777)}"


# ------------------------------------------------ the data stages: generate -> label -> build
# test_generate, test_label, test_build and test_stage_errors share these session fixtures; tests only
# read them (anything they change is a copy under tmp_path)
N_IMAGES = 4  # per prompt
GEN_FLAGS = ["--images-per-prompt", str(N_IMAGES), "--steps", "2", "--height", str(TINY_IMAGE)]
GEN_FLAGS += ["--width", str(TINY_IMAGE), "--guidance-scale", "1.0", "--batch-size", "4", "--shard-size", "8"]
GEN_FLAGS += ["--no-progress"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_fails(args: list, capsys, *needles: str) -> str:
    """``popalign ARGS`` must fail with exit 2 and one line holding every needle; returns the line."""
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """For test modules of tiny models (``pytestmark``): a second thread only adds contention."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="session")
def table(tmp_path_factory) -> Path:
    """2 neutral prompts x gender: 2 neutral + 4 augmented rows."""
    rows = expand_prompts(
        ["a photo of a {identity} doctor", "a photo of a {identity} nurse"], load_axes(["gender"])
    )
    return write_prompt_table(rows, tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="session")
def generated(tiny_model, table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "images"
    assert (
        main(["generate", "--model", tiny_model, "--prompts", str(table), "--out", str(out), *GEN_FLAGS]) == 0
    )
    return out


ORACLE = '''
import hashlib, json
import numpy as np
from popalign.data.classifiers import AttributeClassifier

class Oracle(AttributeClassifier):
    """Labels an image by looking its pixels up in a JSON table {sha1: {axis: class}}."""
    def __init__(self, axes, truth):
        super().__init__(axes)
        self.truth = json.load(open(truth))
    def classify(self, images):
        out = {a.name: np.zeros(len(images), dtype=np.int64) for a in self.axes}
        for i, im in enumerate(images):
            lab = self.truth[hashlib.sha1(im.tobytes()).hexdigest()]
            for a in self.axes:
                out[a.name][i] = -1 if lab[a.name] == "unknown" else a.index(lab[a.name])
        return out
'''


@pytest.fixture(scope="session")
def oracle(generated, tmp_path_factory):
    """A plugin classifier and its truth: augmented images get their prompt's class, except one
    unknown (p0000-a0000-0000) and one disagreeing (p0000-a0001-0001); neutral images are male,
    except p0001-0003 which is unknown."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "oracle_plugin.py").write_text(ORACLE)
    truth = {}
    for s in iter_image_samples(generated):
        label = dict(s.meta["classes"]) or {"gender": "male"}
        label = {"p0000-a0000-0000": {"gender": "unknown"}, "p0000-a0001-0001": {"gender": "male"}}.get(
            s.key, label
        )
        label = {"gender": "unknown"} if s.key == "p0001-0003" else label
        truth[hashlib.sha1(s.image().tobytes()).hexdigest()] = label
    (d / "truth.json").write_text(json.dumps(truth))
    sys.path.insert(0, str(d))
    yield ["--classifier", "oracle_plugin:Oracle", "--classifier-option", f"truth={d / 'truth.json'}"]
    sys.path.remove(str(d))


@pytest.fixture(scope="session")
def labels(generated, oracle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    assert (
        main(
            [
                "label",
                "--images",
                str(generated),
                "--axes",
                "gender",
                *oracle,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A folder holding `popalign tiny`'s model and shards (tiny/model, tiny/shards) for launched runs."""
    from popalign.cli import main

    root = tmp_path_factory.mktemp("launched")
    assert main(["tiny", "--out", str(root / "tiny"), "--groups", "8"]) == 0
    return root


# a reduced world base build: tiny sizes, two optimiser steps per part (seconds on a CPU)
def _tiny_world_base():
    from popalign.world import base as wb

    return wb.BaseTrainConfig(
        n_per_prompt=2,
        text_hidden=16,
        text_layers=1,
        unet_channels=(16, 32),
        attention_head_dim=(2, 4),
        vae_channels=(8, 8, 8),
        vae_steps=2,
        vae_batch=4,
        unet_steps=2,
        unet_batch=4,
        warmup_steps=1,
    )


TINY_WORLD_BASE = _tiny_world_base()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A reduced world base model, built once per session; tests that change files copy it first."""
    from popalign.world import base as wb

    return wb.build_base_model(
        tmp_path_factory.mktemp("base") / "model", config=TINY_WORLD_BASE, progress=False
    )


@pytest.fixture
def count_training(monkeypatch):
    """Counts calls of the world base's training stage (still running it)."""
    from popalign.world import base as wb

    calls = []
    real = wb._train

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(wb, "_train", counted)
    return calls


# ---------------------------------------------------------------- popalign evaluate
def world_shards(directory, seed: int = 0):
    """Two neutral prompts (doctor, chef) and one augmented prompt, 4 world images each."""
    from popalign.data.images import ImageShardWriter, encode_image
    from popalign.world import WorldSpec
    from popalign.world.render import render_batch

    spec = WorldSpec()
    rng = np.random.default_rng(seed)
    # (prompt id, kind, prompt, classes, occupation drawn, shirt classes, tone classes)
    plan = [
        ("p0000", "neutral", "a photo of a doctor", {}, 0, [0, 0, 0, 1], [0, 0, 1, 2]),
        ("p0001", "neutral", "a photo of a chef", {}, 2, [0, 1, 0, 1], [0, 1, 2, 0]),  # occupation wrong
        ("p0000-a0001", "augmented", "a photo of a red medium doctor", {"shirt": "red", "tone": "medium"}, 0,
         [0, 0, 1, 0], [1, 1, 1, 0]),
    ]  # fmt: skip
    assert spec.occupations[0] == "doctor" and spec.occupations[1] == "chef"
    with ImageShardWriter(directory) as writer:
        for pid, kind, prompt, classes, occ, shirt, tone in plan:
            images = render_batch(np.full(4, occ), {"shirt": np.array(shirt), "tone": np.array(tone)}, rng)
            samples = []
            for i, image in enumerate(images):
                meta = {"prompt_id": pid, "neutral_id": pid[:5], "kind": kind, "prompt": prompt, "classes": classes,
                        "seed": i, "height": 32, "width": 32}  # fmt: skip
                samples.append(encode_image(f"{pid}-{i:04d}", image, None, meta))
            writer.write_prompt(pid, samples)
    return directory


@pytest.fixture(scope="module")
def world_images(tmp_path_factory):
    """:func:`world_shards` in a folder of their own, for ``popalign evaluate --images``."""
    return world_shards(tmp_path_factory.mktemp("world") / "images")


@pytest.fixture
def prompt_files(tmp_path):
    """Neutral occupations and a generic prompt, as ``popalign evaluate`` reads them from files."""
    (tmp_path / "neutral.txt").write_text("doctor\nnurse\n")
    (tmp_path / "generic.txt").write_text("a person standing in a park\n")
    return tmp_path


@pytest.fixture(scope="session")
def other_base(tmp_path_factory):
    """A tiny pipeline of other sizes, and a LoRA trained for it (not for the test base)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from popalign.models.loading import add_lora
    from popalign.models.tiny import TinySDXLConfig, build_tiny_components, save_tiny_sdxl

    root = tmp_path_factory.mktemp("other")
    cfg = TinySDXLConfig(image_size=16, text_hidden=16, unet_channels=(16, 32), attention_head_dim=(2, 2))
    parts = build_tiny_components(cfg)
    save_tiny_sdxl(root / "model", components=parts)
    add_lora(parts["unet"], 2)
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=get_peft_model_state_dict(parts["unet"])
    )
    return root


class _TrainBatches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return make_batch(pairs=2, seed=i)


def _train_two_steps(base: str, root, **kw):
    """Two optimizer steps with a large learning rate (so the weights move), saving root/ckpt/last.ckpt."""
    import lightning as L

    from popalign.module import PopAlignModule
    from popalign.objectives import PopAlignLoss

    module = PopAlignModule(
        pretrained_model=base,
        objective=PopAlignLoss(beta=10.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        reference_dtype="float32",
        ema_decay=0.5,
        **kw,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_TrainBatches(), batch_size=None))
    return module, root / "ckpt" / "last.ckpt"


@pytest.fixture(scope="session")
def full_run(tiny_model, tmp_path_factory):
    """(module, last.ckpt) of two full fine-tuning steps of the tiny model, with EMA (export, card)."""
    return _train_two_steps(tiny_model, tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="session")
def lora_run(tiny_model, tmp_path_factory):
    """(module, last.ckpt) of two LoRA steps of the tiny model (rank 4, alpha 8), with EMA."""
    # alpha != rank, so a loader that ignored lora_alpha would sample different images
    return _train_two_steps(tiny_model, tmp_path_factory.mktemp("lora"), lora_rank=4, lora_alpha=8.0)
