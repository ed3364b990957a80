"""The model card `popalign export` writes: the run's config, the data summary and evaluation metrics
as tables, the base model's license and usage, and which run's config describes a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time

import yaml

from popalign.export import export_checkpoint
from popalign.model_card import (
    CardFacts,
    evaluation_table,
    flatten,
    markdown_table,
    render_model_card,
)

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def test_card_shows_an_evaluate_metrics_json_as_its_report_rows():
    # the shape `popalign evaluate` writes: a 129-line table of every leaf (prompt texts, notes,
    # intervals, per-prompt rows) before; now its scalar metrics beside the baseline and the delta
    metrics = {
        "metrics": {"neutral.num_images": 24, "neutral.discrepancy": 0.25, "neutral.discrepancy_ci": [0.2, 0.3],
                    "neutral.discrepancy_per_axis": {"shirt": 0.5}, "neutral.distribution": [0.5, 0.5], "fid": None},
        "baseline": {"neutral.num_images": 24, "neutral.discrepancy": 0.75, "neutral.discrepancy_ci": [0.7, 0.8],
                     "neutral.discrepancy_per_axis": {"shirt": 0.625}, "neutral.distribution": [1.0, 0.0], "fid": None},
        "per_prompt": [{"prompt_id": "p0000", "prompt": "a photo of a doctor", "discrepancy": 0.25}],
        "delta": {"neutral.discrepancy": -0.5},
        "settings": {"model": "m"},
        "notes": ["CLIP score skipped: no --clip-model given"],
    }  # fmt: skip
    assert evaluation_table(metrics).splitlines() == [
        "| metric | model | baseline | delta |",
        "| --- | --- | --- | --- |",
        "| neutral.num_images | 24 | 24 | – |",
        "| neutral.discrepancy | 0.25 | 0.75 | -0.5 |",
        "| neutral.discrepancy_per_axis.shirt | 0.5 | 0.625 | -0.125 |",
        "| fid | – | – | – |",
    ]
    del metrics["baseline"]
    assert evaluation_table(metrics).splitlines()[:3] == [
        "| metric | model |",
        "| --- | --- |",
        "| neutral.num_images | 24 |",
    ]


def test_model_card_reads_config_summary_and_metrics(full_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = shutil.copy(full_run[1], run / "checkpoints" / "last.ckpt")
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 750, "precision": "bf16-mixed"},
        "model": {
            "class_path": "popalign.module.PopAlignModule",
            "init_args": {
                "objective": {
                    "class_path": "popalign.objectives.PopAlignLoss",
                    "init_args": {"beta": 5000.0},
                },
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5.0e-7}},
            },
        },
        "data": {"train_shards": "data/shards", "pairs_per_group": 4},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # where LightningCLI writes it: the log dir
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps(
            {
                "axes": ["gender", "race"],
                "groups_written": 12,
                "shards": [f"shard-{i:06d}.tar" for i in range(20)],
                "prompts": {"neutral": 3, "skipped": [{"neutral_id": "n1"}, {"neutral_id": "n2"}]},
                "inputs": {"labels": "0123abcd"},
            }
        )
    )
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"neutral": {"discrepancy": 0.123456, "n": 400}, "fid": 21.5}))
    card = (
        export_checkpoint(ckpt, tmp_path / "out", data_summary=summary, metrics=metrics) / "README.md"
    ).read_text()
    for row in [
        "| objective | popalign.objectives.PopAlignLoss |",
        "| objective / beta | 5000 |",  # 5000.0 to 4 significant digits
        "| optimizer / lr | 5e-07 |",
        "| trainer / precision | bf16-mixed |",
        "| ema_decay | 0.5 |",
        "| optimizer steps | 2 |",
        "| axes | gender, race |",
        "| groups_written | 12 |",
        "| shards | 20 items |",  # long lists are counted, not listed
        "| prompts / neutral | 3 |",
        "| prompts / skipped | 2 entries |",
        "| neutral / discrepancy | 0.1235 |",  # 0.123456 -> 4 significant digits
        "| neutral / n | 400 |",
        "| fid | 21.5 |",
    ]:
        assert row in card, row
    assert "Aligned over: gender, race." in card and "0123abcd" not in card
    assert f'from_pretrained("{tmp_path / "out"}"' in card  # the usage snippet names the folder
    assert "see the base model's card for its license" in card
    # without a config the card says where the objective would come from, and uses the data module's args
    plain = (export_checkpoint(full_run[1], tmp_path / "plain") / "README.md").read_text()
    assert "pass --config" in plain and "## Evaluation" not in plain


def test_card_for_the_sdxl_hub_base():
    card = render_model_card(
        CardFacts(name="me/fair-sdxl", base=SDXL, kind="lora", hparams={"lora_rank": 16})
    )
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == SDXL and front["license"] == "openrail++"
    assert {"lora", "stable-diffusion-xl"} <= set(front["tags"])
    assert "CreativeML Open RAIL++-M" in card and "LoRA (rank 16, alpha 16) adapters" in card
    assert f'from_pretrained("{SDXL}"' in card and 'load_lora_weights("me/fair-sdxl")' in card
    other = render_model_card(CardFacts(name="x", base="someone/other-model", kind="full", pipeline=True))
    assert "license" not in yaml.safe_load(other.split("---")[1]) and "see the base model's card" in other


def test_flatten_and_table():
    rows = flatten({"a": {"b": 1, "c": [0.5, 0.25]}, "d": [{"e": True}], "f": None})
    assert rows == [("a / b", 1), ("a / c", [0.5, 0.25]), ("d / 0 / e", True), ("f", None)]
    assert markdown_table(rows[:1] + [("x|y", 2 / 3)]).splitlines() == [
        "| metric | value |",
        "| --- | --- |",
        "| a / b | 1 |",
        "| x\\|y | 0.6667 |",  # 2/3 to 4 significant digits, the pipe escaped
    ]


def test_run_config_is_found_where_lightning_writes_it(tmp_path):
    from popalign.model_card import find_run_config

    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert find_run_config(ckpt) == (None, None)
    logged = tmp_path / "runs" / "tiny" / "logs" / "version_0" / "config.yaml"  # configs/tiny.yaml's layout
    logged.parent.mkdir(parents=True)
    logged.write_text("seed_everything: 0\n")
    assert find_run_config(ckpt) == (logged, None)
    beside = ckpt.parent.parent / "config.yaml"  # the default layout: <log_dir>/checkpoints/
    beside.write_text("seed_everything: 1\n")
    assert find_run_config(ckpt) == (beside, None)


def _logged_config(run, version: int, objective: str, max_steps: int, age: float, **model) -> None:
    """``run/logs/version_<n>/config.yaml`` of a LightningCLI run, written ``age`` seconds ago."""
    path = run / "logs" / f"version_{version}" / "config.yaml"
    path.parent.mkdir(parents=True)
    init = {"objective": {"class_path": f"popalign.objectives.{objective}"}, **model}
    config = {"trainer": {"max_steps": max_steps}, "model": {"class_path": "x", "init_args": init}}
    path.write_text(yaml.safe_dump(config))
    os.utime(path, (time.time() - age, time.time() - age))


def test_card_describes_the_run_that_wrote_the_checkpoint(full_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = shutil.copy(full_run[1], run / "checkpoints" / "epoch=1-step=2.ckpt")  # global_step 2
    os.utime(ckpt, (time.time() - 100, time.time() - 100))

    def objective(name: str) -> str:
        card = export_checkpoint(ckpt, tmp_path / name, overwrite=True) / "README.md"
        return next(ln for ln in card.read_text().splitlines() if ln.startswith("| objective |"))

    _logged_config(run, 0, "DiffusionDPOLoss", max_steps=10, age=200)  # the run that wrote it
    _logged_config(run, 1, "SFTLoss", max_steps=10, age=50)  # a later run in the same folder
    _logged_config(run, 2, "KTOLoss", max_steps=1, age=150)  # stopped before step 2
    _logged_config(run, 3, "SFTLoss", max_steps=10, age=150, lora_rank=4)  # a LoRA run; this one is full
    assert objective("a") == "| objective | popalign.objectives.DiffusionDPOLoss |"

    _logged_config(run, 4, "SFTLoss", max_steps=10, age=120)  # could have written it too: no guess
    row = objective("b")
    assert "not known: 2 run configs could have written the checkpoint" in row and "--config" in row
    assert "DiffusionDPOLoss" not in row and "SFTLoss" not in row
