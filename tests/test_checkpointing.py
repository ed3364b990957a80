"""How train.py writes checkpoints: whole files only, not through $TMPDIR, and the trainer set-up."""

from __future__ import annotations

import os
import tempfile

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from popalign.checkpointing import FinalStepCheckpoint, WholeFileCheckpointIO, prepare_checkpointing


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_checkpoint_is_written_beside_its_target_not_in_tmpdir(tmp_path, monkeypatch):
    # Lightning's writer stages the file in $TMPDIR and moves it: a copy, cut short by a kill, when the
    # checkpoint folder is on another filesystem; here $TMPDIR cannot be written at all
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    path = tmp_path / "checkpoints" / "last.ckpt"
    WholeFileCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    io = WholeFileCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.save_checkpoint({"weights": torch.zeros(1000), "broken": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("name", ["last.ckpt", "step[2].ckpt"])  # a name with glob characters too
def test_a_killed_writers_temporary_goes_once_the_checkpoint_is_whole(tmp_path, name):
    stale = tmp_path / f".{name}.tmp-999999"  # a process killed while writing this checkpoint
    other = tmp_path / ".epoch=0-step=2.ckpt.tmp-999999"  # another checkpoint's: not this save's business
    staging = tmp_path / f".{name}.tmp-999998"  # a sharded save's staging folder: not a file to unlink
    stale.write_bytes(b"half")
    other.write_bytes(b"half")
    staging.mkdir()
    WholeFileCheckpointIO().save_checkpoint({"step": 2}, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted([other.name, staging.name, name])


def _trainer(tmp_path, callbacks, plugins=None) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=callbacks, plugins=plugins, accelerator="cpu"
    )


def test_prepare_checkpointing_swaps_in_popaligns_writer_and_last_checkpoint(tmp_path):
    plain = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True)
    trainer = _trainer(tmp_path, [plain])
    prepare_checkpointing(trainer)
    assert type(plain) is FinalStepCheckpoint and plain.save_last is True
    assert type(trainer.strategy.checkpoint_io) is WholeFileCheckpointIO


def test_prepare_checkpointing_keeps_a_writer_and_a_checkpoint_class_the_config_chose(tmp_path):
    class MyIO(TorchCheckpointIO):
        pass

    class MyCheckpoint(ModelCheckpoint):
        pass

    mine = MyCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer = _trainer(tmp_path, [mine], plugins=[MyIO()])
    prepare_checkpointing(trainer)
    assert type(mine) is MyCheckpoint
    assert type(trainer.strategy.checkpoint_io) is MyIO


def _sharded_strategy(kind: str):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from popalign.distributed import BlockFSDPStrategy, StagedFSDPStrategy

    if kind == "fsdp_blocks":
        return BlockFSDPStrategy(state_dict_type="sharded")
    # `strategy: fsdp` as train.py sets it up (Lightning builds no FSDP trainer on a CPU)
    trainer = SimpleNamespace(
        checkpoint_callbacks=[], logger=None, strategy=FSDPStrategy(state_dict_type="sharded")
    )
    prepare_checkpointing(trainer)
    assert type(trainer.strategy) is StagedFSDPStrategy
    return trainer.strategy


def _sharded_save(strategy, path, step: int, optimizer_states: list | None = None) -> None:
    checkpoint = {
        "state_dict": {"w": torch.full((2,), float(step))},
        "optimizer_states": optimizer_states or [],
        "global_step": step,
    }
    strategy.save_checkpoint(checkpoint, path)


def _saved(path) -> tuple[int, float]:
    """The step in the folder's metadata, and the step its shards hold."""
    import torch.distributed.checkpoint as dcp

    shards = {"model": {"w": torch.zeros(2)}}
    dcp.load(shards, checkpoint_id=path)
    return torch.load(path / "meta.pt", weights_only=True)["global_step"], shards["model"]["w"][0].item()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: what a rank does
@pytest.mark.parametrize("kind", ["fsdp_blocks", "fsdp"])
def test_a_sharded_checkpoint_folder_is_put_in_place_whole(tmp_path, monkeypatch, kind):
    # each rank writes its shard into the folder, and a save stopped halfway left a partial folder that
    # --ckpt_path last then picked (under plain fsdp: the new shards beside the old metadata, loaded
    # without a word); now it is staged beside the target and renamed when complete
    from lightning.pytorch.strategies import fsdp

    strategy = _sharded_strategy(kind)
    path = tmp_path / "last.ckpt"
    killed = tmp_path / ".last.ckpt.tmp-999999"  # a killed run's staging folder
    killed.mkdir()
    _sharded_save(strategy, path, 2)
    assert _saved(path) == (2, 2.0) and os.listdir(tmp_path) == ["last.ckpt"]
    _sharded_save(strategy, path, 4)
    assert _saved(path) == (4, 4.0) and os.listdir(tmp_path) == ["last.ckpt"]

    save = fsdp._distributed_checkpoint_save

    def stopped(state, folder):
        save(state, folder)
        raise KeyboardInterrupt  # after the shards, before the metadata

    monkeypatch.setattr(fsdp, "_distributed_checkpoint_save", stopped)
    with pytest.raises(KeyboardInterrupt):
        _sharded_save(strategy, path, 6)
    assert _saved(path) == (4, 4.0) and os.listdir(tmp_path) == ["last.ckpt"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_optimizers_without_state_are_found_in_checkpoint_files_and_folders(tmp_path):
    # FSDP cannot resume them (Lightning's loader failed with an IndexError on a full file, torch's
    # with a ValueError on a folder); StagedFSDPStrategy.load_checkpoint refuses them in one line
    from popalign.distributed import stateless_optimizers

    groups = [{"lr": 0.1, "params": ["w"]}]
    adam = {"state": {"w": {"step": torch.tensor(2.0), "exp_avg": torch.ones(2)}}, "param_groups": groups}
    sgd = {"state": {}, "param_groups": groups}
    strategy = _sharded_strategy("fsdp_blocks")
    for i, (states, stateless) in enumerate([([adam, sgd], [1]), ([sgd, adam], [0]), ([adam], [])]):
        file, folder = tmp_path / f"{i}.ckpt", tmp_path / f"{i}"
        torch.save({"optimizer_states": states}, file)
        _sharded_save(strategy, folder, 2, states)
        assert stateless_optimizers(file) == stateless_optimizers(folder) == stateless
    neither = [tmp_path / "missing", tmp_path]  # no checkpoint there: Lightning's to report
    assert [stateless_optimizers(path) for path in neither] == [[], []]
