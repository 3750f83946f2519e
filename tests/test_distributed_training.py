"""Fine-tuning at scale on CPU: DAP and distillation under DistributedDataParallel (2 gloo processes), and resume.

Every rank gets half of each global batch. Both ranks must make the same DAP decisions, and the run must equal one
process over the whole batch (eval mode, as the reference trains: probe BatchNorms on their running statistics, so
no per-rank batch statistics); training under DDP equals one process with the same global batch; a run stopped
after k steps and resumed from its checkpoint equals the uninterrupted run.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import make_model

from vitprune_fast import distributed
from vitprune_fast.dap import DAP, Schedule, finetune_dap
from vitprune_fast.finetune import train

GLOBAL_BATCH = 8
STEPS = 6


class Stop(Exception):
    """Raised by the interrupting loader: a run killed after some steps."""


def _global_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(n)]


def _local(batches, rank: int, world: int):
    """This rank's half of every global batch (the concatenation over ranks is the global batch)."""
    per = GLOBAL_BATCH // world
    return [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in batches]


class _Interrupting:
    """Yields the batches, then raises Stop when asked for batch ``stop`` (a run that dies there)."""

    def __init__(self, batches, stop: int):
        self.batches, self.stop, self.served = batches, stop, 0

    def __iter__(self):
        for b in self.batches:
            if self.served == self.stop:
                raise Stop
            self.served += 1
            yield b


def _dap_steps(rank: int, world: int) -> dict:
    """A hand-written DDP loop with DAP: the state after every step."""
    torch.manual_seed(0)  # the probes' initialisation (a DDP run takes rank 0's)
    model = make_model("deit", seed=3)
    dap = DAP(model, 0.3, Schedule(1, 3, 5, update_every=1))
    net = distributed.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    records = []
    for x, y in _local(_global_batches(STEPS, seed=11), rank, world):
        loss = F.cross_entropy(net(x), y) + dap.loss(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dap.step()
        records.append({"masks": torch.cat(dap.hard_masks()), "goal": dap.goal.clone(),
                        "gate": dap.gate.detach().clone(), "taylor": dap._taylor.clone(), "dcls": dap._dcls.clone()})
    dpsi = [torch.tensor(u["dpsi_cls"] + u["dpsi_patch"]) for u in dap.history]  # the update inputs (mean ΔΨ)
    return {"records": records, "plan": dap.plan().to_dict(), "probe": next(dap.probes.parameters()).detach().clone(),
            "dpsi": dpsi}


def _train(rank: int, world: int, ckpt: str | None = None, stop: int | None = None) -> dict:
    torch.manual_seed(0)
    model, teacher = make_model("deit", seed=4), make_model("deit", seed=5)
    loader = _local(_global_batches(STEPS, seed=12), rank, world)
    if stop is not None:
        loader = _Interrupting(loader, stop)
    kw = dict(checkpoint=ckpt, checkpoint_every=2) if ckpt else {}
    losses = train(model, loader, STEPS, lr=1e-3, teacher=teacher, progress=False, **kw)
    return {"state": model.state_dict(), "losses": losses}


def _dap_finetune(rank: int, world: int, ckpt: str | None = None, stop: int | None = None) -> dict:
    torch.manual_seed(0)  # the probes' initialisation
    model = make_model("deit", seed=6)
    loader = _local(_global_batches(STEPS, seed=13), rank, world)
    if stop is not None:
        loader = _Interrupting(loader, stop)
    kw = dict(checkpoint=ckpt, checkpoint_every=2) if ckpt else {}
    _, plan, hist = finetune_dap(model, loader, target=0.3, steps=STEPS, lr=1e-3,
                                 schedule=Schedule(1, 3, 5, update_every=1), eval_mode=True, **kw)
    return {"state": model.state_dict(), "plan": plan.to_dict(), "loss": hist["loss"]}


def _resumed(run, rank: int, world: int, ckpt: str) -> dict:
    with pytest.raises(Stop):
        run(rank, world, ckpt, stop=3)  # dies fetching the batch of step 3; the checkpoint holds step 2
    return run(rank, world, ckpt)


def _scenarios(rank: int, world: int, tmp: str) -> dict:
    return {"dap": _dap_steps(rank, world), "train": _train(rank, world),
            "train_resumed": _resumed(_train, rank, world, os.path.join(tmp, "train.pt")),
            "dap_finetune": _dap_finetune(rank, world),
            "dap_finetune_resumed": _resumed(_dap_finetune, rank, world, os.path.join(tmp, "dap.pt"))}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        torch.save(_scenarios(rank, world, tmp), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(2)]
    single_dir = tmp_path_factory.mktemp("single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _scenarios(0, 1, str(single_dir))
    finally:
        torch.set_num_threads(n)
    return ranks, single


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=rtol * 1e-3), k


def test_dap_ranks_make_identical_decisions(runs):
    (r0, r1), _ = runs
    for a, b in zip(r0["dap"]["records"], r1["dap"]["records"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k  # bit for bit: every rank computes from the same averaged numbers
    assert r0["dap"]["plan"] == r1["dap"]["plan"] and torch.equal(r0["dap"]["probe"], r1["dap"]["probe"])


def test_dap_under_ddp_equals_one_process_over_the_whole_batch(runs):
    (r0, _), single = runs
    for a, b in zip(r0["dap"]["records"], single["dap"]["records"], strict=True):
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["gate"], b["gate"])
        # ΔΨ and Taylor sums are float32: averaging over ranks rounds differently from one big batch, and the κ
        # goal's normalisations amplify that (measured: ~4e-6 relative)
        assert torch.allclose(a["goal"], b["goal"], rtol=1e-4, atol=1e-7)
    for a, b in zip(r0["dap"]["dpsi"], single["dap"]["dpsi"], strict=True):  # float32 sums of values ~1:
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-6)  # a few float32 ulps (measured: <= 4.8e-7)
    assert r0["dap"]["plan"] == single["dap"]["plan"]
    assert r0["dap_finetune"]["plan"] == r0["dap_finetune"]["plan"] == single["dap_finetune"]["plan"]


def test_training_under_ddp_equals_one_process_with_the_same_global_batch(runs):
    (r0, r1), single = runs
    assert all(torch.equal(r0["train"]["state"][k], r1["train"]["state"][k]) for k in r0["train"]["state"])
    _close(r0["train"]["state"], single["train"]["state"], rtol=1e-9)
    assert r0["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=1e-9)
    _close(r0["dap_finetune"]["state"], single["dap_finetune"]["state"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["train", "dap_finetune"])
def test_resume_equals_the_uninterrupted_run(runs, kind):
    ranks, single = runs
    for run in (*ranks, single):
        full, resumed = run[kind], run[f"{kind}_resumed"]
        assert full.keys() == resumed.keys()
        for k, v in full.items():
            if isinstance(v, dict) and all(torch.is_tensor(t) for t in v.values()):
                assert all(torch.equal(v[n], resumed[k][n]) for n in v), (kind, k)
            else:
                assert v == resumed[k], (kind, k)
