"""Drivers over federated runs (lalora.analysis.probe) on the tiny synthetic task."""
import math

import numpy as np
import pytest
import torch

from lalora.analysis import probe
from lalora.analysis.toy import toy_task
from lalora.config import RunConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task():
    return toy_task()


def test_alignment_trace_shapes_and_rolora_nans(task):
    # epsilon = inf: no σ calibration (seconds of accountant work) is needed for a pipeline test.
    la = probe.alignment_trace(RunConfig(task="toy", method="la-lora", epsilon=math.inf, rounds=2), task=task)
    assert la["rounds"] == [1, 2] and len(la["BA"]) == 2
    assert all(-1 <= v <= 1 for v in la["A"] + la["B"] + la["BA"])
    ro = probe.alignment_trace(RunConfig(task="toy", method="rolora", epsilon=math.inf, rounds=2), task=task)
    # RoLoRA trains B in round 1 and A in round 2: the idle factor's cosine is undefined.
    assert math.isnan(ro["A"][0]) and not math.isnan(ro["B"][0])
    assert math.isnan(ro["B"][1]) and not math.isnan(ro["A"][1])
    # Without noise, IID clients starting from the same point move in similar directions.
    assert np.nanmean(la["BA"]) > 0.3


def test_load_global_model_and_sharpness(task, tmp_path):
    from lalora.federated.runs import run_experiment

    cfg = RunConfig(task="toy", method="dp-lora", epsilon=math.inf, rounds=2)
    res = run_experiment(cfg, runs_dir=tmp_path, task=task, progress=False)
    model, _, state = probe.load_global_model(res.run_dir, res.config, task=task)
    for name, p in model.named_parameters():
        if name in state:
            torch.testing.assert_close(p.detach(), state[name])
    batches = probe.evaluation_batches(task.train, task.collate, 64, batch_size=32)
    assert sum(len(b["labels"]) for b in batches) == 64
    s = probe.sharpness(model, task.forward, batches, lanczos_iters=30, power_iters=60, landscape_points=5,
                        grid_points=3)
    # Lanczos and power iteration agree on the top eigenvalue (power converges slower: 2 %).
    assert s["top_eigenvalue"] > 0
    assert s["power"]["eigenvalue"] == pytest.approx(s["top_eigenvalue"], rel=0.02)
    # The centre of the landscape is the model's own loss.
    assert s["landscape_1d"]["loss"][2] == pytest.approx(s["loss"], rel=1e-12)
    assert np.asarray(s["landscape_2d"]["loss"]).shape == (3, 3)
    with pytest.raises(ValueError, match="run_dir"):
        probe.load_global_model(str(tmp_path), res.config, task=task)
