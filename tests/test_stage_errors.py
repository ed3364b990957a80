"""Bad input to generate, label and build: one line on stderr, exit 2, and nothing that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEN_FLAGS, run_cli
from conftest import cli_fails as fails

from popalign.data.axes import load_axes
from popalign.data.images import ImageShardWriter, encode_image
from popalign.data.prompts import expand_prompts, write_prompt_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(generated, labels, table, tmp_path) -> dict:
    """Writable copies of the generated images, labels and prompt table."""
    shutil.copytree(generated, tmp_path / "images")
    shutil.copy(labels, tmp_path / "labels.jsonl")
    shutil.copy(table, tmp_path / "prompts.jsonl")
    return {
        k: tmp_path / n
        for k, n in (("images", "images"), ("labels", "labels.jsonl"), ("prompts", "prompts.jsonl"))
    }


def build_args(inputs: dict, model: str, out: Path) -> list:
    args = ["build", "--model", model, "--out", out, "--population-size", 2, "--groups-per-prompt", 1]
    return args + [x for k in ("images", "labels", "prompts") for x in (f"--{k}", inputs[k])]


def nothing_built(out: Path) -> bool:
    return not (out / "summary.json").exists() and not list(out.glob("*.tar"))


def test_bad_prompt_tables_and_labels(inputs, tiny_model, tmp_path, capsys):
    out = tmp_path / "shards"
    rows = inputs["prompts"].read_text().splitlines()
    inputs["prompts"].write_text("\n".join(rows[:2] + [rows[2].replace('"classes"', '"klasses"')] + rows[3:]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['prompts']}:3", "missing key(s) classes")
    fails(
        ["generate", "--model", tiny_model, "--prompts", inputs["prompts"], "--out", tmp_path / "g"],
        capsys,
        "prompts.jsonl:3",
    )
    inputs["prompts"].write_text("\n".join(rows))
    good = inputs["labels"].read_text().splitlines()
    inputs["labels"].write_text("\n".join([good[0].replace('"labels"', '"labelz"'), *good[1:]]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['labels']}:1", "missing key(s) labels")
    inputs["labels"].write_text("\n".join(good[:-1]))  # one image without a label
    fails(
        build_args(inputs, tiny_model, out), capsys, str(inputs["labels"]), "no label for", "p0001-a0001-0003"
    )
    extra = good[0].replace("p0000-0000", "p0000-0042")
    inputs["labels"].write_text("\n".join([*good, extra]))  # a label for an image that is not there
    fails(build_args(inputs, tiny_model, out), capsys, "1 labelled images are not in", "p0000-0042")
    inputs["labels"].write_text("\n".join([good[0].replace('"male"', '"martian"'), *good[1:]]))
    fails(build_args(inputs, tiny_model, out), capsys, f"{inputs['labels']}:1", "'martian' is not a class")
    assert nothing_built(out)


def test_bad_image_shards(inputs, tiny_model, oracle, tmp_path, capsys):
    out, labels_out = tmp_path / "shards", tmp_path / "new_labels.jsonl"
    # an image of another size than the rest (and than the latents the model gives)
    with ImageShardWriter(inputs["images"], rank=1) as writer:
        meta = {
            "prompt_id": "p0000",
            "kind": "neutral",
            "prompt": "a photo of a doctor",
            "seed": 0,
            "height": 24,
            "width": 24,
        }
        writer.write_prompt(
            "p0000", [encode_image("p0000-0099", np.zeros((24, 24, 3), np.uint8), None, meta)]
        )
    row = json.loads(inputs["labels"].read_text().splitlines()[0])
    with open(inputs["labels"], "a") as f:
        row = {k: v for k, v in row.items() if k != "image_sha1"}  # a row of an older popalign
        f.write(json.dumps({**row, "key": "p0000-0099"}) + "\n")
    fails(
        build_args(inputs, tiny_model, out),
        capsys,
        "images-r1-000000.tar",
        "p0000-0099",
        "24x24, expected 16x16",
    )
    (inputs["images"] / "images-r1-000000.tar").unlink()
    # a shard cut short (a copy interrupted mid-file)
    shard = inputs["images"] / "images-r0-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    label = [
        "label",
        "--images",
        inputs["images"],
        "--axes",
        "gender",
        *oracle,
        "--out",
        labels_out,
        "--no-progress",
    ]
    fails(label, capsys, str(shard), "truncated")
    assert not labels_out.exists()  # only the .partial, never a table that looks complete
    fails(build_args(inputs, tiny_model, out), capsys, str(shard), "truncated")
    shard.write_bytes(b"not a tar file at all" * 100)
    fails(build_args(inputs, tiny_model, out), capsys, str(shard))

    def label_args(images):
        return ["label", "--images", images, "--axes", "gender", "--classifier", "world", "--out", labels_out]

    fails(label_args(tmp_path / "nowhere"), capsys, "nowhere")
    fails(label_args(inputs["images"]), capsys, "not a world axis")
    assert nothing_built(out)


def test_model_folder_missing_a_component(inputs, tiny_model, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "text_encoder_2")
    out = tmp_path / "shards"
    fails(build_args(inputs, str(broken), out), capsys, str(broken), "no 'text_encoder_2/' folder")
    assert nothing_built(out)
    fails(
        [
            "generate",
            "--model",
            broken,
            "--prompts",
            inputs["prompts"],
            "--out",
            tmp_path / "g",
            "--no-progress",
        ],
        capsys,
        "text_encoder_2",
    )
    assert not (tmp_path / "g").exists()  # nothing recorded for a model that did not load
    fails(build_args(inputs, str(tmp_path / "no" / "such" / "model"), out), capsys, "model folder not found")


def generate_args(model, prompts, out, *extra) -> list:
    return ["generate", "--model", model, "--prompts", prompts, "--out", out, *GEN_FLAGS, *extra]


def test_generate_refuses_images_of_another_prompt_table(generated, tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(generated, images)
    # the same ids (p0000, p0000-a0000, ...) for other prompts
    rows = expand_prompts(
        ["a photo of a {identity} engineer", "a photo of a {identity} nurse"], load_axes(["gender"])
    )
    other = write_prompt_table(rows, tmp_path / "other.jsonl")
    needles = (
        "images-r0-000000.tar",
        "'p0000'",
        "'a photo of a doctor'",
        "'a photo of an engineer'",
        str(other),
    )
    fails(generate_args(tiny_model, other, images), capsys, *needles)
    # done records of an older popalign (no prompt texts): the shards themselves are read
    done = images / "done-r0.jsonl"
    records = [json.loads(line) for line in done.read_text().splitlines()]
    done.write_text("".join(json.dumps({k: r[k] for k in ("shard", "prompt_ids")}) + "\n" for r in records))
    fails(generate_args(tiny_model, other, images), capsys, *needles)
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in generated.iterdir())


def test_generate_flags_and_folders_fail_before_anything_is_written(table, tiny_model, tmp_path, capsys):
    out = tmp_path / "images"
    fails(generate_args(tmp_path / "modle", table, out), capsys, "modle", "model folder not found")
    assert not out.exists()  # no generate.json recording the typo: the corrected command just runs
    for flag in ("--batch-size", "--shard-size", "--devices", "--num-nodes"):
        fails(generate_args(tiny_model, table, out, flag, 0), capsys, f"{flag} must be >= 1, got 0")
    # NaN guidance recorded null / NaN (invalid JSON); missing folders were looked up on the hub
    fails(generate_args(tiny_model, table, out, "--guidance-scale", "nan"), capsys, "must be a finite number")
    for flag in ("--vae", "--unet", "--lora"):
        fails(
            generate_args(tiny_model, table, out, flag, "./nowhere"), capsys, f"./nowhere: {flag} not found"
        )
    # another component's folder: diffusers' page of unused weights and "Cannot copy out of meta tensor"
    for flag, given, found, wanted in (("--unet", "vae", "AutoencoderKL", "UNet2DConditionModel"),
                                       ("--vae", "unet", "UNet2DConditionModel", "AutoencoderKL")):  # fmt: skip
        fails(generate_args(tiny_model, table, out, flag, Path(tiny_model) / given), capsys,
              f"{given}/config.json: the config of {found}, not of the {wanted} that {flag} takes")  # fmt: skip
    assert not out.exists()
    (tmp_path / "afile").write_text("x")
    fails(generate_args(tiny_model, table, tmp_path / "afile"), capsys, "afile", "not a folder")


def test_build_refuses_images_of_another_prompt_table(inputs, tiny_model, tmp_path, capsys):
    rows = expand_prompts(
        ["a photo of a {identity} engineer", "a photo of a {identity} nurse"], load_axes(["gender"])
    )
    write_prompt_table(rows, inputs["prompts"])  # the same ids for other prompts
    out = tmp_path / "shards"
    fails(
        build_args(inputs, tiny_model, out),
        capsys,
        "images-r0-000000.tar: sample 'p0000-0000'",
        "'p0000'",
        "'a photo of a doctor'",
        "'a photo of an engineer'",
        str(inputs["prompts"]),
    )
    assert nothing_built(out)


def test_build_keeps_previous_shards_and_refuses_foreign_ones(inputs, tiny_model, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run_cli(build_args(inputs, tiny_model, out), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "shard-000000.tar" in before and "summary.json" in before
    # a run that builds nothing fails and leaves the good shards as they were
    fails([*build_args(inputs, tiny_model, out), "--population-size", 100], capsys, "no group could be built")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # shards no build wrote (another tool's, or a copy) are not deleted but refused
    (out / "shard-000007.tar").write_bytes(b"someone else's shard")
    fails([*build_args(inputs, tiny_model, out), "--seed", 1], capsys, "shard-000007.tar", "did not write")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"someone else's shard")
    fails(build_args(inputs, tiny_model, foreign), capsys, "shard-000000.tar", "did not write")
    assert (foreign / "shard-000000.tar").read_bytes() == b"someone else's shard"
    # a damaged summary.json cannot vouch for the shards beside it: said so, nothing deleted
    for damage in ("{not json", "[1, 2]"):
        (out / "summary.json").write_text(damage)
        fails(build_args(inputs, tiny_model, out), capsys, "shard-000000.tar", "summary.json is ")
    assert (out / "shard-000000.tar").read_bytes() == before["shard-000000.tar"]
    # missing labels: one line, not a traceback
    inputs["labels"].unlink()
    fails(build_args(inputs, tiny_model, tmp_path / "o1"), capsys, str(inputs["labels"]), "cannot read")


def test_device_out_and_option_mistakes_are_one_line(inputs, tiny_model, tmp_path, capsys):
    # each was a traceback: torch's device parser, a folder made below a file, YAML's parser
    out = tmp_path / "shards"
    fails(
        [*build_args(inputs, tiny_model, out), "--device", "foo"], capsys, "--device 'foo': Expected one of"
    )
    if not torch.cuda.is_available():
        fails([*build_args(inputs, tiny_model, out), "--device", "cuda"], capsys, "CUDA is not available")
        fails(["evaluate", "--model", tiny_model, "--out", tmp_path / "ev", "--device", "cuda"], capsys,
              "--device 'cuda': CUDA is not available")  # fmt: skip
    afile = tmp_path / "afile"
    afile.write_text("x")
    fails(build_args(inputs, tiny_model, afile / "shards"), capsys, f"{afile} is a file, not a folder")
    label = ["label", "--images", inputs["images"], "--axes", "gender", "--out", tmp_path / "l.jsonl"]
    fails(
        [*label, "--classifier-option", "foo=[1,"],
        capsys,
        "--classifier-option 'foo=[1,': the value is not YAML",
    )
    # a missing local folder was looked up on the hub ("Repo id must use alphanumeric chars")
    fails([*label, "--classifier", "clip", "--classifier-model", "./noclip"], capsys,
          "./noclip: --classifier-model not found")  # fmt: skip
    fails(["evaluate", "--model", tiny_model, "--out", tmp_path / "ev", "--guidance-scale", "nan"], capsys,
          "--guidance-scale must be a finite number, got nan")  # fmt: skip
    assert nothing_built(out) and afile.read_text() == "x" and not (tmp_path / "ev").exists()


def test_build_help_shows_no_default_for_an_off_switch(capsys):
    with pytest.raises(SystemExit):
        run_cli(["build", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-source-embeds" in text and "(default: True)" not in text


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        run_cli(["--version"], capsys)
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"popalign {version('popalign')}"


def test_ctrl_c_prints_one_line_and_exits_130(table, tiny_model, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("popalign.data.generate.load_pipeline", interrupted)
    code, _, err = run_cli(generate_args(tiny_model, table, tmp_path / "g"), capsys)
    assert (
        code == 130 and err.strip() == "popalign generate: interrupted; run the same command again to resume"
    )


def test_a_hub_that_cannot_be_reached_is_named_as_such():
    # diffusers reports an unreachable, uncached hub id as a file the repository "does not appear to
    # have"; the cause chain says what happened
    from huggingface_hub.utils import LocalEntryNotFoundError

    from popalign.errors import load_reason

    try:
        try:
            try:
                raise ConnectionError("[Errno -2] Name or service not known.")
            except ConnectionError as network:
                raise LocalEntryNotFoundError(
                    "cannot find the requested files in the local cache"
                ) from network
        except LocalEntryNotFoundError:
            raise OSError("org/model does not appear to have a file named config.json.") from None
    except OSError as err:
        assert err.__context__ is not None  # `from None` hides it from tracebacks, not from the chain
        reason = load_reason(err)
    assert reason == (
        "not in the local cache, and the hub could not be reached: [Errno -2] Name or service not known; "
        "pass a local folder, or run once where the hub is reachable to cache it"
    )
    assert load_reason(OSError("org/model is not a valid model identifier\nsecond line")) == (
        "org/model is not a valid model identifier"
    )
