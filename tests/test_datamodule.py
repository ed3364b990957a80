"""PopulationDataModule and collate_groups on tiny shards written in a temp dir."""

from __future__ import annotations

import tarfile

import lightning as L
import numpy as np
import pytest
import torch
from test_shards import make_group, with_sources, write_shards

from popalign.data import PopulationDataModule, PopulationGroup, ShardError, collate_groups
from popalign.data.datamodule import distributed_info
from popalign.errors import UserError


def labelled_group(g: int, kp: int, kd: int) -> PopulationGroup:
    """Member j of group g holds 100*g + j (preferred) or 100*g + 50 + j (dispreferred) everywhere."""
    group = make_group(g, kp=kp, kd=kd, per_member_time_ids=True)
    group.preferred = np.stack([np.full((4, 4, 4), 100 * g + j, np.float16) for j in range(kp)])
    group.dispreferred = np.stack([np.full((4, 4, 4), 100 * g + 50 + j, np.float16) for j in range(kd)])
    group.prompt_embeds = np.full((77, 8), g, np.float16)
    group.pooled_prompt_embeds = np.full(4, -g, np.float16)
    # time_ids row r = [r, ...]: preferred rows 0..kp-1, then dispreferred kp..kp+kd-1
    group.time_ids = np.arange(kp + kd, dtype=np.float32)[:, None].repeat(6, 1)
    return group


def epoch_keys(dm: PopulationDataModule, loader=None) -> list[str]:
    return [key for batch in (dm.train_dataloader() if loader is None else loader) for key in batch["keys"]]


def test_collate_layout_and_dtypes():
    groups = [labelled_group(0, kp=3, kd=6), labelled_group(1, kp=5, kd=4)]
    batch = collate_groups(groups, pairs_per_group=3, rng=np.random.default_rng(0))
    P = 2 * 3  # groups x pairs
    assert batch["latents"].shape == (2 * P, 4, 4, 4) and batch["latents"].dtype == torch.float16
    assert batch["prompt_embeds"].shape == (2 * P, 77, 8) and batch["prompt_embeds"].dtype == torch.float16
    assert batch["pooled_prompt_embeds"].shape == (2 * P, 4)
    assert batch["time_ids"].shape == (2 * P, 6) and batch["time_ids"].dtype == torch.float32
    assert batch["preferred"].tolist() == [True] * P + [False] * P
    assert batch["group"].dtype == torch.long and batch["group"].tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert batch["keys"] == ["p0000-g0000", "p0001-g0000"]
    value = batch["latents"][:, 0, 0, 0].float()
    for row in range(2 * P):
        g = int(batch["group"][row])
        member = int(value[row]) - 100 * g - (0 if row < P else 50)
        assert 0 <= member < (groups[g].num_preferred if row < P else groups[g].num_dispreferred)
        assert torch.all(batch["latents"][row] == value[row])  # a whole member, not a mix
        assert torch.all(batch["prompt_embeds"][row] == g) and torch.all(
            batch["pooled_prompt_embeds"][row] == -g
        )
        # per-member time_ids follow the member: dispreferred member j sits at row kp + j
        offset = 0 if row < P else groups[g].num_preferred
        assert torch.all(batch["time_ids"][row] == offset + member)
    for g in range(2):  # without replacement inside each population
        rows = batch["group"] == g
        assert len(set(value[rows & batch["preferred"]].tolist())) == 3
        assert len(set(value[rows & ~batch["preferred"]].tolist())) == 3
    with pytest.raises(ValueError, match="fewer than 6 members"):
        collate_groups(groups, pairs_per_group=6, rng=np.random.default_rng(0))


def test_collate_gives_each_preferred_row_its_own_caption():
    groups = [with_sources(labelled_group(g, kp=4, kd=4)) for g in range(2)]
    for g in groups:  # source row r holds 10 * prompt_id + r everywhere
        g.source_prompt_embeds[:] = (10 * g.meta["prompt_id"] + np.arange(2))[:, None, None]
        g.source_pooled_prompt_embeds[:] = -(10 * g.meta["prompt_id"] + np.arange(2))[:, None]
    plain = collate_groups(groups[:1] + [labelled_group(1, 4, 4)], 2, np.random.default_rng(0))
    assert "source_prompt_embeds" not in plain  # only when every group has them

    batch = collate_groups(groups, 2, np.random.default_rng(0))
    assert batch["source_prompt_embeds"].shape == (4, 77, 8)
    assert batch["source_pooled_prompt_embeds"].shape == (4, 4)
    for row in range(4):
        g = int(batch["group"][row])
        member = int(batch["latents"][row, 0, 0, 0]) - 100 * g
        caption = groups[g].meta["preferred_sources"][member]
        want = 10 * g + groups[g].meta["sources"].index(caption)
        assert torch.all(batch["source_prompt_embeds"][row] == want)
        assert torch.all(batch["source_pooled_prompt_embeds"][row] == -want)
    # the same members are drawn with or without sources
    same = collate_groups([labelled_group(g, 4, 4) for g in range(2)], 2, np.random.default_rng(0))
    assert torch.equal(same["latents"], batch["latents"])


def test_pair_drawing_without_replacement():
    # K = pairs: every draw must be a permutation of all members
    group, rng = labelled_group(0, kp=4, kd=4), np.random.default_rng(1)
    orders = set()
    for _ in range(20):
        value = collate_groups([group], 4, rng)["latents"][:, 0, 0, 0].int().tolist()
        assert sorted(value[:4]) == [0, 1, 2, 3] and sorted(value[4:]) == [50, 51, 52, 53]
        orders.add(tuple(value))
    assert len(orders) > 1  # drawn, not fixed


def test_shard_specs_and_one_pass_per_epoch(tmp_path):
    paths = write_shards(tmp_path, 7, maxcount=2)  # 4 shards: 2 + 2 + 2 + 1 groups
    everyone = sorted(f"p{i:04d}-g0000" for i in range(7))
    for spec in (str(tmp_path), f"{tmp_path}/shard-{{000000..000003}}.tar", ",".join(paths)):
        dm = PopulationDataModule(spec, groups_per_batch=2, pairs_per_group=3, num_workers=0)
        assert sorted(epoch_keys(dm)) == everyone
    with pytest.raises(UserError, match="shard not found"):
        PopulationDataModule(f"{tmp_path}/nope-{{0..1}}.tar").setup("fit")


def test_split_by_worker_gives_each_group_once(tmp_path):
    write_shards(tmp_path, 10, maxcount=2)  # 5 shards over 2 workers
    dm = PopulationDataModule(str(tmp_path), groups_per_batch=3, pairs_per_group=2, num_workers=2)
    loader = dm.train_dataloader()
    for _ in range(2):  # two epochs
        keys = epoch_keys(dm, loader)
        assert sorted(keys) == sorted(f"p{i:04d}-g0000" for i in range(10))


def test_workers_start_the_way_the_config_says(tmp_path):
    write_shards(tmp_path, 4, maxcount=2)
    dm = PopulationDataModule(str(tmp_path), num_workers=1, multiprocessing_context="spawn")
    assert dm.train_dataloader().multiprocessing_context.get_start_method() == "spawn"
    default = PopulationDataModule(str(tmp_path), num_workers=1)
    assert default.train_dataloader().multiprocessing_context is None
    # without workers there is nothing to start (torch refuses the setting then)
    no_workers = PopulationDataModule(str(tmp_path), num_workers=0, multiprocessing_context="spawn")
    assert no_workers.train_dataloader().multiprocessing_context is None
    with pytest.raises(UserError, match="multiprocessing_context must be one of .*got 'threads'"):
        PopulationDataModule(str(tmp_path), multiprocessing_context="threads")


def test_split_by_node_uses_torch_distributed_rank(tmp_path, monkeypatch):
    write_shards(tmp_path, 8, maxcount=2)  # 4 shards over 2 ranks
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        assert distributed_info() == (rank, 2)
        dm = PopulationDataModule(str(tmp_path), pairs_per_group=2, num_workers=0)
        dm.setup("fit")
        seen.append(set(epoch_keys(dm)))
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"p{i:04d}-g0000" for i in range(8)}
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 5)
    with pytest.raises(UserError, match="4 shards cannot be split over 5 ranks"):
        PopulationDataModule(str(tmp_path)).setup("fit")


def test_validation_gives_every_rank_the_same_batch_count(tmp_path, monkeypatch):
    # 2 validation shards over 3 ranks: one pass would give ranks 2, 2 and 0 batches, and a
    # validation step's collectives (PopAlign's kappa all-reduce) would pair up wrongly, then hang
    write_shards(tmp_path / "train", 6, maxcount=2)
    write_shards(tmp_path / "val", 4, maxcount=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)

    def val_batches(rank: int, **kw) -> list[list[str]]:
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        dm = PopulationDataModule(str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0, **kw)
        loader = dm.val_dataloader()
        passes = [[b["keys"] for b in loader] for _ in range(2)]
        assert passes[0] == passes[1]  # the same draws every validation pass
        return passes[0]

    with pytest.raises(UserError, match="validation on 3 ranks needs data.val_batches"):
        val_batches(0)
    per_rank = [val_batches(rank, val_batches=3, groups_per_batch=2, pairs_per_group=2) for rank in range(3)]
    assert [len(b) for b in per_rank] == [3, 3, 3]
    assert all(len(keys) == 2 for batches in per_rank for keys in batches)


def test_deterministic_given_seed_and_epoch(tmp_path):
    write_shards(tmp_path, 12, maxcount=3)

    def run(seed: int, epochs: int = 2) -> list[list]:
        dm = PopulationDataModule(
            str(tmp_path), groups_per_batch=2, pairs_per_group=3, num_workers=0, seed=seed
        )
        loader = dm.train_dataloader()
        return [[(b["keys"], b["latents"].tolist()) for b in loader] for _ in range(epochs)]

    first = run(0)
    assert first == run(0)
    assert first[0] != first[1]  # a new epoch reshuffles and redraws
    assert first != run(1)


def test_batches_per_epoch_cuts_epochs(tmp_path):
    write_shards(tmp_path, 4, maxcount=2)
    for workers in (0, 2):
        dm = PopulationDataModule(
            str(tmp_path), groups_per_batch=3, pairs_per_group=2, num_workers=workers, batches_per_epoch=5
        )
        loader = dm.train_dataloader()
        assert len(loader) == 5
        for _ in range(2):  # 4 groups, yet 5 full batches of 3: shards are resampled without end
            batches = list(loader)
            assert len(batches) == 5 and all(len(b["keys"]) == 3 for b in batches)


def test_resampling_shards_without_samples_stops(tmp_path):
    tarfile.open(tmp_path / "empty.tar", "w").close()
    dm = PopulationDataModule(str(tmp_path), num_workers=0, batches_per_epoch=2)
    with pytest.raises(ShardError, match="shards drawn from 1 in a row without one sample"):
        epoch_keys(dm)


def test_bad_fraction_aborts_training_stream(tmp_path):
    write_shards(tmp_path, 3)
    (tmp_path / "shard-000001.tar").write_bytes(b"not a tar")
    dm = PopulationDataModule(str(tmp_path), num_workers=0, pairs_per_group=2)
    with pytest.raises(ShardError, match=r"shard-000001.tar: 1 of 4 samples bad"):
        epoch_keys(dm)  # 1 of 4 = 25% > 1% at the end of the data
    dm = PopulationDataModule(str(tmp_path), num_workers=1, pairs_per_group=2)
    with pytest.raises(ShardError, match=r"shard-000001.tar: 1 of 4 samples bad"):
        epoch_keys(dm)  # raised in a worker, re-raised as ShardError in the main process
    dm = PopulationDataModule(str(tmp_path), num_workers=0, pairs_per_group=2, max_bad_fraction=0.5)
    assert len(epoch_keys(dm)) == 3


def test_invalid_arguments():
    for kwargs, message in (
        ({"pairs_per_group": 0}, "pairs_per_group must be >= 1"),
        ({"max_bad_fraction": 1.0}, "max_bad_fraction must be in"),
        ({"latent_shape": (4, 8)}, "latent_shape must be three"),
        ({"batches_per_epoch": 0}, "batches_per_epoch must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"val_batches": 0}, "val_batches must be >= 1"),
    ):
        with pytest.raises(UserError, match=message):
            PopulationDataModule("x.tar", **kwargs)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.steps: list[tuple[int, tuple[str, ...]]] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.steps.append((self.current_epoch, tuple(batch["keys"])))
        return self.weight * batch["latents"].float().mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["keys"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_val", [False, True])
def test_fit_with_lightning(tmp_path, with_val):
    write_shards(tmp_path / "train", 6, maxcount=2)
    write_shards(tmp_path / "val", 2)
    dm = PopulationDataModule(
        str(tmp_path / "train"),
        val_shards=str(tmp_path / "val") if with_val else None,
        groups_per_batch=2,
        pairs_per_group=2,
        num_workers=0,
        batches_per_epoch=3,
        latent_shape=(4, 4, 4),
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert [epoch for epoch, _ in model.steps] == [0, 0, 0, 1, 1, 1]
    assert dm.train_stream.epoch == 1  # the trainer's epoch reached the stream
    # validation: one pass over its 2 groups per epoch, in stored order
    assert model.val_keys == (["p0000-g0000", "p0001-g0000"] * 2 if with_val else [])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("per_epoch", [None, 7], ids=["one_pass", "resampled"])
def test_a_loader_resumed_mid_epoch_continues_the_pass(tmp_path, workers, per_epoch):
    # the state Lightning keeps in a checkpoint after k batches; a new loader given it (a resumed
    # run) yields the rest of that epoch's pass, batch for batch, and later epochs as before. One
    # pass over 3 shards (4 + 4 + 3 groups) gives 2 workers 4 and 2 batches: after batch 5 only one
    # worker is left, and a resume there must carry on with it
    write_shards(tmp_path, 11, maxcount=4)

    def loader():
        dm = PopulationDataModule(
            str(tmp_path), groups_per_batch=2, pairs_per_group=2, num_workers=workers,
            batches_per_epoch=per_epoch, seed=3,
        )  # fmt: skip
        return dm.train_dataloader()

    def seen(batches) -> list:
        return [(b["keys"], b["latents"].tolist()) for b in batches]

    straight = loader()
    epochs = [seen(straight) for _ in range(2)]
    assert len(epochs[0]) == (6 if per_epoch is None else 7) and "worker" not in next(iter(straight))
    for k in (3, 5):
        first = loader()
        passing = iter(first)
        head = seen(next(passing) for _ in range(k))
        state = first.state_dict()
        assert state["epoch"] == 0 and sum(state["trained_per_worker"]) == k
        resumed = loader()
        resumed.load_state_dict(state)
        assert head + seen(resumed) == epochs[0], k
        assert seen(resumed) == epochs[1]  # the next pass is epoch 1, whole
