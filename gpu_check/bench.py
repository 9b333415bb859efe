"""GPU benchmark for issue 12's targets. Writes $OUT/bench.json and $OUT/bench.md (a table with the GPU
name, to paste into benchmarks/RESULTS.md).

Part A, kernels vs memory bandwidth: device copy bandwidth (torch copy_ of 1 GiB, read + write bytes /
time), then each kernel's effective bandwidth (bytes it must move / time, CUDA events, median of 20)
as a fraction of it; the per-sample kernel for RoBERTa q/v (r = 8: outer-product path and forced tl.dot
path) and Swin-B stage-1 qkv shapes, the clip + sum + noise kernel over a RoBERTa-sized arena.
Part B, whole training steps (median ms per step; methods interleaved round-robin; peak memory per
method): RoBERTa-base (random init from RobertaConfig, N=32, T=128, r=8 on query,value, bf16 autocast)
and Swin-B 224² (timm, pretrained=False, N=32, r=16 on attn.qkv,attn.proj, bf16 autocast): non-private
LoRA step, dplora_kernels.dp_gradient (triton, and torch backend), Opacus hooks and ghost clipping when
opacus is importable and runs on the model. Targets: DP step <= 1.05x non-private, >= 1.5x faster than
Opacus (RoBERTa), peak memory <= 1.05x non-private, each kernel >= 70% of copy bandwidth.
"""

import copy
import os
import statistics
import sys
import time
import traceback

from common import DRY, OUT as OUT_DIR, dev, gpu_name, peak_mib, sync, time_ms, write_json

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dplora_kernels as dk  # noqa: E402
from dplora_kernels import triton_kernels as tk  # noqa: E402

QUICK = os.environ.get("QUICK", "0") == "1"
C, SIGMA = 1.0, 1.0
OUT = {"gpu": gpu_name(), "dry_run": DRY, "kernels": [], "steps": []}


# ------------------------------------------------------------------------------------------- part A
def copy_bandwidth() -> float:
    n = (1 << 20) if DRY else (1 << 28)            # fp32 elements: 1 GiB on the GPU
    src, dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def kernels_vs_bandwidth():
    bw = copy_bandwidth()
    OUT["copy_GBps"] = bw
    print(f"== A. device copy bandwidth {bw:.0f} GB/s; kernels' effective bandwidth as a fraction of it", flush=True)
    shapes = [("roberta q/v grad_A r=8", 32, 128, 8, 768), ("swin-B s1 qkv grad_A r=16", 32, 64 * 49, 16, 128)]
    if DRY:
        shapes = [("tiny r=8", 2, 16, 8, 24), ("tiny r=16", 2, 16, 16, 24)]
    for label, N, L, r, n in shapes:
        v = torch.randn(N, L, r, device=dev, dtype=torch.bfloat16)
        x = torch.randn(N, L, n, device=dev, dtype=torch.bfloat16)
        out = torch.empty(N, r, n, device=dev)
        nbytes = v.numel() * 2 + x.numel() * 2 + out.numel() * 4 + N * 4
        for use_dot in ((False, True) if r <= tk.FMA_MAX_P else (True,)):
            ms = time_ms(lambda: tk.per_sample_outer(v, x, out, 1.0, use_dot=use_dot))
            gbps = nbytes / (ms * 1e-3) / 1e9
            OUT["kernels"].append(dict(kernel="per_sample_outer", shape=label, use_dot=use_dot, ms=ms,
                                       GBps=gbps, frac_copy=gbps / bw))
            print(f"  per_sample_outer {label:28s} use_dot={use_dot!s:5s} {ms:8.4f} ms {gbps:7.0f} GB/s "
                  f"= {gbps / bw:.0%} of copy", flush=True)
    N, P = (3, 5000) if DRY else (32, 24 * 2 * 8 * (768 + 768))   # RoBERTa q,v LoRA: 24 modules x (A + B)
    arena = torch.randn(N, P, device=dev)
    sq = arena.pow(2).sum(1)
    z = torch.randn(P, device=dev)
    ms = time_ms(lambda: tk.grouped_clip_sum_noise([arena], sq, None, 1.0, z, 1.0))
    gbps = (arena.numel() * 4 + 2 * P * 4) / (ms * 1e-3) / 1e9
    OUT["kernels"].append(dict(kernel="clip_sum_noise", shape=f"N={N} P={P}", ms=ms, GBps=gbps, frac_copy=gbps / bw))
    print(f"  clip_sum_noise N={N} P={P}: {ms:.4f} ms {gbps:.0f} GB/s = {gbps / bw:.0%} of copy", flush=True)


# ------------------------------------------------------------------------------------------- part B
class RobertaClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import RobertaConfig, RobertaModel
        cfg = RobertaConfig() if not DRY else RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                            intermediate_size=64, vocab_size=100)
        cfg._attn_implementation = "sdpa"
        self.backbone = RobertaModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids):
        return self.head(self.backbone(input_ids=input_ids).last_hidden_state[:, 0])


def build_swin():
    import timm
    if DRY:
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(1, 1),
                               num_heads=(2, 2), num_classes=10)
    return timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10)


def workloads():
    N = 3 if DRY else (8 if QUICK else 32)
    g = torch.Generator().manual_seed(0)
    T, img, vocab = (8, 56, 100) if DRY else (128, 224, 50000)
    rob = (torch.randint(5, vocab, (N, T), generator=g), torch.randint(0, 2, (N,), generator=g))
    swin = (torch.randn(N, 3, img, img, generator=g), torch.randint(0, 10, (N,), generator=g))
    return [(f"RoBERTa-base N={N} T={T} r=8 q,v bf16", RobertaClassifier, ["query", "value"], 8, "head", rob),
            (f"Swin-B {img}px N={N} r=16 qkv,proj bf16", build_swin, ["attn.qkv", "attn.proj"], 16, "head.fc", swin)]


def make_step(method, model, batch):
    x, y = batch
    N = x.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)
    ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)   # noqa: E731

    def loss_fn(mm, b):
        with ac():
            out = mm(b[0])
        return nn.functional.cross_entropy(out.float(), b[1], reduction="none")

    if method == "non-private":
        def step():
            loss_fn(model, batch).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if method.startswith("dp_gradient"):
        backend = "torch" if method.endswith("torch") else ("triton" if DRY else "auto")
        gen = torch.Generator(device=dev).manual_seed(0)

        def step():
            dk.dp_gradient(model, loss_fn, batch, clip_norm=C, noise_multiplier=SIGMA, expected_batch_size=N,
                           generator=gen, num_samples=N, backend=backend)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if method == "opacus hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        dopt = DPOptimizer(opt, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=N, loss_reduction="sum")

        def step():
            loss_fn(gsm, batch).sum().backward()
            dopt.step()
            dopt.zero_grad(set_to_none=True)
        return step
    if method == "opacus ghost":
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
        from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum", max_grad_norm=C,
                                                   use_ghost_clipping=True)
        dopt = DPOptimizerFastGradientClipping(opt, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=N,
                                               loss_reduction="sum")
        crit = DPLossFastGradientClipping(gsm, dopt, nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum")

        def step():
            with ac():
                out = gsm(x)
            crit(out.float(), y).backward()
            dopt.step()
            dopt.zero_grad(set_to_none=True)
        return step
    raise ValueError(method)


def model_level():
    from lalora.lora import inject_lora
    methods = ["non-private", "dp_gradient triton", "dp_gradient torch", "opacus hooks", "opacus ghost"]
    rounds = 1 if DRY else (3 if QUICK else 6)
    for label, build, targets, r, head, batch in workloads():
        print(f"== B. {label}: ms/step, median of {rounds} interleaved rounds", flush=True)
        torch.manual_seed(0)
        base = build()
        for p in base.parameters():
            p.requires_grad_(False)
        inject_lora(base, targets, r=r, alpha=2.0 * r, dropout=0.0, seed=0)
        for p in base.get_submodule(head).parameters():
            p.requires_grad_(True)
        for mod in base.modules():
            if hasattr(mod, "lora_B"):
                nn.init.normal_(mod.lora_B, std=0.01)    # nonzero so both factors get gradient
        batch = tuple(t.to(dev) for t in batch)
        steps, times, peaks, errors = {}, {m: [] for m in methods}, {}, {}
        for m in methods:
            try:
                steps[m] = make_step(m, copy.deepcopy(base).to(dev).train(), batch)
                peaks[m] = peak_mib(steps[m])          # also the warm-up (compilation) step
                steps[m]()
            except Exception as e:
                errors[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                steps.pop(m, None)
                print(f"  {m:20s} does not run: {errors[m]}", flush=True)
                traceback.print_exc(limit=2, file=sys.stdout)
        for _ in range(rounds):
            for m, step in steps.items():
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times[m].append((time.perf_counter() - t0) * 1e3)
        np_ms, np_mem = (statistics.median(times["non-private"]), peaks["non-private"]) if "non-private" in steps \
            else (float("nan"), float("nan"))
        for m in methods:
            row = dict(workload=label, method=m, error=errors.get(m))
            if m in steps:
                ms = statistics.median(times[m])
                row.update(ms=ms, x_nonprivate=ms / np_ms, peak_MiB=peaks[m],
                           mem_x_nonprivate=peaks[m] / np_mem if np_mem else None)
                print(f"  {m:20s} {ms:9.1f} ms  x{ms / np_ms:.2f}  peak {peaks[m]:8.0f} MiB"
                      + (f"  x{peaks[m] / np_mem:.2f}" if np_mem else ""), flush=True)
            OUT["steps"].append(row)
        del steps
        if not DRY:
            torch.cuda.empty_cache()


def markdown() -> str:
    lines = [f"### GPU check: {OUT['gpu']}", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}; device copy bandwidth "
             f"{OUT.get('copy_GBps', float('nan')):.0f} GB/s", "",
             "| kernel | shape | path | ms | GB/s | of copy bw (target >= 70%) |", "|---|---|---|---|---|---|"]
    for k in OUT["kernels"]:
        path = "" if "use_dot" not in k else ("tl.dot" if k["use_dot"] else "outer product")
        lines.append(f"| {k['kernel']} | {k['shape']} | {path} | {k['ms']:.4f} | {k['GBps']:.0f} | {k['frac_copy']:.0%} |")
    lines += ["", "| workload | method | ms/step | x non-private (DP target <= 1.05) | peak MiB | x non-private |",
              "|---|---|---|---|---|---|"]
    for s in OUT["steps"]:
        if s.get("error"):
            lines.append(f"| {s['workload']} | {s['method']} | does not run: {s['error'][:80]} | | | |")
        else:
            mem = f"{s['mem_x_nonprivate']:.2f}" if s.get("mem_x_nonprivate") else ""
            lines.append(f"| {s['workload']} | {s['method']} | {s['ms']:.1f} | {s['x_nonprivate']:.2f} | "
                         f"{s['peak_MiB']:.0f} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {gpu_name()}, QUICK={QUICK}", flush=True)
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for part, fn in (("kernels", kernels_vs_bandwidth), ("model", model_level)):
        if which in ("all", part):
            try:
                fn()
            except Exception:
                traceback.print_exc(limit=4)
                OUT.setdefault("failures", []).append(part)
            write_json("bench.json", OUT)       # after each part: a timeout later keeps what was measured
            with open(os.path.join(OUT_DIR, "bench.md"), "w") as f:
                f.write(markdown())
    print(markdown())
    sys.exit(1 if OUT.get("failures") else 0)
