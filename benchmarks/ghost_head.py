"""Head-only DP step on the CPU: the ghost-norm path dp_gradient takes for a one-row-per-sample nn.Linear
vs materialising its (N, m, n) per-sample gradients in the arena and the same grouped clip+sum+noise.

    PYTHONPATH=kernels/src .venv/bin/python benchmarks/ghost_head.py

N = 32, a Linear(1024, 200) head (Swin-B features, Tiny-ImageNet classes), 1 thread, process CPU time,
two warm-up steps each, 15 interleaved rounds (alternating order), medians.
"""
import time, statistics, torch
from torch import nn
import dplora_kernels as dk
from dplora_kernels import dp as D, engine as E
torch.set_num_threads(1)
N, n, m = 32, 1024, 200
head = nn.Linear(n, m)
x, y = torch.randn(N, n), torch.randint(0, m, (N,))
loss = lambda mod, b: nn.functional.cross_entropy(mod(b[0]), b[1], reduction="none")
gen = torch.Generator().manual_seed(0)
def ghost():
    dk.dp_gradient(head, loss, (x, y), clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=N, generator=gen)
def materialised():
    with E.PerSampleGradEngine(head) as eng:
        psg = eng.backward(loss(head, (x, y)).sum(), N)          # ghost=False: (N, m, n) in the arena
    tot = psg.total_sqnorm(); bool(torch.isfinite(tot).all())
    sums, f = dk.clip_and_noise(list(psg.grads.values()), tot, 1.0, 1.0, gen)
    for p, s in zip(head.parameters(), sums): p.grad = s / N
ts = {"ghost": [], "materialised": []}
for f in (ghost, materialised): f(); f()
for i in range(15):   # interleaved, alternating order
    for k, f in (("ghost", ghost), ("materialised", materialised)) if i % 2 else (("materialised", materialised), ("ghost", ghost)):
        t = time.process_time(); f(); ts[k].append(time.process_time() - t)
med = {k: statistics.median(v) * 1000 for k, v in ts.items()}
print({k: round(v, 2) for k, v in med.items()}, "materialised/ghost", round(med["materialised"] / med["ghost"], 2))
