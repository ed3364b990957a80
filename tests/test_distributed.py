"""Two gloo processes give the gradients one process gives over the same global batch.

This needs PopAlignLoss's reference point kappa to be the *global* batch mean (all-reduced): with a
per-rank kappa the two runs differ.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_batch

from popalign.module import PopAlignModule
from popalign.objectives import PopAlignLoss

PAIRS = 4


def _global_inputs():
    batch = make_batch(pairs=PAIRS, groups=2, seed=3)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(PAIRS, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (PAIRS,), generator=g).repeat(2)
    return batch, noise, t


def _rows(rank: int, world: int) -> torch.Tensor:
    # this rank's pairs, kept in the [preferred..., dispreferred...] layout
    per = PAIRS // world
    idx = torch.arange(rank * per, (rank + 1) * per)
    return torch.cat([idx, idx + PAIRS])


def _grads(model_dir: str, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's gradients; averaged over the ranks (as DDP does) when a process group runs."""
    torch.manual_seed(0)
    m = PopAlignModule(
        pretrained_model=model_dir, objective=PopAlignLoss(beta=50.0), reference_dtype="float32"
    )
    with torch.no_grad():  # a reference worse than the policy: rewards mostly > 0, so kappa > 0
        for p in m.reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch, noise, t = _global_inputs()
    rows = _rows(rank, world)
    local = {k: v[rows] for k, v in batch.items()}
    out = m.compute_objective(local, noise[rows], t[rows])
    out.loss.backward()
    grads = [p.grad.detach().clone() for p in m.policy.parameters()]
    if world > 1 and dist.is_initialized():
        for gr in grads:
            dist.all_reduce(gr)
            gr /= world  # DDP averages gradients over ranks
    return grads


def _mismatch(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() / (y.abs().max().item() + 1e-12) for x, y in zip(a, b))


def _worker(rank: int, world: int, model_dir: str, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = _grads(model_dir, rank, world)
        if rank == 0:
            torch.save(grads, out_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tiny_model, tmp_path):
    single = _grads(tiny_model, 0, 1)
    out_file = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_worker, args=(2, tiny_model, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)
    assert len(ddp) == len(single)
    worst = _mismatch(ddp, single)
    assert worst < 1e-4, f"relative gradient mismatch {worst:.2e}"


def test_per_rank_kappa_would_differ(tiny_model):
    # guard that the test above can fail: each rank's own kappa (no all-reduce: no process group
    # here), gradients then averaged as DDP would, is further from one process than its tolerance
    single = _grads(tiny_model, 0, 1)
    halves = [_grads(tiny_model, rank, 2) for rank in range(2)]
    per_rank = [(a + b) / 2 for a, b in zip(*halves)]
    assert _mismatch(per_rank, single) > 1e-3
