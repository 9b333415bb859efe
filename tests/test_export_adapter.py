"""`lalora export-adapter`: a finished run's final global LoRA state as a PEFT adapter folder.

`PeftModel.from_pretrained(base, OUT)` must give the same logits as lalora's model with the run's
final global state: max |Δlogits| <= 1e-5 in float32, on MiniLM (topics-minilm, a tiny run in a
temporary runs dir) and on Swin (digits-swin with a 0-epoch pretraining, PEFT on the timm model with
the same target modules). Bad input (not a run folder, an unfinished run, a method that keeps B on
the clients) is one line on stderr and exit 2.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_federated import tiny_task  # noqa: E402

from lalora.cli import main  # noqa: E402
from lalora.config import RunConfig  # noqa: E402
from lalora.export import ExportError, base_model, export_adapter, run_model  # noqa: E402
from lalora.federated.runs import run_experiment  # noqa: E402
from lalora.results import RunDir  # noqa: E402
from lalora.tasks import TASKS  # noqa: E402

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.fixture(autouse=True)
def offline_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(TASKS, "tiny", lambda **kw: tiny_task())


def finished_run(runs_dir, task, method="dp-lora", **kw) -> str:
    cfg = RunConfig(task=task, method=method, **{"epsilon": 3.0, "seed": 0, **kw})
    return run_experiment(cfg, runs_dir=runs_dir, progress=False).run_dir


def max_logit_gap(run_dir, out, batch_size=8) -> tuple[float, float]:
    """(max |lalora logits - PEFT logits|, max |lalora logits - base logits|) on the test split;
    also checks PEFT put LoRA on exactly the layers lalora did (no more, no fewer)."""
    from peft import PeftModel

    from lalora.lora import canonical_name, lora_modules

    ours, task = run_model(run_dir)
    base = base_model(run_dir)
    batch = task.collate([task.test[i] for i in range(min(batch_size, len(task.test)))])
    with torch.no_grad():
        want = task.forward(ours, batch)
        base_logits = task.forward(base, batch)
        theirs = PeftModel.from_pretrained(base, str(out)).eval()
        got = task.forward(theirs, batch)
    assert {canonical_name(n) for n in lora_modules(theirs)} == set(lora_modules(ours))
    assert want.dtype == torch.float32 and want.shape == got.shape
    return float((got - want).abs().max()), float((base_logits - want).abs().max())


def check_adapter_folder(out, n_layers, head_keys):
    from safetensors.torch import load_file

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
    b_keys = [k for k in tensors if k.endswith("lora_B.weight")]
    assert len(a_keys) == len(b_keys) == n_layers and cfg["target_modules"]
    assert all(k.startswith("base_model.model.") for k in tensors)       # PEFT's key names
    assert {k for k in tensors if "lora_" not in k} == head_keys
    assert json.loads((out / "lalora_run.json").read_text())["method"]
    return cfg, tensors


@pytest.mark.slow   # ~30 s on the shared 2-core box: loading the corpus + MiniLM dominates
def test_minilm_run_round_trips_through_peft(tmp_path):
    run_dir = finished_run(tmp_path / "runs", "topics-minilm", rounds=1, local_steps=1, clients=2,
                           clients_per_round=1, batch_size=4, r=4, alpha=8.0, lr=5e-3,
                           task_overrides={"max_train_samples": 16})
    out = tmp_path / "adapter"
    assert main(["export-adapter", run_dir, str(out)]) == 0
    cfg, tensors = check_adapter_folder(
        out, 6 * 4, {"base_model.model.head.weight", "base_model.model.head.bias"})
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["modules_to_save"] == ["head"]
    assert set(cfg["target_modules"]) == {"query", "key", "value", "attention.output.dense"}  # PEFT shortens
    # the exported B is the run's (non-zero after training), not a fresh init
    assert max(float(tensors[k].abs().max()) for k in tensors if k.endswith("lora_B.weight")) > 0
    gap, moved = max_logit_gap(run_dir, out)
    assert gap <= TOL, f"max |Δlogits| {gap:.2e} > {TOL}"
    assert moved > 100 * TOL, "the trained adapter should change the logits (else the test is vacuous)"


def test_swin_run_round_trips_through_peft_on_the_timm_model(tmp_path):
    run_dir = finished_run(tmp_path / "runs", "digits-swin", rounds=1, local_steps=1, clients=2,
                           clients_per_round=1, batch_size=4,
                           task_overrides={"pretrain_epochs": 0, "max_train_samples": 16})
    out = tmp_path / "adapter"
    export_adapter(run_dir, out)
    base = base_model(run_dir)
    from timm.models.swin_transformer import SwinTransformer
    assert isinstance(base, SwinTransformer)
    ours, _ = run_model(run_dir)
    n_lora = sum(type(m).__name__ == "LoRALinear" for m in ours.modules())
    cfg, _ = check_adapter_folder(out, n_lora, {"base_model.model.head.fc.weight",
                                                "base_model.model.head.fc.bias"})
    gap, moved = max_logit_gap(run_dir, out)
    assert gap <= TOL, f"max |Δlogits| {gap:.2e} > {TOL}"
    assert moved > 100 * TOL


def test_tiny_run_exports_and_overwrites(tmp_path):
    run_dir = finished_run(tmp_path / "runs", "tiny", rounds=2)
    out = tmp_path / "a" / "adapter"
    export_adapter(run_dir, out)
    with pytest.raises(ExportError, match="exists and is not empty; pass --force"):
        export_adapter(run_dir, out)             # never overwrites silently
    export_adapter(run_dir, out, force=True)     # with force, a second export replaces the files in place
    check_adapter_folder(out, 2, {"base_model.model.head.weight", "base_model.model.head.bias"})
    gap, moved = max_logit_gap(run_dir, out, batch_size=48)
    assert gap <= TOL and moved > 100 * TOL
    # the comparison can fail: an adapter with one B changed no longer matches lalora's logits
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    gap, _ = max_logit_gap(run_dir, out, batch_size=48)
    assert gap > 10 * TOL


def _one_line_exit_2(capsys, argv, match):
    capsys.readouterr()     # drop the notices of the runs made to export (σ calibration)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    out = str(tmp_path / "adapter")
    _one_line_exit_2(capsys, ["export-adapter", str(tmp_path / "nope"), out], "is not a directory")
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(capsys, ["export-adapter", str(tmp_path / "empty"), out], "not a run folder")
    run_dir = finished_run(tmp_path / "runs", "tiny", rounds=2)
    RunDir(run_dir).final_path.unlink()           # as if killed before the end
    _one_line_exit_2(capsys, ["export-adapter", run_dir, out], "unfinished run")
    fedsa = finished_run(tmp_path / "runs", "tiny", method="fedsa-lora", rounds=1)
    _one_line_exit_2(capsys, ["export-adapter", fedsa, out], "no single global adapter")
    (tmp_path / "file").write_text("x")
    run_dir = finished_run(tmp_path / "runs2", "tiny", rounds=1)
    _one_line_exit_2(capsys, ["export-adapter", run_dir, str(tmp_path / "file")], "not a directory")
    assert not Path(out).exists()


def test_model_card_says_what_the_adapter_is(tmp_path):
    """README.md in the adapter folder is lalora's card (not PEFT's empty template): method, task,
    ε, δ, σ, accountant, seed and commit, read from the run's final.json."""
    run_dir = finished_run(tmp_path / "runs", "tiny", rounds=2, seed=3)
    out = tmp_path / "adapter"
    assert main(["export-adapter", run_dir, str(out)]) == 0
    final = json.loads(RunDir(run_dir).final_path.read_text())
    card = (out / "README.md").read_text()
    assert "[More Information Needed]" not in card            # PEFT's template is gone
    for fact in ("**dp-lora**", "**tiny**", f"{final['epsilon_spent']:.4g}", f"δ = {final['delta']:g}",
                 f"σ: {final['noise_multiplier']:.4g}", f"accountant: {final['accountant']}", "seed: 3",
                 f"commit {final['provenance']['git']['commit']}"):
        assert fact in card, fact
    assert oct(os.stat(out / "README.md").st_mode & 0o777) == oct(0o666 & ~_umask())
    assert main(["export-adapter", run_dir, str(out)]) == 2                 # not empty, no --force
    assert main(["export-adapter", run_dir, str(out), "--force"]) == 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
