"""Scale-out: candidates sharded over 2 CPU processes (gloo) give exactly the single-process scores."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_upvits import ALL, images, small

import vitprune_fast as vpf


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
