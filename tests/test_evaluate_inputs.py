"""``popalign evaluate`` (and ``export``) flags and inputs: every flag explained in --help, and each bad
input refused in one line before any work: a LoRA for another base, a missing local model, an images
folder, a missing FID backend or reference."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from test_evaluate import run_evaluate, sampling_args

from popalign.evaluation.evaluate import Evaluator


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_help_explains_every_flag_and_states_each_default_once(command):
    import argparse

    from popalign.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    shown = {}
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        text = formatter._expand_help(action)
        assert "None" not in text and text.count("default") <= 1, text
        shown.update({flag: text for flag in action.option_strings})
    if command == "evaluate":  # the defaults that decide a run's cost are shown
        for flag, default in [("--dtype", "float32"), ("--images-per-prompt", "8"), ("--steps", "30"),
                              ("--guidance-scale", "5.0"), ("--height", "1024"), ("--width", "1024"),
                              ("--batch-size", "4")]:  # fmt: skip
            assert shown[flag].endswith(f"(default: {default})"), shown[flag]


def test_lora_for_another_base_is_one_line_naming_the_mismatch(
    tiny_model, prompt_files, other_base, tmp_path, capsys
):
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        argv = sampling_args(tiny_model, prompt_files, tmp_path / "eval") + [
            "--lora",
            str(other_base / "lora"),
        ]
        code, err = run_evaluate(argv, capsys)
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert code == 2 and not [m for m in records.messages if "size mismatch" in m], records.messages
    assert re.search(
        rf"error: {other_base / 'lora'}: does not fit the base model {tiny_model}: \S+lora_A\.weight is "
        r"\[\d+, \d+\] in it, \[\d+, \d+\] in the base's UNet$",
        err.strip().splitlines()[-1],
    ), err


def test_missing_local_model_paths_are_not_looked_up_on_the_hub(
    tiny_model, prompt_files, tmp_path, capsys, monkeypatch
):
    from popalign.errors import UserError
    from popalign.evaluation.config import EvalConfig

    monkeypatch.chdir(tmp_path)
    for flag, path in [("unet", "./nope"), ("lora", "exp/run/export"), ("model", str(tmp_path / "gone"))]:
        with pytest.raises(UserError, match=f"^{re.escape(path)}: --{flag} not found"):
            EvalConfig(**{"model": tiny_model, flag: path}).check()
    # a name that can be a hub id is tried there (offline in the tests), and the error says it is no folder
    code, err = run_evaluate(
        sampling_args(tiny_model, prompt_files, tmp_path / "e") + ["--unet", "exp/gone"], capsys
    )
    assert (
        code == 2 and "error: exp/gone: no such local folder; as a hub id: " in err.strip().splitlines()[-1]
    )


def test_images_folder_is_checked_before_the_classifier_is_loaded(tmp_path, capsys, monkeypatch):
    # the default labeler (CLIP) would first ask the hub for its weights: retries, minutes offline
    evaluate_module = sys.modules[Evaluator.__module__]

    def no_classifier(*args, **kwargs):
        raise AssertionError("the classifier was loaded before --images was checked")

    monkeypatch.setattr(evaluate_module, "build_classifier", no_classifier)
    (tmp_path / "notes").mkdir()
    for folder, message in [
        (tmp_path / "gone", "images folder not found"),
        (tmp_path / "notes", "no images-r"),
    ]:
        argv = [
            "evaluate",
            "--images",
            str(folder),
            "--axes",
            "gender",
            "--out",
            str(tmp_path / "e"),
            "--no-progress",
        ]
        code, err = run_evaluate(argv, capsys)
        assert code == 2 and err.strip().splitlines()[-1].startswith(
            f"popalign evaluate: error: {folder}: "
        ), err
        assert message in err, err


def test_fid_without_torch_fidelity_names_the_flag(tiny_model, prompt_files, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # as if torch-fidelity were missing
    np.save(tmp_path / "ref.npy", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    argv = sampling_args(tiny_model, prompt_files, tmp_path / "eval") + [
        "--fid-reference",
        str(tmp_path / "ref.npy"),
    ]
    code, err = run_evaluate(argv, capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "pass --fid-features pixel" in line and "feature_extractor" not in line, err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("features", ["inception", "pixel"])
@pytest.mark.parametrize(
    ("reference", "message"), [("nope.npy", "--fid-reference not found"), ("notes.txt", "not a .npy array")]
)
def test_bad_fid_reference_is_reported_first_naming_the_file(
    reference, message, features, tiny_model, prompt_files, tmp_path, capsys, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", None)  # inception features cannot load
    (tmp_path / "notes.txt").write_text("not an array\n")
    path = tmp_path / "runs" / reference if reference == "nope.npy" else tmp_path / reference
    argv = sampling_args(tiny_model, prompt_files, tmp_path / "eval") + [
        "--fid-reference", str(path), "--fid-features", features,
    ]  # fmt: skip
    code, err = run_evaluate(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith(f"popalign evaluate: error: {path}: {message}"), err
    assert "torch-fidelity" not in err and "pickle" not in err
    assert not (tmp_path / "eval").exists()
