"""``popalign evaluate``'s output folder: bad input leaves no report, ``--overwrite`` replaces only an
evaluation output, SIGTERM and killed runs leave no stage folder behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import world_shards
from test_evaluate import WORLD_AXES, run_evaluate, sampling_args


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "0.5", "0.6"], "sum to 1"),
        (["--target", "0.2", "0.3", "0.5"], "2 joint classes"),
        (["--classifier", "test_evaluate:BadClassifier"], "unknown class label"),
        (["--neutral", "EMPTY"], "no prompts"),
        (["--unet", "OTHER/model"], "cross_attention_dim"),
        (["--lora", "OTHER/lora"], "does not fit"),
        (["--fid-reference", "BADREF", "--fid-features", "pixel"], "uint8"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_report(
    extra, message, tiny_model, prompt_files, other_base, tmp_path, capsys
):
    (tmp_path / "empty.txt").write_text("# nothing\n")
    np.save(tmp_path / "bad.npy", np.zeros((4, 16, 16, 3), dtype=np.float32))
    swap = {"EMPTY": str(tmp_path / "empty.txt"), "BADREF": str(tmp_path / "bad.npy")}
    extra = [swap.get(a, a.replace("OTHER", str(other_base))) for a in extra]
    out = tmp_path / "eval"
    args = sampling_args(tiny_model, prompt_files, out)
    args = args[:3] + args[5:] if "--neutral" in extra else args  # one --neutral only
    code, err = run_evaluate(args + extra, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("popalign evaluate: error:"), err
    assert message in err.strip().splitlines()[-1], err
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


def test_existing_output_needs_overwrite(tiny_model, prompt_files, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, err = run_evaluate(sampling_args(tiny_model, prompt_files, out), capsys)
    assert code == 2 and "--overwrite" in err and (out / "old.txt").exists()


def _tree(folder) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_overwrite_replaces_only_an_evaluation_output(world_images, tmp_path, capsys):
    def evaluate(out):
        argv = ["evaluate", "--images", str(world_images), "--axes", *WORLD_AXES, "--classifier", "world",
                "--bootstrap", "20", "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
        return run_evaluate(argv, capsys)

    # a folder of popalign generate's image shards, and folders that only share a file name with a report
    shards = world_shards(tmp_path / "shards")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("# my notes\n")
    (notes / "metrics.json").write_text(json.dumps({"fid": 1.0}))
    for folder in (shards, notes):
        before = _tree(folder)
        code, err = evaluate(folder)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.strip().startswith(
            f"popalign evaluate: error: {folder}: does not look like an evaluation output"
        )
        assert _tree(folder) == before and not list(tmp_path.glob(f".{folder.name}*"))
    # an empty folder, and an earlier evaluation output (whose stray files go with it), are replaced
    out = tmp_path / "eval"
    out.mkdir()
    code, err = evaluate(out)
    assert code == 0, err
    first = json.loads((out / "metrics.json").read_text())
    (out / "images" / "stale.png").write_bytes(b"old")
    code, err = evaluate(out)
    assert code == 0, err
    assert not (out / "images" / "stale.png").exists() and len(list((out / "images").glob("*.png"))) == 12
    assert json.loads((out / "metrics.json").read_text()) == first


SLEEPY = '''
import time
from pathlib import Path

from popalign.data.classifiers import AttributeClassifier


class Sleepy(AttributeClassifier):
    """Marks that it has started (a file beside this module), then sleeps: a run to stop."""

    def classify(self, images):
        (Path(__file__).parent / "classifying").touch()
        time.sleep(60)
'''


def test_sigterm_stops_evaluate_with_one_line_and_no_stage_folder(world_images, tmp_path):
    # a scheduler's SIGTERM ended Python at once: the hidden stage folder .eval.tmp-PID stayed
    (tmp_path / "sleepy.py").write_text(SLEEPY)
    out = tmp_path / "eval"
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "popalign", "evaluate", "--images", str(world_images), "--axes", *WORLD_AXES,
            "--classifier", "sleepy:Sleepy", "--bootstrap", "20", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not (tmp_path / "classifying").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (tmp_path / f".eval.tmp-{proc.pid}").is_dir()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # only when a failed check left it running
    stopped = "popalign evaluate: stopped by SIGTERM; run the same command again to resume"
    assert (proc.returncode, err.strip()) == (143, stopped)
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


def test_the_stage_folders_of_killed_runs_are_removed(world_images, tmp_path, capsys):
    # a run killed without a chance to clean up (SIGKILL, a power loss) left .eval.tmp-PID for good
    dead = 2**22 + 1  # above Linux's largest process id: never running
    live = os.getppid()
    kept = [f".eval.tmp-{live}", f".eval.tmp-{dead}.x", f".evaluation.tmp-{dead}", f".eval.tmp-{dead}x"]
    for name in [f".eval.tmp-{dead}", *kept]:
        (tmp_path / name / "images").mkdir(parents=True)
    argv = ["evaluate", "--images", str(world_images), "--axes", *WORLD_AXES, "--classifier", "world",
            "--bootstrap", "20", "--out", str(tmp_path / "eval"), "--no-progress"]  # fmt: skip
    code, err = run_evaluate(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval", *kept])
