"""Scale-out: candidates sharded over 2 CPU processes (gloo) give exactly the single-process scores and plans."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_upvits import ALL, images, small

import vitprune_fast as vpf
from vitprune_fast.score import screened
from vitprune_fast.score.upvits import FastEngine


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores = vpf.upvits_scores(small("deit"), images(6), ALL, batch_size=2, progress=False)
        save_file({k: v.contiguous() for k, v in scores.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    out = str(tmp_path / "scores")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    single = vpf.upvits_scores(small("deit"), images(6), ALL, batch_size=2, progress=False)
    for rank in range(2):
        got = load_file(f"{out}.{rank}")
        assert got.keys() == single.keys()
        for k in single:
            assert torch.equal(got[k], single[k]), (rank, k)


def _screened_worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan, report = vpf.upvits_select(small("swin"), images(6), 0.5, batch_size=2, progress=False,
                                         checkpoint=f"{out}.ck")
        save_file({k: v.contiguous() for k, v in plan.keep.items()}, f"{out}.{rank}")
        torch.save(report["scored_exactly"], f"{out}.{rank}.n")
    finally:
        dist.destroy_process_group()


def test_screened_selection_sharded_over_two_processes_equals_one_process(tmp_path, monkeypatch):
    """The screen's image chunks and every exact evaluation are sharded; the plan and the work done are the same."""
    out = str(tmp_path / "plan")
    mp.spawn(_screened_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    plan, report = vpf.upvits_select(small("swin"), images(6), 0.5, batch_size=2, progress=False)
    for rank in range(2):
        got = load_file(f"{out}.{rank}")
        assert got.keys() == plan.keep.keys()
        assert all(torch.equal(got[k], plan.keep[k]) for k in got), rank
        assert torch.load(f"{out}.{rank}.n") == report["scored_exactly"]
    # the ranks wrote the checkpoint: a single process resumes from it without scoring anything again

    def refuse(*a, **kw):
        raise AssertionError("scored again")

    monkeypatch.setattr(FastEngine, "score_candidates", refuse)
    monkeypatch.setattr(screened, "second_order_screen", refuse)
    again, _ = vpf.upvits_select(small("swin"), images(6), 0.5, batch_size=2, progress=False, checkpoint=f"{out}.ck")
    assert all(torch.equal(again.keep[k], plan.keep[k]) for k in plan.keep)
