"""DPTrainer under DistributedDataParallel: 2 processes (gloo, CPU) equal one process (issue 31).

Each process runs DPTrainer with per_device_train_batch_size=3 (q = 3·2/24, as one process with 6);
all draw the same Poisson batch and keep their share, dp_gradient(distributed=True) all-reduces the
clipped sums and rank 0 adds the seeded noise once. After 3 steps both processes hold the same
LoRA weights, equal (1e-6 relative) to one process with per_device_train_batch_size=6 and the same
seeds, with gradient accumulation (2 micro-batches) too; the accountant counts 3 steps on each.
Slow: starting two Trainer processes takes ~1 min on the shared machine.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("opacus")
pytest.importorskip("peft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out_dir, per_device, accumulation, tag):
    from test_hf_trainer import Data, args, ce, peft_net

    from dplora_kernels.hf import DPTrainer

    model = peft_net()
    ddp = {} if tag == "single" else {"ddp_backend": "gloo"}
    trainer = DPTrainer(model=model, args=args(Path(out_dir), per_device_train_batch_size=per_device, max_steps=3,
                                               gradient_accumulation_steps=accumulation, **ddp),
                        train_dataset=Data(), noise_multiplier=1.0, target_delta=1e-5, clip_norm=0.3,
                        per_sample_loss=ce, secure=False, noise_seed=11, sampling_seed=5, backend="torch")
    trainer.train()
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer, state, tag


def _worker(rank, world, port, out_dir, accumulation):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    trainer, state, _ = _train(out_dir, 3, accumulation, rank)
    assert trainer.args.world_size == 2 and trainer.sample_rate == 0.25
    torch.save({"state": state, "dp_steps": trainer.dp_steps, "history": trainer.accountant.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_process_trainer_equals_one_process(tmp_path, accumulation):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), accumulation), nprocs=2, join=True)
    from test_hf_trainer import peft_net

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    w0 = {n: p.detach().clone() for n, p in peft_net().named_parameters() if p.requires_grad}
    single, state, _ = _train(tmp_path / "single", 6, accumulation, "single")
    assert single.sample_rate == 0.25
    for r in ranks:
        assert r["dp_steps"] == 3 and r["history"] == single.accountant.history == [(1.0, 0.25, 3)]
    for n, w in state.items():
        assert torch.equal(ranks[0]["state"][n], ranks[1]["state"][n]), n
        moved = (w - w0[n]).abs().max()
        assert moved > 0, n
        assert (ranks[0]["state"][n] - w).abs().max() <= 1e-6 * moved, n
