"""popalign export: round trips through stock diffusers loaders, EMA, the CLI and every refusal (the
model card it writes: tests/test_model_card.py)."""

from __future__ import annotations

import os
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_IMAGE, assert_usual_modes
from safetensors.torch import load_file

from popalign.cli import main
from popalign.errors import UserError
from popalign.export import FINGERPRINT_KEY, base_fingerprint, export_checkpoint
from popalign.model_card import read_mapping
from popalign.models.loading import LORA_WEIGHT_NAME, load_unet

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _pipe(path, **kw):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pipe("a photo of a doctor", num_inference_steps=2, height=32, width=32, num_images_per_prompt=2,
                   generator=gen, output_type="np")  # fmt: skip
    return out.images


@pytest.fixture(scope="module")
def base_images(tiny_model):
    return _sample(_pipe(tiny_model))


def _rewrite(ckpt, path, edit):
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def _refuses(match: str, named, **kw) -> str:
    with pytest.raises(UserError, match=match) as err:
        export_checkpoint(**kw)
    message = str(err.value)
    assert "\n" not in message and str(named) in message  # one line, naming the file
    return message


# ---------------------------------------------------------------- round trips
def test_full_pipeline_round_trip(full_run, tiny_model, base_images, tmp_path, umask_022):
    module, ckpt = full_run
    out = export_checkpoint(ckpt, tmp_path / "aligned", pipeline=True)
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    assert_usual_modes(out, umask_022)  # the weights too, which safetensors writes 0600
    exported = _sample(_pipe(out))
    np.testing.assert_allclose(exported, _sample(_pipe(tiny_model, unet=module.policy)), atol=1e-5)
    assert np.abs(exported - base_images).max() > 1e-2
    # the weights are the policy's, never the reference's (= the base)
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    policy, base = module.policy.state_dict(), load_unet(tiny_model).state_dict()
    assert saved.keys() == policy.keys()
    assert all(torch.equal(saved[k], policy[k]) for k in saved)
    assert not torch.equal(saved["conv_in.weight"], base["conv_in.weight"])
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "diffusers" and "popalign" in front["tags"]


def test_full_unet_only_in_bf16_ignores_reference_weights(full_run, tiny_model, tmp_path):
    module, ckpt = full_run
    base = load_unet(tiny_model).state_dict()

    def add_reference(state):  # an older checkpoint that still carried the frozen reference
        state["state_dict"].update({f"reference.{k}": v for k, v in base.items()})

    ckpt = _rewrite(ckpt, tmp_path / "with_ref.ckpt", add_reference)
    out = export_checkpoint(ckpt, tmp_path / "unet_only", dtype="bf16")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "unet"]
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    policy = module.policy.state_dict()
    assert all(
        saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], policy[k].bfloat16()) for k in saved
    )
    assert not torch.equal(saved["conv_in.weight"], base["conv_in.weight"].bfloat16())


def test_lora_round_trip_with_load_lora_weights(lora_run, tiny_model, base_images, tmp_path, umask_022):
    module, ckpt = lora_run
    out = export_checkpoint(ckpt, tmp_path / "lora")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", LORA_WEIGHT_NAME]
    assert_usual_modes(out, umask_022)
    pipe = _pipe(tiny_model)
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME)  # the tests run offline: docs/export.md
    exported = _sample(pipe)
    np.testing.assert_allclose(exported, _sample(_pipe(tiny_model, unet=module.policy)), atol=1e-5)
    assert np.abs(exported - base_images).max() > 1e-3


def test_lora_merged_pipeline_round_trip(lora_run, tiny_model, base_images, tmp_path):
    module, ckpt = lora_run
    out = export_checkpoint(ckpt, tmp_path / "merged", merge=True, pipeline=True)
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == load_unet(tiny_model).state_dict().keys()  # a plain UNet, no adapter modules
    exported = _sample(_pipe(out))
    np.testing.assert_allclose(exported, _sample(_pipe(tiny_model, unet=module.policy)), atol=1e-4)
    assert np.abs(exported - base_images).max() > 1e-3


# ---------------------------------------------------------------- EMA
def test_ema_export_full_and_lora(full_run, lora_run, tmp_path):
    module, ckpt = full_run
    saved = load_file(
        export_checkpoint(ckpt, tmp_path / "ema", ema=True) / "unet" / "diffusion_pytorch_model.safetensors"
    )
    avg = module.ema.state_by_name()
    assert saved.keys() == avg.keys() and all(torch.equal(saved[k], avg[k]) for k in saved)
    assert not torch.equal(saved["conv_in.weight"], module.policy.conv_in.weight.detach())

    module, ckpt = lora_run
    saved = load_file(export_checkpoint(ckpt, tmp_path / "lora_ema", ema=True) / LORA_WEIGHT_NAME)
    # diffusers names: unet.<module>.lora_A.weight; peft's: <module>.lora_A.default.weight
    avg = {f"unet.{k.replace('.default.', '.')}": v for k, v in module.ema.state_by_name().items()}
    assert saved.keys() == avg.keys() and all(torch.equal(saved[k], avg[k]) for k in saved)


def test_ema_asked_but_absent(full_run, tmp_path):
    def drop_ema(state):
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}

    ckpt = _rewrite(full_run[1], tmp_path / "no_ema.ckpt", drop_ema)
    _refuses("no EMA weights", ckpt, ckpt=ckpt, out=tmp_path / "out", ema=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- refusals
def test_unreadable_or_foreign_checkpoints(tmp_path):
    out = tmp_path / "out"
    _refuses("not found", tmp_path / "missing.ckpt", ckpt=tmp_path / "missing.ckpt", out=out)
    _refuses("is a folder", tmp_path, ckpt=tmp_path, out=out)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    _refuses("not a PyTorch checkpoint", text, ckpt=text, out=out)
    archive = tmp_path / "notes.zip"  # a zip archive, as torch.save writes, but not torch's
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "hello")
    _refuses("not a readable PyTorch checkpoint", archive, ckpt=archive, out=out)
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    _refuses("no 'state_dict'", weights, ckpt=weights, out=out)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    _refuses("not a popalign training checkpoint", other, ckpt=other, out=out)
    assert not out.exists()


def test_missing_base_and_base_override(full_run, tiny_model, tmp_path):
    def move_base(state):
        state["hyper_parameters"]["pretrained_model"] = str(tmp_path / "old_machine" / "model")

    ckpt = _rewrite(full_run[1], tmp_path / "moved.ckpt", move_base)
    _refuses("base model .* is not found", ckpt, ckpt=ckpt, out=tmp_path / "out")
    # a --base that is wrong is blamed as the flag, not as the checkpoint's record
    for wrong, problem in [(tmp_path / "typo", "is not found"), (tmp_path / "moved.ckpt", "is not a folder")]:
        message = _refuses(problem, wrong, ckpt=ckpt, out=tmp_path / "out", base=str(wrong))
        assert message.startswith(f"--base {wrong} {problem}; ") and "its base model" not in message
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    message = _refuses("no 'unet/' folder", empty, ckpt=ckpt, out=tmp_path / "out", base=str(empty))
    assert message.startswith(f"--base {empty}: ")
    moved = shutil.copytree(tiny_model, tmp_path / "new_machine" / "model")
    out = export_checkpoint(ckpt, tmp_path / "out", base=str(moved))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert f"`{moved}`" in (out / "README.md").read_text()


def test_relative_base_is_found_where_the_run_ran(full_run, tiny_model, tmp_path, monkeypatch):
    # the run ran in proj/ and recorded its base relative to it, as configs/*.yaml do
    proj = tmp_path / "proj"
    moved = shutil.copytree(tiny_model, proj / "runs" / "model")
    (proj / "runs" / "ckpt").mkdir()

    def ran_in_proj(state):
        state["hyper_parameters"]["pretrained_model"] = "runs/model"
        for saved in state["callbacks"].values():
            saved["dirpath"] = str(proj / "runs" / "ckpt")

    ckpt = _rewrite(full_run[1], proj / "runs" / "ckpt" / "last.ckpt", ran_in_proj)
    (tmp_path / "away").mkdir()
    away = _rewrite(full_run[1], tmp_path / "away" / "last.ckpt", ran_in_proj)
    monkeypatch.chdir(tmp_path)  # not the folder training ran in
    for path in (ckpt, away):  # beside the run's folders, or copied away (the recorded checkpoint folder)
        out = export_checkpoint(path, tmp_path / "out", overwrite=True)
        assert f"base model: `{moved}`" in (out / "README.md").read_text()


def test_missing_local_base_is_not_looked_up_on_the_hub(full_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for recorded in ("runs/nowhere/model", "./model", "~/nowhere/model"):
        ckpt = _rewrite(
            full_run[1],
            tmp_path / "gone.ckpt",
            lambda s, where=recorded: s["hyper_parameters"].__setitem__("pretrained_model", where),
        )
        message = _refuses("is not found .* pass --base", ckpt, ckpt=ckpt, out=tmp_path / "out")
        assert os.path.expanduser(recorded) in message


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    from popalign.models.tiny import TinySDXLConfig, save_tiny_sdxl

    root = tmp_path_factory.mktemp("bases")
    wider = save_tiny_sdxl(root / "wider", TinySDXLConfig(image_size=TINY_IMAGE, unet_channels=(32, 96)))
    reseeded = save_tiny_sdxl(root / "reseeded", TinySDXLConfig(image_size=TINY_IMAGE, seed=1))
    return str(wider), str(reseeded)


def test_lora_onto_a_different_base(lora_run, tiny_model, other_bases, tmp_path):
    wider, reseeded = other_bases
    ckpt = lora_run[1]
    # the module records its base's fingerprint, so a wider base is refused before shapes are compared
    _refuses("fingerprint .* pass --base", ckpt, ckpt=ckpt, out=tmp_path / "a", base=wider)
    # without a recorded fingerprint the adapter shapes still give the mismatch away
    unprinted = _rewrite(ckpt, tmp_path / "unprinted.ckpt", lambda s: s.pop(FINGERPRINT_KEY))
    _refuses("shape .* pass --base", unprinted, ckpt=unprinted, out=tmp_path / "a", base=wider)

    # same architecture, other weights: only a recorded fingerprint can tell
    fingerprint = base_fingerprint(load_unet(tiny_model))
    assert fingerprint != base_fingerprint(load_unet(reseeded))
    assert base_fingerprint(lora_run[0].policy) == fingerprint  # adapters do not change the base's print
    assert torch.load(ckpt, weights_only=True)[FINGERPRINT_KEY] == fingerprint
    ckpt = _rewrite(ckpt, tmp_path / "printed.ckpt", lambda s: s.__setitem__(FINGERPRINT_KEY, fingerprint))
    _refuses("fingerprint", ckpt, ckpt=ckpt, out=tmp_path / "b", base=reseeded)
    out = export_checkpoint(ckpt, tmp_path / "c")
    assert fingerprint in (out / "README.md").read_text()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_conflicting_options_and_existing_output(full_run, lora_run, tmp_path, umask_022):
    _refuses("--merge applies to LoRA", full_run[1], ckpt=full_run[1], out=tmp_path / "x", merge=True)
    _refuses("only with --merge", lora_run[1], ckpt=lora_run[1], out=tmp_path / "x", pipeline=True)
    # a folder that is not an earlier export is never replaced, --overwrite or not: the training run
    # holding the checkpoint (it was deleted with it), a base model, anyone's files; nor is a file
    taken, run, file = tmp_path / "taken", full_run[1].parents[1], tmp_path / "notes.txt"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    file.write_text("mine")
    for out in (taken, run, file):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        for overwrite in (False, True):
            _refuses("does not look like an export|is not a folder", out, ckpt=full_run[1], out=out,
                     overwrite=overwrite)  # fmt: skip
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (taken / "keep.txt").read_text() == "mine" and file.read_text() == "mine"

    out = export_checkpoint(full_run[1], tmp_path / "export")
    _refuses("already exists; pass --overwrite", out, ckpt=full_run[1], out=out)
    (out / "old.txt").write_text("from the earlier export")
    export_checkpoint(full_run[1], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "unet"]
    assert_usual_modes(out, umask_022)  # readable as any folder and file the user makes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    # an earlier export holding an input of this one (here the checkpoint) is not replaced either
    inside = out / "last.ckpt"
    shutil.copy(full_run[1], inside)
    _refuses("holds .*last.ckpt, which this export reads", out, ckpt=inside, out=out, overwrite=True)
    assert inside.is_file()


def test_out_below_a_file_is_one_line(full_run, tmp_path, capsys):
    log = tmp_path / "fit1.log"
    log.write_text("mine")
    assert main(["export", str(full_run[1]), "--out", str(log / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"popalign export: error: {log / 'sub'}: {log} is a file, not a folder"
    assert log.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["fit1.log"]


def test_missing_or_unexpected_weights_are_refused(full_run, tmp_path):
    # load_state_dict(strict=False) would keep the base's value for a missing weight: refused instead
    def drop(state):
        del state["state_dict"]["policy.conv_in.weight"]

    def add(state):
        state["state_dict"]["policy.bogus.weight"] = torch.zeros(3)

    missing = _rewrite(full_run[1], tmp_path / "missing.ckpt", drop)
    _refuses(r"\(1 missing, 0 unexpected, e\.g\. conv_in\.weight\); pass --base", missing, ckpt=missing,
             out=tmp_path / "a")  # fmt: skip
    extra = _rewrite(full_run[1], tmp_path / "extra.ckpt", add)
    _refuses(r"\(0 missing, 1 unexpected, e\.g\. bogus\.weight\); pass --base", extra, ckpt=extra,
             out=tmp_path / "b")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_frozen_base_weights_in_a_lora_checkpoint_are_the_bases(lora_run, tmp_path):
    # popalign's checkpoints leave LoRA's frozen base out; Lightning's DeepSpeed converter keeps it
    # (a ZeRO folder made one file): export took those weights for unexpected ones and refused
    module, ckpt = lora_run

    def with_base(state):
        for name, p in module.policy.named_parameters():
            if not p.requires_grad:
                state["state_dict"][f"policy.{name}"] = p.detach().clone()

    full = _rewrite(ckpt, tmp_path / "with_base.ckpt", with_base)
    lora = load_file(export_checkpoint(ckpt, tmp_path / "lora") / LORA_WEIGHT_NAME)
    from_full = load_file(export_checkpoint(full, tmp_path / "from_full") / LORA_WEIGHT_NAME)
    assert lora and from_full.keys() == lora.keys() and all(torch.equal(from_full[k], lora[k]) for k in lora)


def _damage_every_tensor(src, dst, fill: bytes = b"\xff"):
    """A copy of ``src`` whose stored tensor bytes are all ``fill`` (0xff: NaN as floats; 0x00: zeros,
    finite); the zip's CRCs stay."""
    shutil.copy(src, dst)
    with zipfile.ZipFile(dst) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
    with open(dst, "r+b") as f:
        for info in entries:
            f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            f.write(fill * info.file_size)
    return dst


def test_damaged_or_diverged_weights_are_not_exported(full_run, tmp_path):
    out = tmp_path / "out"
    # damage reading as NaN, and damage reading as finite numbers (wrong weights, exported silently
    # before the CRCs were checked)
    for fill in (b"\xff", b"\x00"):
        damaged = _damage_every_tensor(full_run[1], tmp_path / "damaged.ckpt", fill)
        _refuses(
            r"damaged: its member \S+/data/\S+ fails the archive's CRC check", damaged, ckpt=damaged, out=out
        )

    def diverge(state):  # NaN saved as such: the archive is intact
        state["state_dict"]["policy.conv_in.weight"][0] = float("nan")
        state["state_dict"]["ema.shadow.0"][0] = float("inf")

    diverged = _rewrite(full_run[1], tmp_path / "diverged.ckpt", diverge)
    _refuses(r": conv_in\.weight holds \d+ NaN/inf values", diverged, ckpt=diverged, out=out)
    _refuses(r"conv_in\.weight holds \d+ NaN/inf", diverged, ckpt=diverged, out=out, ema=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.ckpt", "diverged.ckpt"]


def test_failed_write_leaves_no_folder(full_run, tmp_path, monkeypatch):
    import popalign.export as export

    def broken_card(facts):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(full_run[1], tmp_path / "half")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_bad_card_inputs_name_the_file(full_run, tmp_path):
    broken = tmp_path / "metrics.json"
    broken.write_text("{oops")
    _refuses("not valid JSON", broken, ckpt=full_run[1], out=tmp_path / "o", metrics=broken)
    listed = tmp_path / "summary.json"
    listed.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a mapping"):
        read_mapping(listed)
    _refuses(
        "not found",
        tmp_path / "nope.yaml",
        ckpt=full_run[1],
        out=tmp_path / "o",
        config=tmp_path / "nope.yaml",
    )


def test_cli(full_run, lora_run, tmp_path, capsys):
    module, ckpt = full_run
    # the dtype names `popalign generate` and `evaluate` take work too (float16 = fp16)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "cli"), "--dtype", "float16"]) == 0
    assert (tmp_path / "cli" / "unet" / "config.json").is_file()
    saved = load_file(tmp_path / "cli" / "unet" / "diffusion_pytorch_model.safetensors")
    policy = module.policy.state_dict()
    assert saved.keys() == policy.keys()
    assert all(saved[k].dtype == torch.float16 and torch.equal(saved[k], policy[k].half()) for k in saved)
    # a LoRA's adapter tensors take --dtype too: the float32 export's values, cast
    assert main(["export", str(lora_run[1]), "--out", str(tmp_path / "lora16"), "--dtype", "bf16"]) == 0
    lora = load_file(tmp_path / "lora16" / LORA_WEIGHT_NAME)
    full = load_file(export_checkpoint(lora_run[1], tmp_path / "lora32") / LORA_WEIGHT_NAME)
    assert lora.keys() == full.keys() and full
    assert all(full[k].dtype == torch.float32 for k in full)
    assert all(lora[k].dtype == torch.bfloat16 and torch.equal(lora[k], full[k].bfloat16()) for k in lora)
    assert main(["export", str(tmp_path / "gone.ckpt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gone.ckpt" in err and err.startswith("popalign export: error:")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--dtype {fp32,float32,bf16,bfloat16,fp16,float16}" in capsys.readouterr().out


def test_failed_push_keeps_the_export_and_says_how_to_upload_it(full_run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    monkeypatch.setattr(HfApi, "upload_folder", offline)
    out = tmp_path / "aligned"
    argv = ["export", str(full_run[1]), "--out", str(out), "--push-to-hub", "me/x"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"popalign export: error: {out}: could not push to the hub repo me/x (offline); the export in {out} "
        f"is complete: upload just that folder later with `hf upload me/x {out}`"
    )
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "unet"]  # the whole export, kept
    assert "\n# me/x\n" in (out / "README.md").read_text()  # titled after the repo it is meant for
    assert main([*argv, "--overwrite", "--private"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"`hf upload me/x {out} --private`")
