"""Run folders: atomic writes, JSONL metrics (torn last line tolerated), checksummed checkpoints
that refuse corruption, config hashing."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lalora.config import RunConfig
from lalora.results import (CheckpointCorruptedError, RunDir, atomic_write_json, config_hash,
                            load_checkpoint, read_json, read_jsonl, save_checkpoint)


def test_atomic_json_roundtrip_and_no_temp_files_left(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write_json(p, {"a": 1, "eps": math.inf, "t": torch.tensor([1.5, 2.0])})
    atomic_write_json(p, {"a": 2, "eps": math.inf, "t": torch.tensor([1.5, 2.0])})
    assert read_json(p) == {"a": 2, "eps": "inf", "t": [1.5, 2.0]}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_checkpoint_roundtrip_and_corruption_refused(tmp_path):
    p = tmp_path / "ckpt.pt"
    payload = {"round": 3, "state": {"w": torch.arange(6.0).reshape(2, 3)}, "rng": torch.get_rng_state(),
               "ledger": {"clients": [{"client": 0, "history": [[1.2, 0.1, 20]]}]}, "none": None,
               "py": [3, (1, 2, 3), None]}
    save_checkpoint(p, payload)
    back = load_checkpoint(p)
    assert back["round"] == 3 and torch.equal(back["state"]["w"], payload["state"]["w"])
    assert torch.equal(back["rng"], payload["rng"]) and back["ledger"] == payload["ledger"]
    raw = bytearray(p.read_bytes())
    raw[-10] ^= 0xFF   # flip one byte of the payload
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptedError, match="corrupted"):
        load_checkpoint(p)
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointCorruptedError, match="not a lalora checkpoint"):
        load_checkpoint(p)
    p.write_bytes(bytes(raw[: len(raw) // 2]))   # truncated file
    with pytest.raises(CheckpointCorruptedError):
        load_checkpoint(p)


def test_metrics_jsonl_append_truncate_and_torn_line(tmp_path):
    rd = RunDir(tmp_path / "run")
    for t in (1, 2, 3):
        rd.append_metrics({"round": t, "acc": t / 10, "eps": math.inf})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]
    assert rd.read_metrics()[0]["eps"] == "inf"
    with open(rd.metrics_path, "a") as fh:   # a crash in the middle of an append
        fh.write('{"round": 4, "ac')
    assert [r["round"] for r in read_jsonl(rd.metrics_path)] == [1, 2, 3]
    assert [r["round"] for r in rd.truncate_metrics(2)] == [1, 2]
    assert [json.loads(x)["round"] for x in rd.metrics_path.read_text().splitlines()] == [1, 2]
    with open(rd.metrics_path, "w") as fh:
        fh.write('{"round": 1}\nbroken\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        rd.read_metrics()


def test_run_dir_layout_and_finished_flag(tmp_path):
    rd = RunDir.for_config(tmp_path, "digits-swin", "la-lora", "abc123")
    assert rd.path == tmp_path / "digits-swin" / "la-lora" / "abc123"
    assert not rd.is_finished()
    rd.write_final({"accuracy": 0.5})
    assert rd.is_finished() and rd.read_final() == {"accuracy": 0.5}
    rd.reset()
    assert not rd.is_finished()


def test_config_hash_depends_on_every_field_and_version():
    a = RunConfig(task="t", method="la-lora", rounds=3)
    h = config_hash(a.to_dict(), "0.1.0")
    assert h == config_hash(RunConfig(task="t", method="la-lora", rounds=3).to_dict(), "0.1.0")
    assert h != config_hash(a.replace(rounds=4).to_dict(), "0.1.0")
    assert h != config_hash(a.replace(epsilon=math.inf).to_dict(), "0.1.0")
    assert h != config_hash(a.to_dict(), "0.2.0")
    assert len(h) == 12


def test_run_config_validation_names_the_field():
    with pytest.raises(ValueError, match="method"):
        RunConfig(task="t", method="lora")
    with pytest.raises(ValueError, match="epsilon"):
        RunConfig(task="t", method="dp-lora", epsilon=0)
    with pytest.raises(ValueError, match="clients_per_round"):
        RunConfig(task="t", method="dp-lora", clients=2, clients_per_round=3)
    with pytest.raises(ValueError, match="rounds"):
        RunConfig(task="t", method="dp-lora", rounds=0)
    with pytest.raises(ValueError, match="optimizer"):
        RunConfig(task="t", method="dp-lora", optimizer="adam")
    with pytest.raises(ValueError, match="unknown RunConfig field"):
        RunConfig.from_dict({"task": "t", "method": "dp-lora", "epochs": 3})


def test_run_config_resolves_from_task_defaults_and_roundtrips():
    cfg = RunConfig(task="t", method="la-lora", epsilon="inf", rounds=7)
    res = cfg.resolve({"rounds": 99, "lr": 0.05, "batch_size": 8})
    assert res.rounds == 7 and res.lr == 0.05 and res.batch_size == 8   # user > task > fallback
    assert res.local_steps == 20 and res.filter is True                   # fallback, method default
    assert not res.private and math.isinf(res.epsilon)
    d = res.to_dict()
    assert d["epsilon"] == "inf"
    assert RunConfig.from_dict(json.loads(json.dumps(d))) == res
    assert RunConfig(task="t", method="fedavg-lora", epsilon=3).private is False


def test_to_jsonable_handles_numpy_arrays_and_scalars():
    import numpy as np

    from lalora.results import to_jsonable

    out = to_jsonable({"idx": np.arange(3), "x": np.float32(1.5), "m": np.array([[np.inf]])})
    assert out == {"idx": [0, 1, 2], "x": 1.5, "m": [["inf"]]}
