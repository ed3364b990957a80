"""FairnessValidation: sampling the live policy during a short Trainer.fit and logging discrepancy."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from conftest import torch_threads
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from torch.utils.data import DataLoader, Dataset

from popalign.data.classifiers import AttributeClassifier
from popalign.errors import UserError
from popalign.evaluation.validation import FairnessValidation
from popalign.module import PopAlignModule
from popalign.objectives import PopAlignLoss

PROMPTS = ["a photo of a doctor", "a photo of a nurse"]


class MeanClassifier(AttributeClassifier):
    """Test plugin: class = (mean pixel value) mod C; the grid of a random tiny model is arbitrary."""

    def classify(self, images):
        m = images.reshape(len(images), -1).mean(1).astype(np.int64)
        return {a.name: m % a.num_classes for a in self.axes}


class SumClassifier(AttributeClassifier):
    """Test plugin: class = (pixel sum) mod C, unknown when the sum is a multiple of 7: spreads the
    images of one prompt over the classes, so per-prompt and pooled discrepancy differ."""

    def classify(self, images):
        s = images.reshape(len(images), -1).astype(np.int64).sum(1)
        return {a.name: np.where(s % 7 == 0, -1, s % a.num_classes) for a in self.axes}


class _Batches(Dataset):
    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return self.make(pairs=1, seed=i)


class _ModeProbe(L.Callback):
    """Records the policy's train mode at the start of every batch."""

    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.policy.training)


def _callback(**kw):
    args = dict(prompts=PROMPTS, axes=["gender"], classifier="test_validation:MeanClassifier",
                images_per_prompt=2, steps=2, height=16, width=16, every_n_steps=2)  # fmt: skip
    return FairnessValidation(**(args | kw))


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the pixel sums SumClassifier reads move by a unit with the
    summation order of more threads, and the thread count a pytest worker has depends on the tests
    it ran before (some set it)."""
    with torch_threads(1):
        yield


def test_logs_discrepancy_during_fit(tiny_model, batch_factory, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the run's seed fixes the training noise (drawn from the seed, the rank and the batch index), so
    # the step-3 weights and with them the label mix the checks below rely on: seed 3 gives an unknown
    # image and two prompts whose distributions differ (seed 0 gives no unknown); both are asserted,
    # so a change of the draws fails here, not silently
    L.seed_everything(3)
    module = PopAlignModule(tiny_model, objective=PopAlignLoss(beta=10.0))
    module.policy.train()  # Lightning keeps each submodule's mode; the callback must too
    fair = _callback(images_per_prompt=3, guidance_scale=1.0, classifier="test_validation:SumClassifier")
    probe = _ModeProbe()
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[fair, probe], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_Batches(batch_factory), batch_size=None))
    # at step 2 (every_n_steps) and at the end (step 3); the policy trains between the two
    assert fair.last_step == 3 and probe.modes == [True, True, True]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    steps = [e.step for e in events.Scalars("val_fair/discrepancy")]
    assert steps == [2, 3]
    assert {"val_fair/samples", "val_fair/distributions"} <= set(events.Tags()["images"])

    # by hand, from the labels of the same images: the seeds are fixed, the weights are step 3's
    groups, labels, _ = fair.sample_and_label(trainer, module)
    groups, labels = np.array(groups), labels[:, 0]  # one axis (gender: 2 classes), so joint == gender
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]
    known = labels >= 0
    per_prompt = []
    for j in range(len(PROMPTS)):
        counts = np.bincount(labels[(groups == j) & known], minlength=2)
        per_prompt.append(np.linalg.norm(counts / counts.sum() - 0.5))
    pooled = np.bincount(labels[known], minlength=2)
    expected = {
        "val_fair/discrepancy": np.mean(per_prompt),
        "val_fair/discrepancy_pooled": np.linalg.norm(pooled / pooled.sum() - 0.5),
        "val_fair/discrepancy_gender": np.mean(per_prompt),
        "val_fair/unknown_rate": 1 - known.mean(),
    }
    # the prompts' distributions differ, so the per-prompt mean is not the pooled value; one image is unknown
    assert expected["val_fair/discrepancy"] != pytest.approx(expected["val_fair/discrepancy_pooled"])
    assert expected["val_fair/unknown_rate"] > 0
    for tag, value in expected.items():
        assert float(trainer.callback_metrics[tag]) == pytest.approx(value, abs=1e-6), tag
        (last,) = [e.value for e in events.Scalars(tag) if e.step == 3]
        assert last == pytest.approx(value, abs=1e-6), tag


def test_fixed_seeds_and_restored_mode(tiny_model):
    module = PopAlignModule(tiny_model, objective=PopAlignLoss(beta=10.0))
    trainer = SimpleNamespace(global_rank=0, world_size=1, precision_plugin=Precision(), global_step=0)
    fair = _callback(images_per_prompt=2)
    fair.setup(trainer, module, "fit")
    seen = []
    module.policy.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    module.policy.train()
    groups, labels, images = fair.sample_and_label(trainer, module)
    assert seen and not any(seen) and module.policy.training  # sampled in eval mode, train mode restored
    assert groups == [0, 0, 1, 1] and labels.shape == (4, 1) and images.shape == (4, 16, 16, 3)
    _, labels2, images2 = fair.sample_and_label(trainer, module)
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)
    # a second rank takes every other prompt
    _, _, other = fair.sample_and_label(
        SimpleNamespace(**(vars(trainer) | {"global_rank": 1, "world_size": 2})), module
    )
    assert np.array_equal(other, images[2:])


def test_bad_arguments():
    with pytest.raises(UserError, match="every_n_steps"):
        _callback(every_n_steps=0)
    with pytest.raises(UserError, match="multiples of 8"):
        _callback(height=20)
    with pytest.raises(UserError, match="unknown axis"):
        _callback(axes=["nonsense"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        pytest.param(  # ZeRO-2 splits gradients and optimizer state; every rank holds whole weights
            "zero2",
            marks=[
                pytest.mark.deepspeed,
                pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
            ],
        ),
    ],
)
def test_two_processes_log_what_one_process_logs(tiny_run, strategy):
    """Under DDP (or ZeRO-2) each rank samples every second prompt (3 prompts: 2 and 1) and the
    per-prompt counts are gathered: with the weights held still (lr 0) two processes must log the
    single process's numbers, and neither may hang on the uneven split."""
    from launch import deepspeed, finished_run, fit_tiny
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    still = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}
    callback = {
        "class_path": "popalign.evaluation.validation.FairnessValidation",
        "init_args": dict(prompts=[*PROMPTS, "a photo of a chef"], axes=["gender"], images_per_prompt=3,
                          classifier="test_validation:SumClassifier", steps=2, height=16, width=16,
                          every_n_steps=2),
    }  # fmt: skip
    logged = {}
    for devices, chosen in ((1, "ddp"), (2, deepspeed(2) if strategy == "zero2" else "ddp")):
        name = f"fair_{strategy}_{devices}"
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(tiny_run / name), "name": "logs", "version": 0},
        }
        proc = fit_tiny(
            tiny_run, name, chosen, "float32", 2, devices=devices, optimizer=still, logger=logger,
            callbacks=[callback],
        )  # fmt: skip
        facts, _ = finished_run(proc, tiny_run, name)
        assert facts["world_size"] == devices
        events = EventAccumulator(str(tiny_run / name / "logs" / "version_0"), size_guidance={"scalars": 0})
        events.Reload()
        tags = [t for t in events.Tags()["scalars"] if t.startswith("val_fair/")]
        logged[devices] = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}
    assert "val_fair/discrepancy" in logged[1] and logged[1]["val_fair/discrepancy"][0][0] == 2
    assert logged[2].keys() == logged[1].keys()
    for tag, values in logged[1].items():
        assert [s for s, _ in logged[2][tag]] == [s for s, _ in values], tag
        assert [v for _, v in logged[2][tag]] == pytest.approx([v for _, v in values], abs=1e-6), tag
