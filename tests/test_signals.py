"""SIGTERM (a scheduler's preemption, ``kill``, ``timeout``) stops a ``popalign`` stage the way Ctrl-C
does: its cleanup runs, one line, exit 143, and the same command resumes. Ctrl-C while ``train.py``
imports is one line too. (``popalign evaluate`` in a process of its own: tests/test_evaluate.py.)"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import GEN_FLAGS, N_IMAGES, run_cli

from popalign.data.images import iter_image_samples

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STOPPED = "popalign {}: stopped by SIGTERM; run the same command again to resume"


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler that fails the test (instead of ending pytest) should the command under test
    not answer SIGTERM itself; the previous handler is put back after the test."""

    def unanswered(signum, frame):
        raise AssertionError("SIGTERM reached the handler in place before the command")

    previous = signal.signal(signal.SIGTERM, unanswered)
    yield unanswered
    signal.signal(signal.SIGTERM, previous)


def sigterm_self() -> None:
    """A real SIGTERM to this process; the handler raises before the pause ends."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)


def test_sigterm_runs_the_stage_cleanup_and_exits_143(tmp_path, monkeypatch, capsys, sigterm_guard):
    from popalign.commands import tiny

    def preempted(args, model_dir, shard_dir):
        model_dir.mkdir()
        (model_dir / "unet.safetensors").write_bytes(b"half-written")
        sigterm_self()

    monkeypatch.setattr(tiny, "_write", preempted)
    code, _, err = run_cli(["tiny", "--out", tmp_path / "tiny"], capsys)
    assert (code, err.strip()) == (143, STOPPED.format("tiny"))
    assert list(tmp_path.iterdir()) == []  # no hidden .model.PID-....partial folder left
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the previous handler is back


def test_sigterm_stops_generate_on_lightning(table, tiny_model, tmp_path, monkeypatch, capsys, sigterm_guard):
    # several devices run generate through Lightning's predict, which answers the interruption with
    # sys.exit(1) after its own cleanup: still one line and 143, and the rerun completes
    from popalign.data import generate

    monkeypatch.setattr(generate, "generate", functools.partial(generate.generate, use_trainer=True))
    sample = generate.PromptSampler.__call__
    calls = []

    def preempted(self, todo, progress=None):
        calls.append(len(todo))
        if len(calls) == 2:  # after the first prompts' images, before the shard is complete
            sigterm_self()
        return sample(self, todo, progress)

    monkeypatch.setattr(generate.PromptSampler, "__call__", preempted)
    out = tmp_path / "images"
    args = ["generate", "--model", tiny_model, "--prompts", table, "--out", out, "--accelerator", "cpu"]
    code, _, err = run_cli([*args, *GEN_FLAGS], capsys)
    assert (code, err.strip().splitlines()[-1]) == (143, STOPPED.format("generate")), err
    assert not list(out.glob("*.tmp"))  # the unfinished shard is gone
    monkeypatch.setattr(generate.PromptSampler, "__call__", sample)
    code, stdout, _ = run_cli([*args, *GEN_FLAGS], capsys)
    assert code == 0 and len(list(iter_image_samples(out))) == 6 * N_IMAGES, stdout


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resume
def test_sigterm_during_the_demo_training_exits_143_and_the_demo_resumes(
    tiny_run, tmp_path, monkeypatch, capsys, sigterm_guard
):
    # Lightning's SIGTERM handler during fit calls the command's after its own: the step in progress
    # finishes and is saved (the command's handler raised inside it, and the demo lost the steps
    # since the last periodic checkpoint), and the rerun resumes from there
    from popalign import demo
    from popalign.module import PopAlignModule

    monkeypatch.chdir(tmp_path)
    model, shards = tiny_run / "tiny" / "model", tiny_run / "tiny" / "shards"
    monkeypatch.setattr(demo, "base_and_shards", lambda s, stage: (model, 2, 1.0, shards))
    exported = []
    monkeypatch.setattr(demo, "_cli", exported.append)
    metrics = dict.fromkeys(("neutral.discrepancy", "specific.accuracy", "adherence.accuracy", "fid"), 0.5)
    monkeypatch.setattr(demo, "evaluate_pair", lambda *a: {"metrics": metrics, "baseline": metrics})
    step = PopAlignModule.training_step

    def preempted(self, batch, batch_idx):
        if self.trainer.global_step == 2:  # after the first checkpoint (every 2 steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PopAlignModule, "training_step", preempted)
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--config", ROOT / "configs" / "tiny.yaml", "--train-steps", "4"]
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after an interruption
    try:
        code, _, err = run_cli([*args, "--no-progress"], capsys)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert (code, err.strip().splitlines()[-1]) == (143, STOPPED.format("demo")), err
    last = out / "train" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3 and not exported
    monkeypatch.setattr(PopAlignModule, "training_step", step)
    code, stdout, err = run_cli([*args, "--no-progress"], capsys)
    assert code == 0, err
    assert f"resuming the interrupted training from {last}" in stdout
    assert torch.load(last, weights_only=False)["global_step"] == 4 and exported[0][0] == "export"


def _torch_loaded(pid: int) -> bool:
    return "torch/lib/libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctrl_c_while_train_py_imports_is_one_line_and_130():
    # the imports take seconds, before cli_main can answer Ctrl-C: a traceback was printed
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "fit", "--help"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that started pytest in the background leaves SIGINT ignored, and its children with it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and not _torch_loaded(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # torch is loading: lightning and diffusers are still to come
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (130, "train.py: interrupted")


def test_an_interrupted_image_shard_is_dropped_without_a_stray_error(tmp_path, monkeypatch):
    # the tar stream, collected after its file was closed, printed "Exception ignored ... write to
    # closed file" after the one line of an interrupted generate
    import gc

    import numpy as np

    from popalign.data.images import ImageShardWriter, encode_image

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt), ImageShardWriter(tmp_path) as writer:
        writer.write_prompt("p0000", [encode_image("p0000-0000", np.zeros((8, 8, 3), np.uint8), None, {})])
        raise KeyboardInterrupt
    gc.collect()
    assert not unraisable and not list(tmp_path.glob("*.tar*"))


def test_sigterm_deferred_raises_only_while_not_deferred(sigterm_guard):
    from popalign.signals import Terminated, sigterm_deferred, sigterm_interrupts

    deferred = [False]
    with sigterm_interrupts():
        with sigterm_deferred(lambda: deferred[0]):
            with pytest.raises(Terminated):
                sigterm_self()  # before fit: at once, as in every stage
            deferred[0] = True  # Lightning's flag is set: the step goes on
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        with pytest.raises(Terminated):  # the stage's handler is back after the block
            sigterm_self()
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
    with sigterm_deferred(lambda: False):  # outside a stage it leaves the handler alone
        assert signal.getsignal(signal.SIGTERM) is sigterm_guard
