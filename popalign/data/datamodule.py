"""Batches of preference pairs from population shards, for Lightning.

Each step takes ``groups_per_batch`` groups; from each, ``pairs_per_group`` preferred members and,
independently, as many dispreferred members are drawn without replacement. Shards are split over
ranks, then over DataLoader workers; everything random is seeded from (seed, rank, worker, epoch).
A run resumed mid-epoch continues the epoch's batches where its checkpoint left them.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from popalign.data.loader import WORKER_KEY, EpochLoader
from popalign.data.schema import PopulationGroup, ShardError
from popalign.data.shards import BadSampleCounter, expand_shards, read_groups, split_by_node
from popalign.errors import UserError

log = logging.getLogger(__name__)


def collate_groups(
    groups: Sequence[PopulationGroup], pairs_per_group: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Draw ``pairs_per_group`` pairs from each group and stack them; P = len(groups) * pairs_per_group.

    Returns ``latents`` [2P, C, h, w] (stored dtype; rows 0..P-1 preferred, P..2P-1 dispreferred,
    row i pairs with row i + P, both from one group), ``prompt_embeds`` [2P, L, D],
    ``pooled_prompt_embeds`` [2P, Dp], ``time_ids`` [2P, 6] float32, ``preferred`` bool [2P],
    ``group`` long [2P] (index of the group in the batch) and ``keys`` (the G group keys). When every
    group carries source embeddings, also ``source_prompt_embeds`` [P, L, D] and
    ``source_pooled_prompt_embeds`` [P, Dp]: each preferred row's own identity-specific caption.
    """
    n = pairs_per_group
    pref, disp, pref_t, disp_t, embeds, pooled = [], [], [], [], [], []
    with_sources = all(g.has_sources for g in groups)
    src_embeds, src_pooled = [], []
    for g in groups:
        if min(g.num_preferred, g.num_dispreferred) < n:
            raise ValueError(f"group {g.key!r} has fewer than {n} members in a population")
        pi = rng.choice(g.num_preferred, size=n, replace=False)
        di = rng.choice(g.num_dispreferred, size=n, replace=False)
        tp, td = g.member_time_ids()
        pref.append(g.preferred[pi])
        disp.append(g.dispreferred[di])
        pref_t.append(tp[pi])
        disp_t.append(td[di])
        embeds.append(np.broadcast_to(g.prompt_embeds, (n, *g.prompt_embeds.shape)))
        pooled.append(np.broadcast_to(g.pooled_prompt_embeds, (n, *g.pooled_prompt_embeds.shape)))
        if with_sources:
            rows = g.preferred_source_index()[pi]
            src_embeds.append(g.source_prompt_embeds[rows])
            src_pooled.append(g.source_pooled_prompt_embeds[rows])
    group_index = torch.arange(len(groups)).repeat_interleave(n)
    batch = {
        "latents": torch.from_numpy(np.concatenate(pref + disp)),
        "prompt_embeds": torch.from_numpy(np.concatenate(embeds + embeds)),
        "pooled_prompt_embeds": torch.from_numpy(np.concatenate(pooled + pooled)),
        "time_ids": torch.from_numpy(np.concatenate(pref_t + disp_t).astype(np.float32)),
        "preferred": torch.arange(2 * len(group_index)) < len(group_index),
        "group": torch.cat([group_index, group_index]),
        "keys": [g.key for g in groups],
    }
    if with_sources:
        batch["source_prompt_embeds"] = torch.from_numpy(np.concatenate(src_embeds))
        batch["source_pooled_prompt_embeds"] = torch.from_numpy(np.concatenate(src_pooled))
    return batch


class PopulationStream(IterableDataset):
    """Collated batches from shards: split by rank and worker, checked, shuffled, batched.

    With ``batches_per_epoch`` None it is one pass over this rank's shards; otherwise shards are
    drawn with replacement without end and each epoch stops after ``batches_per_epoch`` batches
    (shared out over the workers), so every rank takes the same number of steps. Each batch carries
    the index of the worker that made it under :data:`WORKER_KEY` (the loader takes it off).
    """

    def __init__(
        self,
        urls: Sequence[str],
        groups_per_batch: int = 1,
        pairs_per_group: int = 4,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        latent_shape: tuple[int, ...] | None = None,
        max_bad_fraction: float = 0.01,
        batches_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.groups_per_batch, self.pairs_per_group = groups_per_batch, pairs_per_group
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.latent_shape, self.max_bad_fraction = latent_shape, max_bad_fraction
        self.batches_per_epoch, self.rank, self.world_size = batches_per_epoch, rank, world_size
        self.epoch, self.skip, self.rotation = 0, (), 0

    def set_epoch(self, epoch: int, skip: Sequence[int] = (), rotation: int = 0) -> None:
        """The next pass is epoch ``epoch`` less the first ``skip[w]`` batches of worker ``w`` (read,
        drawn and dropped, so the batches after them are the ones a whole pass gives). DataLoader
        worker ``i`` makes worker ``(i + rotation) % num_workers``'s batches: the loader asks its
        workers in turn from worker 0, so a pass resumed mid-round starts with the right one."""
        self.epoch, self.skip, self.rotation = epoch, tuple(skip), rotation

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a single pass over shards has no length known in advance")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.utils import pytorch_worker_info

        _, _, loader_worker, num_workers = pytorch_worker_info()
        worker = (loader_worker + self.rotation) % num_workers
        seq = np.random.SeedSequence([self.seed, self.rank, worker, self.epoch])
        shard_rng, shuffle_rng, pair_rng = (np.random.default_rng(s) for s in seq.spawn(3))
        counter = BadSampleCounter(self.max_bad_fraction)
        if self.batches_per_epoch is None:
            urls = list(self.urls)
            if self.shuffle:  # one order for all ranks and workers, so the splits partition it
                np.random.default_rng([self.seed, self.epoch]).shuffle(urls)
            shards = islice(split_by_node(urls, self.rank, self.world_size), worker, None, num_workers)
        else:
            shards = self._resampled(shard_rng, counter)
        groups = read_groups(shards, counter, self.latent_shape, self.pairs_per_group)
        if self.shuffle and self.shuffle_buffer > 1:
            groups = _shuffled(groups, self.shuffle_buffer, shuffle_rng)
        batches = _batched(groups, self.groups_per_batch, self.pairs_per_group, pair_rng)
        quota = None
        if self.batches_per_epoch is not None:
            quota = self.batches_per_epoch // num_workers + int(worker < self.batches_per_epoch % num_workers)
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for batch in islice(batches, skip, quota):
            batch[WORKER_KEY] = worker
            yield batch

    def _resampled(self, rng: np.random.Generator, counter: BadSampleCounter) -> Iterator[str]:
        # stop an endless loop over shards that hold no samples at all
        patience, idle, last_seen = max(100, 10 * len(self.urls)), 0, 0
        while True:
            idle = 0 if counter.seen > last_seen else idle + 1
            last_seen = counter.seen
            if idle > patience:
                raise ShardError(f"{idle} shards drawn from {len(self.urls)} in a row without one sample")
            yield self.urls[int(rng.integers(len(self.urls)))]


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _batched(
    groups: Iterator[PopulationGroup], size: int, pairs: int, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    batch: list[PopulationGroup] = []
    for group in groups:
        batch.append(group)
        if len(batch) == size:
            yield collate_groups(batch, pairs, rng)
            batch = []
    if batch:  # the last, smaller batch of a pass
        yield collate_groups(batch, pairs, rng)


def distributed_info(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size): from ``torch.distributed`` when initialised, else the trainer, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return 0, 1


class PopulationDataModule(L.LightningDataModule):
    """Population shards for PopAlign training (the ``data:`` section of the training YAML).

    Args:
        train_shards: training shards: a brace pattern (``data/shard-{000000..000009}.tar``), a
            directory (all its ``*.tar``, sorted), a comma-separated list, or any URL webdataset
            opens (``pipe:...``, ``http://...``).
        val_shards: validation shards in the same forms; None for no validation.
        groups_per_batch: population groups per batch (G).
        pairs_per_group: preferred/dispreferred pairs drawn per group per step; a batch holds
            2 * G * pairs_per_group samples.
        num_workers: DataLoader worker processes per rank.
        multiprocessing_context: how the workers start: None for the platform's default (``fork`` on
            Linux before Python 3.14), or ``fork``, ``spawn``, ``forkserver``. ``spawn`` and
            ``forkserver`` start each epoch's workers in fresh interpreters (seconds per epoch) instead
            of forking a process that runs threads (docs/scaling.md).
        shuffle_buffer: groups held for shuffling training samples (0 or 1: no sample shuffling).
        seed: seed of every random choice (shard order, shuffling, pair drawing).
        latent_shape: expected member latent shape [C, h, w]; None accepts the first one seen.
        max_bad_fraction: skipped bad samples tolerated, as a fraction of samples read (judged
            after 100 samples and at the end of the data); 0 fails on the first bad sample.
        batches_per_epoch: None for one pass over the shards per epoch; an int resamples shards
            without end and cuts epochs of that many batches (use it with several ranks, so every
            rank takes the same number of steps).
        val_batches: None for one pass over the validation shards (one rank only); an int draws that
            many validation batches per rank from them, with replacement and the same draws every
            validation pass. Needed with several ranks: a validation step holds collectives (PopAlign's
            kappa, FSDP's gathers), so every rank must run the same number of them.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        groups_per_batch: int = 1,
        pairs_per_group: int = 4,
        num_workers: int = 2,
        multiprocessing_context: str | None = None,
        shuffle_buffer: int = 100,
        seed: int = 0,
        latent_shape: tuple[int, int, int] | None = None,
        max_bad_fraction: float = 0.01,
        batches_per_epoch: int | None = None,
        val_batches: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("groups_per_batch", groups_per_batch, 1),
            ("pairs_per_group", pairs_per_group, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("seed", seed, 0),
            ("batches_per_epoch", 1 if batches_per_epoch is None else batches_per_epoch, 1),
            ("val_batches", 1 if val_batches is None else val_batches, 1),
        ):
            if value < low:
                raise UserError(f"data: {name} must be >= {low}, got {value}")
        methods = multiprocessing.get_all_start_methods()
        if multiprocessing_context is not None and multiprocessing_context not in methods:
            raise UserError(
                f"data: multiprocessing_context must be one of {', '.join(methods)} (this platform's), "
                f"got {multiprocessing_context!r}"
            )
        if not 0 <= max_bad_fraction < 1:
            raise UserError(f"data: max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        if latent_shape is not None and (len(latent_shape) != 3 or min(latent_shape) < 1):
            raise UserError(f"data: latent_shape must be three positive sizes [C, h, w], got {latent_shape}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.groups_per_batch, self.pairs_per_group = groups_per_batch, pairs_per_group
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.multiprocessing_context = multiprocessing_context
        self.latent_shape = tuple(int(s) for s in latent_shape) if latent_shape is not None else None
        self.max_bad_fraction, self.batches_per_epoch = max_bad_fraction, batches_per_epoch
        self.val_batches = val_batches
        self.train_stream: PopulationStream | None = None
        self.val_stream: PopulationStream | None = None
        if not val_shards:
            # hide the hook: Lightning then runs no validation (an empty loader list would warn)
            self.val_dataloader = None

    @property
    def batch_rows(self) -> int:
        """Latents in one batch of one rank: ``2 * groups_per_batch * pairs_per_group``."""
        return 2 * self.groups_per_batch * self.pairs_per_group

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = distributed_info(self.trainer)
        common = dict(
            groups_per_batch=self.groups_per_batch,
            pairs_per_group=self.pairs_per_group,
            seed=self.seed,
            latent_shape=self.latent_shape,
            max_bad_fraction=self.max_bad_fraction,
            rank=rank,
            world_size=world_size,
        )
        if stage in (None, "fit"):
            urls = expand_shards(self.train_shards)
            if self.batches_per_epoch is None and world_size > 1:
                if len(urls) < world_size:
                    raise UserError(
                        f"{self.train_shards}: {len(urls)} shards cannot be split over {world_size} ranks"
                    )
                log.warning(
                    "one pass over shards per epoch may give ranks unequal step counts; set batches_per_epoch"
                )
            self.train_stream = PopulationStream(
                urls, shuffle=True, shuffle_buffer=self.shuffle_buffer,
                batches_per_epoch=self.batches_per_epoch, **common,
            )  # fmt: skip
        if stage in (None, "fit", "validate") and self.val_shards:
            if world_size > 1 and self.val_batches is None:
                raise UserError(
                    f"data: validation on {world_size} ranks needs data.val_batches (validation batches "
                    "per rank): one pass over the shards can give ranks different step counts, and the "
                    "steps' collectives would then pair up wrongly or hang"
                )
            self.val_stream = PopulationStream(
                expand_shards(self.val_shards), batches_per_epoch=self.val_batches, **common
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            self.setup("fit")
        return self._loader(self.train_stream, trained_fn=self._trained_this_epoch)

    def val_dataloader(self) -> DataLoader:
        if self.val_stream is None:
            self.setup("validate")
        return self._loader(self.val_stream, lambda: 0)  # epoch 0 always: the same pairs each pass

    def _loader(
        self,
        stream: PopulationStream | None,
        epoch_fn: Callable[[], int | None] | None = None,
        trained_fn: Callable[[], int | None] | None = None,
    ) -> DataLoader:
        return EpochLoader(
            stream,
            epoch_fn or self._trainer_epoch,
            trained_fn,
            num_workers=self.num_workers,
            # torch refuses a start method without workers
            multiprocessing_context=self.multiprocessing_context if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else int(self.trainer.current_epoch)

    def _trained_this_epoch(self) -> int | None:
        # batches whose training step ran this epoch (Lightning's progress, restored on resume)
        if self.trainer is None:
            return None
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
