"""`lalora export-adapter RUN_DIR OUT`: a finished run's final global LoRA state as a PEFT adapter.

    lalora export-adapter runs/topics-minilm/la-lora/<hash> adapters/topics-la-lora [--force]

    from lalora.export import export_adapter, base_model, run_task
    export_adapter(run_dir, out)                          # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base_model(run_dir), out)   # same logits as the run's model

An OUT folder that exists and is not empty is refused unless ``--force`` (``force=True``): then
the adapter's files replace those of the same name, one by one, atomically.

What is exported: the global state of the last checkpoint (= the last round, the run having
`final.json`), i.e. every LoRA factor A, B and the head, as the server holds them. The folder is
written by PEFT itself (`get_peft_model(...).save_pretrained`), so key names and config fields are
PEFT's: `target_modules` lists the exact module names lalora injected (not the task's patterns: a
pattern like "proj" would also match Swin's patch-embedding conv in PEFT), `r`, `lora_alpha`,
`lora_dropout` from the run's layers, and the head in `modules_to_save`. `lalora_run.json` beside it
records where the adapter came from (task, method, config hash, ε spent), and `README.md` (the model
card, in place of PEFT's empty template) says it in words: method, task, ε, δ, σ, accountant, seed,
commit, accuracy.

The base model is the run's task model without LoRA (`base_model(run_dir)`): for a text task the
encoder + pooling + head module, for a Swin task the timm SwinTransformer with the pretrained
backbone. The task is rebuilt from the run's config.json and must have the same fingerprint (data
and backbone) as when the run was made. Methods that keep a LoRA factor on the clients (FedSA-LoRA's
B) have no single global adapter and are refused.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch, peft and the tasks load lazily, so `lalora --help` stays fast
    from torch import nn

__all__ = ["export_adapter", "base_model", "run_model", "run_task", "strip_lora", "model_card", "ExportError"]

_EXTRA_CONFIG_KEYS = ("hash", "task_fingerprint", "lalora_version")


class ExportError(ValueError):
    """The run folder cannot be exported (one line, for the CLI)."""


def _finished_run(run_dir):
    """(RunDir, RunConfig, config dict, global state) of a finished run, or ExportError."""
    from lalora.config import RunConfig
    from lalora.results import CheckpointCorruptedError, RunDir

    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise ExportError(f"RUN_DIR {str(rd.path)!r} is not a directory; expected a run folder "
                          "<runs-dir>/<task>/<method>/<hash>/")
    if not rd.config_path.exists():
        raise ExportError(f"RUN_DIR {str(rd.path)!r} is not a run folder (no config.json); expected "
                          "<runs-dir>/<task>/<method>/<hash>/")
    if not rd.is_finished():
        raise ExportError(f"RUN_DIR {str(rd.path)!r} is an unfinished run (no final.json): finish it "
                          "with `lalora run` (it resumes) before exporting")
    if not rd.has_checkpoint():
        raise ExportError(f"RUN_DIR {str(rd.path)!r} has no checkpoint.pt: its final state is gone")
    raw = rd.read_config()
    fields = {k: v for k, v in raw.items() if k not in _EXTRA_CONFIG_KEYS}
    if fields.get("epsilon") == "inf":       # RunConfig.to_dict writes inf as a string
        fields["epsilon"] = float("inf")
    try:
        cfg = RunConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ExportError(f"RUN_DIR {str(rd.path)!r}: config.json is not a lalora run config ({err})") from None
    try:
        payload = rd.load_checkpoint()
    except CheckpointCorruptedError as err:
        raise ExportError(str(err)) from None
    if cfg.rounds is not None and int(payload["round"]) != int(cfg.rounds):
        raise ExportError(f"RUN_DIR {str(rd.path)!r}: checkpoint is of round {payload['round']}, the run "
                          f"has {cfg.rounds} rounds; rerun it with `lalora run`")
    return rd, cfg, raw, dict(payload["global_state"])


def _task_of(cfg, raw: dict, task):
    from lalora.federated.runs import task_fingerprint
    from lalora.tasks import task_for_config

    if task is None:
        try:
            task = task_for_config(cfg)
        except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
            raise ExportError(f"cannot rebuild task {cfg.task!r} of the run: {err}") from None
    want = raw.get("task_fingerprint")
    if want is not None and task_fingerprint(task) != want:
        raise ExportError(f"task {cfg.task!r} differs from the run's (fingerprint {task_fingerprint(task)} "
                          f"!= {want}): its data or backbone changed since the run")
    return task


def run_task(run_dir):
    """The run's task (its test data, ``collate`` and ``forward``), rebuilt from config.json and
    checked against the run's fingerprint: what feeds an exported adapter data."""
    _, cfg, raw, _ = _finished_run(run_dir)
    return _task_of(cfg, raw, None)


def run_model(run_dir, *, task=None) -> tuple[nn.Module, object]:
    """(the run's model with its final global state loaded, eval mode; the task)."""
    _, cfg, raw, state = _finished_run(run_dir)
    task = _task_of(cfg, raw, task)
    return _model_with_state(cfg, task, state), task


def _model_with_state(cfg, task, state: dict) -> nn.Module:
    import torch

    from lalora.federated.methods import get_method
    from lalora.federated.state import ParamGroups

    with torch.random.fork_rng():         # seeded as the simulator builds it; the caller's RNG is kept
        torch.manual_seed(cfg.seed)
        model = task.build_model()
    groups = ParamGroups.from_model(model)
    known = set(groups.names())
    # A group the method never sends to the server (FedSA-LoRA: B and the head) stays at its initial
    # value in the global state: exporting it would silently drop what the clients learned.
    local = sorted(get_method(cfg.method).local_only & {"A", "B", "head"})
    missing = sorted(set(groups.names(("A", "B"))) - set(state))
    if local or missing:
        what = ", ".join(local) if local else missing[0]
        raise ExportError(f"method {cfg.method!r} keeps {what} on the clients: the run has no single "
                          "global adapter to export")
    unknown = sorted(set(state) - known)
    if unknown:
        raise ExportError(f"the run's global state has parameters this task's model lacks: {unknown[:3]}")
    outside = [n for n in groups.params["head"] if not n.startswith(task.head_name + ".")]
    if outside:   # PEFT's modules_to_save holds the head only: anything else trained would be lost
        raise ExportError(f"trainable parameters outside the head {task.head_name!r}: {outside[:3]}")
    groups.set_state(state)
    return model.eval()


def strip_lora(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every LoRALinear replaced by its frozen base nn.Linear."""
    from lalora.lora import LoRALinear

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, m.base)
    return out


def base_model(run_dir, *, task=None) -> nn.Module:
    """The run's task model without LoRA and with the untrained head: what PEFT loads OUT onto."""
    import torch

    _, cfg, raw, _ = _finished_run(run_dir)
    task = _task_of(cfg, raw, task)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return strip_lora(task.build_model()).eval()


def _lora_config(model: nn.Module, head_name: str):
    from peft import LoraConfig

    from lalora.lora import LoRALinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ExportError("the run's model has no LoRA layer")
    shapes = {(m.r, m.alpha, m.dropout.p) for m in layers.values()}
    if len(shapes) != 1:
        raise ExportError(f"LoRA layers differ in (r, alpha, dropout): {sorted(shapes)}; PEFT needs one")
    r, alpha, dropout = shapes.pop()
    return LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
                      target_modules=sorted(layers), modules_to_save=[head_name])


def export_adapter(run_dir, out, *, task=None, force: bool = False) -> Path:
    """Write the run's final global LoRA state to `out` as a PEFT adapter folder; returns `out`.

    `task`: the run's Task object, for a task that is not in the registry (tests); by default it is
    rebuilt from config.json. ``force``: write into an existing non-empty ``out``."""
    import torch
    from peft import get_peft_model

    from lalora.lora import copy_lora_weights
    from lalora.results import atomic_write_bytes, atomic_write_json, read_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"OUT {str(out)!r} exists and is not empty; pass --force to replace its adapter "
                          "files, or give a new folder")
    rd, cfg, raw, state = _finished_run(run_dir)
    task = _task_of(cfg, raw, task)
    model = _model_with_state(cfg, task, state)
    head_name = task.head_name
    peft_model = get_peft_model(strip_lora(model), _lora_config(model, head_name))
    copy_lora_weights(model, peft_model)
    head = peft_model.base_model.model.get_submodule(head_name)
    with torch.no_grad():
        head.modules_to_save["default"].load_state_dict(model.get_submodule(head_name).state_dict())
    # PEFT writes into a scratch folder; each file is then moved in with the atomic writer, so no
    # file of OUT is ever half-written (a re-export replaces them one by one).
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        peft_model.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            atomic_write_bytes(out / f.name, f.read_bytes())
    final = read_json(rd.final_path)
    atomic_write_bytes(out / "README.md", model_card(cfg, raw, final, out.name).encode())
    atomic_write_json(out / "lalora_run.json", {
        "run_dir": str(rd.path.resolve()), "task": cfg.task, "method": cfg.method,
        "hash": raw.get("hash"), "rounds": cfg.rounds, "epsilon_spent": final.get("epsilon_spent"),
        "delta": final.get("delta"), "accuracy": final.get("accuracy"), "head": head_name})
    return out


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):   # to_jsonable writes inf/nan as strings
        return value
    return format(value, spec)


def model_card(cfg, raw: dict, final: dict, name: str) -> str:
    """The adapter's README.md: what was trained, on what, with which privacy guarantee, and from
    which commit, so an adapter passed on alone still says what it is."""
    git = (final.get("provenance") or {}).get("git") or {}
    commit = git.get("commit") or "unknown (not a git checkout)"
    if git.get("dirty"):
        commit += " (with uncommitted changes to the source)"
    if final.get("privacy"):   # dp-mode as-released
        privacy = [f"- privacy: **{final['privacy']}** (dp-mode as-released): no ε is claimed"]
    elif not final.get("private", True):
        privacy = ["- privacy: **none** (ε = inf, no noise): not differentially private"]
    else:
        privacy = [f"- ε spent: {_fmt(final.get('epsilon_spent'))} (max over clients; target "
                   f"{_fmt(final.get('target_epsilon'))}), δ = {_fmt(final.get('delta'), 'g')}",
                   f"- noise multiplier σ: {_fmt(final.get('noise_multiplier'))}, clip norm "
                   f"{_fmt(final.get('clip_norm'), 'g')} ({cfg.clipping} clipping, per sample)",
                   f"- accountant: {final.get('accountant', cfg.accountant)} (Opacus), Poisson sampling"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(cfg.task_overrides.items())) or "none"
    return "\n".join([
        f"# {name}: LoRA adapter from a lalora run",
        "",
        f"A PEFT LoRA adapter (and classifier head) trained by **{cfg.method}** on the task "
        f"**{cfg.task}** with federated, sample-level differentially private training "
        "([lalora](https://arxiv.org/abs/2602.19926)).",
        "",
        *privacy,
        f"- seed: {cfg.seed} (client sampling, Poisson batches and DP noise are derived from it); "
        f"task options: {options}",
        f"- rounds: {cfg.rounds}, local steps: {cfg.local_steps}, clients: {cfg.clients} "
        f"({cfg.clients_per_round} per round), LoRA r = {cfg.r}, α = {cfg.alpha}",
        f"- test accuracy of the run: {_fmt(final.get('accuracy'), '.4f')}",
        f"- lalora {raw.get('lalora_version', '?')}, commit {commit}, run config hash {raw.get('hash')}",
        "",
        "Load it onto the run's base model (the task's model without LoRA):",
        "",
        "```python",
        "from peft import PeftModel",
        "from lalora.export import base_model, run_task",
        "",
        "task = run_task(run_dir)   # run_dir: the run folder this adapter was exported from",
        f"model = PeftModel.from_pretrained(base_model(run_dir, task=task), {name!r}).eval()",
        "logits = task.forward(model, task.collate([task.test[0]]))",
        "```",
        "",
        "`lalora_run.json` holds the same facts as JSON.",
        "",
    ])


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("export-adapter", help="a finished run's LoRA state as a PEFT adapter folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder <runs-dir>/<task>/<method>/<hash>")
    p.add_argument("out", metavar="OUT", help="folder to write adapter_config.json + adapter_model.safetensors "
                                             "+ README.md (model card)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it exists and is not empty")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        out = export_adapter(args.run_dir, args.out, force=args.force)
    except ExportError as err:
        print(f"lalora export-adapter: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote PEFT adapter to {out} (load with PeftModel.from_pretrained(base_model, {str(out)!r}))")
    return 0
