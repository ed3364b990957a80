"""`train.py fit` of configs/tiny.yaml in a subprocess, several processes when asked, for the
strategy tests (tests/test_strategies.py on CPU, tests/test_gpu.py on a GPU). The run's facts and
final policy come back through ``cpu_strategies.DumpPolicy``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
TIMEOUT_S = 300  # a deadlocked collective shows up as a timeout, not a hang of the suite
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e-3}}

# a persistence threshold of 0 partitions every weight: by default ZeRO-3 keeps weights under 1e5
# elements whole on every rank, which is all of the tiny UNet's, and nothing would be partitioned
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
CPU = {"device": "cpu"}
ZERO = {  # a strategy's init_args; a config replaces Lightning's defaults
    2: {"stage": 2},
    3: {"config": {"zero_optimization": ZERO3, "zero_allow_untested_optimizer": True}},
    # offloaded, with the test's torch SGD, which offloading takes only when told to (a user is told
    # to use DeepSpeedCPUAdam: test_offload_takes_deepspeeds_cpu_optimizers_or_says_what_to_set)
    "2-offload": {"config": {"zero_optimization": {"stage": 2, "offload_optimizer": CPU},
                             "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}},
    "3-offload": {"config": {"zero_optimization": ZERO3 | {"offload_optimizer": CPU, "offload_param": CPU},
                             "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}},
}  # fmt: skip


def deepspeed(zero: int | str) -> dict:
    """Lightning's DeepSpeed strategy on gloo CPU processes, ``ZERO[zero]`` its arguments."""
    return {
        "class_path": "cpu_strategies.CPUDeepSpeedStrategy",
        "init_args": {"process_group_backend": "gloo", **ZERO[zero]},
    }


def fit_tiny(root: Path, name: str, strategy: str | dict, reference_dtype: str, steps: int = 3, **more):
    """`train.py fit` of configs/tiny.yaml (two CPU processes unless ``more`` says otherwise).

    ``more``: ``optimizer`` (default SGD, ``None`` keeps the config's AdamW), ``checkpoints`` (a folder
    for them), ``ckpt_path``; ``accelerator``, ``devices``, ``precision``, ``clip``
    (gradient_clip_val), ``accumulate`` (accumulate_grad_batches), ``logger`` and ``callbacks`` (more
    of them) for the trainer; ``lora_rank``, ``ema_decay``, ``gradient_checkpointing`` and
    ``compile_blocks`` for the module; ``save_last`` for the checkpoints; ``new_session`` (a process
    group of its own, for signals sent to the group)."""
    overlay = {
        "trainer": {
            "accelerator": more.get("accelerator", "cpu"),
            "devices": more.get("devices", 2),
            "precision": more.get("precision", "32-true"),
            "strategy": strategy,
            "max_steps": steps,
            "gradient_clip_val": more.get("clip"),
            "accumulate_grad_batches": more.get("accumulate", 1),
            "logger": more.get("logger", False),
            "enable_checkpointing": "checkpoints" in more,
            "enable_progress_bar": False,
            "default_root_dir": str(root / name),
            "callbacks": [{"class_path": "cpu_strategies.DumpPolicy", "init_args": {"out": str(root / name)}}]
            + [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(c), "save_last": more.get("save_last")},
                }
                for c in [more.get("checkpoints")]
                if c
            ]
            + more.get("callbacks", []),
        },
        "model": {
            "init_args": {
                "pretrained_model": str(root / "tiny/model"),
                "reference_dtype": reference_dtype,
                # plain SGD: the update is the gradient itself, so weights compare like gradients do
                # (Adam's first steps move every weight by ~lr whatever the sign noise of its gradient)
                **({"optimizer": more.get("optimizer", SGD)} if more.get("optimizer", SGD) else {}),
                **{
                    k: more[k]
                    for k in ("lora_rank", "ema_decay", "gradient_checkpointing", "compile_blocks")
                    if k in more
                },
            }
        },
        "data": {"train_shards": str(root / "tiny/shards")},
    }
    config = root / f"{name}-config.yaml"  # JSON is YAML
    config.write_text(json.dumps(overlay))
    # no empty entry (an unset PYTHONPATH): Python reads one as the working folder, whose run folders
    # then shadow modules (a run named z3 hid the z3 that torch.compile looks for)
    path = os.pathsep.join(p for p in [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    # without the parent's rendezvous variables: an in-process run earlier in the session leaves
    # MASTER_PORT set (Lightning writes it) and may still hold that port, so a launch would not bind it
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env |= {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    if more.get("accelerator", "cpu") == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's own choice, also on a machine with a GPU
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/tiny.yaml")]
    cmd += ["--config", str(config)] + ([f"--ckpt_path={more['ckpt_path']}"] if "ckpt_path" in more else [])
    return subprocess.run(
        cmd,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        start_new_session=more.get("new_session", False),
    )


def finished_run(proc, root: Path, name: str) -> tuple[dict, dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((root / f"{name}.json").read_text())
    return facts, load_file(str(root / f"{name}.safetensors"))


def assert_trains_like(trained: dict, reference: dict, initial: dict, what: str) -> float:
    """``trained`` (a strategy's final policy) equals ``reference`` (DDP's) to within 1e-4 of how far
    training moved ``reference`` from ``initial``, which must be far enough to say something; returns
    that distance."""
    assert trained.keys() == reference.keys() == initial.keys()
    moved = max((reference[k] - initial[k].float()).abs().max().item() for k in reference)
    assert moved > 1e-3, "training hardly moved the weights; the comparison would say little"
    worst = max((trained[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-4 * moved, f"{what} and DDP policies differ by {worst:.2e} (moved {moved:.2e})"
    return moved


def assert_trains_lora_like(trained: dict, reference: dict, what: str) -> None:
    """``trained`` (a strategy's final LoRA policy) equals ``reference`` (DDP's) to within 1e-4 of how
    far training moved the adapters (``lora_B`` starts at zero, so any value of it is training)."""
    adapters = [k for k in reference if "lora_B" in k]
    assert adapters and trained.keys() == reference.keys()
    moved = max(reference[k].abs().max().item() for k in adapters)
    assert moved > 1e-4, "training hardly moved the adapters; the comparison would say little"
    worst = max((trained[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-4 * moved, f"{what} and DDP LoRA weights differ by {worst:.2e} (moved {moved:.2e})"
