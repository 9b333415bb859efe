"""RunConfig.device / .precision and `lalora run --device --precision`: validation names the field
(one line, exit 2 in the CLI), "auto" resolves to the device actually used and is part of the hash,
a bf16 run trains, and CPU runs stay deterministic."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_federated import tiny_config, tiny_task  # noqa: E402

import lalora  # noqa: E402
from lalora.cli import main  # noqa: E402
from lalora.config import RunConfig, resolve_device  # noqa: E402
from lalora.federated.simulation import Simulator  # noqa: E402
from lalora.results import config_hash  # noqa: E402
from lalora.tasks import TASKS  # noqa: E402

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("field, value", [("device", "tpu"), ("device", "cuda:x"), ("device", 0),
                                          ("precision", "fp16"), ("precision", "bfloat16")])
def test_unknown_device_or_precision_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RunConfig(task="tiny", method="la-lora", **{field: value})


@pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-only refusal")
def test_cuda_without_cuda_is_refused_at_resolve():
    cfg = RunConfig(task="tiny", method="la-lora", device="cuda")   # a config may name a GPU...
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        cfg.resolve({})                                              # ...but cannot run on one here
    with pytest.raises(ValueError, match="device='cuda:1'"):
        resolve_device("cuda:1")


def test_auto_resolves_to_the_device_used_and_is_hashed():
    cfg = RunConfig(task="tiny", method="la-lora").resolve({})
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.precision == "fp32"
    bf16 = RunConfig(task="tiny", method="la-lora", precision="bf16").resolve({})
    h = config_hash(cfg.to_dict(), lalora.__version__)
    assert config_hash(bf16.to_dict(), lalora.__version__) != h
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(TASKS, "tiny", lambda: tiny_task())


@pytest.mark.parametrize("flag, value, field", [("--device", "tpu", "device"), ("--precision", "fp8", "precision")]
                         + ([("--device", "cuda", "device")] if NO_CUDA else []))
def test_cli_bad_device_or_precision_is_one_line_exit_2(tiny_registered, tmp_path, capsys, flag, value, field):
    code = main(["run", "--task", "tiny", "--method", "la-lora", flag, value, "--rounds", "1",
                 "--runs-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


def _train(cfg):
    sim = Simulator(cfg, task=tiny_task())
    state = sim.initial_global_state()
    upd = sim.client_update(sim.sampled_clients(1)[0], 1, state)
    return sim, upd


def test_cpu_run_places_everything_on_the_device_and_is_deterministic():
    sim, a = _train(tiny_config("la-lora", device="cpu"))
    assert sim.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in sim.model.parameters())
    assert all(g.device.type == "cpu" for g in sim.noise_generators + sim.sampling_generators)
    _, b = _train(tiny_config("la-lora", device="cpu"))
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_bf16_run_trains_close_to_fp32():
    """The same client round in bf16 (autocast forward, fp32 weights and per-sample gradients):
    the update differs from fp32 (bf16 really ran) but by less than 5% of the update's size."""
    sim32, a = _train(tiny_config("dp-lora", device="cpu", epsilon=float("inf")))
    sim16, b = _train(tiny_config("dp-lora", device="cpu", epsilon=float("inf"), precision="bf16"))
    init = sim32.initial_global_state()
    assert all(v.dtype == torch.float32 for v in b.state.values())
    diff = max((b.state[k] - a.state[k]).abs().max().item() for k in a.state)
    step = max((a.state[k] - init[k]).abs().max().item() for k in a.state)
    assert 0 < diff <= 0.05 * step
    ev = sim16.evaluate(sim16.initial_global_state())
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_bf16_private_round_runs_and_is_finite():
    _, upd = _train(tiny_config("la-lora", device="cpu", precision="bf16"))
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in upd.state.values())
