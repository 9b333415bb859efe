"""Per-layer rules (rules.py, issue 31): the built-ins moved onto one registry, Hugging Face's Conv1D
(weight and bias), raw parameters broadcast over the batch (cls_token, pos_embed) and a rule a user
registers, each exact against the float64 per-sample loop; wrong rules and misuses refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dplora_kernels as dk
from dplora_kernels import rules
from dplora_kernels.engine import PerSampleGradEngine
from dplora_kernels.unit_probe import ClippingUnitError, UnattributedGradientError
from engine_loops import RTOL, check_against_loop

F64 = torch.float64


def _labels(n, classes=3, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _ce(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


# ---- Conv1D (GPT-2) ------------------------------------------------------------------------------
class TinyGPT2Block(nn.Module):
    """Token embedding -> Conv1D (c_attn-like, weight and bias train) -> gelu -> Conv1D (c_proj-like:
    bias only, as PEFT bias="lora_only" leaves it) -> mean pool -> head."""

    def __init__(self, vocab=11, d=6, h=10, classes=3):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.wte = nn.Embedding(vocab, d)
        self.c_attn = Conv1D(h, d)      # weight (d, h)
        self.c_proj = Conv1D(d, h)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.c_proj(F.gelu(self.c_attn(self.wte(ids))))
        return self.head(x.mean(1))


def test_conv1d_weight_and_bias_exact_vs_the_float64_loop():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = TinyGPT2Block().to(F64)
    with torch.no_grad():   # Conv1D initialises its bias to zero; a non-zero one exercises the forward
        model.c_attn.bias.normal_()
    model.wte.weight.requires_grad_(False)
    model.c_proj.weight.requires_grad_(False)   # bias only: the lora_only case
    n = 5
    batch = {"x": torch.randint(0, 11, (n, 7)), "labels": _labels(n)}
    psg, ref = check_against_loop(model, _ce, batch, n, F64)
    assert set(ref) == {"c_attn.weight", "c_attn.bias", "c_proj.bias", "head.weight", "head.bias"}


def test_conv1d_rule_is_matched_by_name_without_importing_transformers_at_registration():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    assert rules.rule_for(Conv1D(4, 3)).name == "transformers Conv1D"
    assert "transformers.pytorch_utils.Conv1D" in dk.registered_rules()


# ---- raw parameters broadcast over the batch (timm's cls_token / pos_embed) ----------------------
class TinyViT(nn.Module):
    def __init__(self, d=6, patches=4, classes=3, misuse=False):
        super().__init__()
        self.patch = nn.Linear(5, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, d) * 0.1)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.misuse = misuse

    def forward(self, x):                                  # x (B, patches, 5)
        h = self.patch(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        # misuse: one copy of pos_embed for the whole batch (its first), as `self.pos_embed[0]` would
        h = h + (self.pos_embed[:1] if self.misuse else self.pos_embed)
        return self.head(self.norm(torch.tanh(h)).mean(1))


def test_broadcast_raw_parameters_exact_vs_the_float64_loop():
    torch.manual_seed(0)
    model = TinyViT().to(F64)
    n = 6
    batch = {"x": torch.randn(n, 4, 5, dtype=F64), "labels": _labels(n)}
    psg, ref = check_against_loop(model, _ce, batch, n, F64)
    assert {"cls_token", "pos_embed"} <= set(ref)
    # the parameters are the model's own again after the engine (nothing left swapped)
    assert isinstance(model._parameters["cls_token"], nn.Parameter)
    assert isinstance(model._parameters["pos_embed"], nn.Parameter)
    # and after a forward that raised inside the engine
    with pytest.raises(RuntimeError):
        with PerSampleGradEngine(model, backend="torch"):
            model(torch.randn(n, 3, 5, dtype=F64))   # wrong number of patches: the add fails
    assert isinstance(model._parameters["pos_embed"], nn.Parameter)


def test_a_broadcast_parameter_used_for_the_whole_batch_is_refused_by_the_default_check():
    """pos_embed[:1] gives every sample copy 0: the batch sum is right, the per-sample split is not."""
    torch.manual_seed(0)
    model = TinyViT(misuse=True)
    n = 4
    batch = {"x": torch.randn(n, 4, 5), "labels": _labels(n)}
    with pytest.raises(ClippingUnitError, match="pos_embed"):
        dk.dp_gradient(model, _ce, batch, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=float(n),
                       generator=torch.Generator().manual_seed(0), backend="torch")


# ---- a rule the user registers -------------------------------------------------------------------
class Scale(nn.Module):
    """y = x * weight + shift (per feature)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight + self.shift


class ScaleNet(nn.Module):
    def __init__(self, d=5, classes=3):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.scale = Scale(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(torch.tanh(self.inp(x)))).mean(1))


@pytest.fixture
def scale_rule():
    def scale_rule(module, activation, grad_output, num_samples):
        d = module.weight.numel()
        x = activation.reshape(num_samples, -1, d)
        g = grad_output.reshape(num_samples, -1, d)
        return {"weight": (g * x).sum(1), "shift": g.sum(1)}

    dk.register_per_sample_rule(Scale, scale_rule)
    yield scale_rule
    rules._RULES.pop(Scale, None)


def test_without_a_rule_the_layer_is_refused_naming_its_parameters():
    model = ScaleNet()
    with pytest.raises(ValueError, match=r"scale\.weight.*register_per_sample_rule"):
        PerSampleGradEngine(model).__enter__()


def test_a_registered_rule_is_exact_vs_the_float64_loop(scale_rule):
    torch.manual_seed(0)
    model = ScaleNet().to(F64)
    n = 5
    batch = {"x": torch.randn(n, 3, 4, dtype=F64), "labels": _labels(n)}
    psg, ref = check_against_loop(model, _ce, batch, n, F64)
    assert {"scale.weight", "scale.shift"} <= set(ref)
    # and it serves dp_gradient, whose default model check passes on an exact rule
    model32 = ScaleNet()
    res = dk.dp_gradient(model32, _ce, {"x": batch["x"].float(), "labels": batch["labels"]}, clip_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=float(n), generator=None, backend="torch")
    assert model32.scale.weight.grad is not None and res.batch_size == n and "scale.shift" in res.grads


def test_registering_twice_needs_replace(scale_rule):
    with pytest.raises(ValueError, match="already registered"):
        dk.register_per_sample_rule(Scale, scale_rule)
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        dk.register_per_sample_rule(nn.Linear, scale_rule)
    with pytest.raises(TypeError, match="module_type"):
        dk.register_per_sample_rule(42, scale_rule)


def test_a_wrong_rule_is_refused_by_the_default_model_check():
    def half_rule(module, activation, grad_output, num_samples):   # drops half of the weight's gradient
        d = module.weight.numel()
        x = activation.reshape(num_samples, -1, d)
        g = grad_output.reshape(num_samples, -1, d)
        return {"weight": 0.5 * (g * x).sum(1), "shift": g.sum(1)}

    dk.register_per_sample_rule(Scale, half_rule)
    try:
        torch.manual_seed(0)
        model = ScaleNet()
        n = 4
        batch = {"x": torch.randn(n, 3, 4), "labels": _labels(n)}
        with pytest.raises(UnattributedGradientError, match="scale.weight"):
            dk.dp_gradient(model, _ce, batch, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=float(n),
                           generator=None, backend="torch")
    finally:
        rules._RULES.pop(Scale, None)


@pytest.mark.parametrize("bad, message", [
    (lambda m, x, g, n: {"weight": torch.zeros(n, 5)}, r"no gradient for trainable parameters \['shift'\]"),
    (lambda m, x, g, n: {"weight": torch.zeros(n, 5), "shift": torch.zeros(5)}, r"shift has shape \(5,\)"),
    (lambda m, x, g, n: {"weight": torch.zeros(n, 5), "shift": torch.zeros(n, 5), "bias": torch.zeros(n, 5)},
     r"unknown or frozen parameters \['bias'\]"),
    (lambda m, x, g, n: [torch.zeros(n, 5)], "expected {parameter name"),
])
def test_a_malformed_rule_result_is_one_clear_error(bad, message):
    dk.register_per_sample_rule(Scale, bad)
    try:
        model = ScaleNet()
        batch = {"x": torch.randn(3, 3, 4), "labels": _labels(3)}
        with pytest.raises((ValueError, TypeError), match=message):
            with PerSampleGradEngine(model, backend="torch") as eng:
                eng.backward(_ce(model, batch).sum(), 3)
    finally:
        rules._RULES.pop(Scale, None)


def test_conv2d_has_no_rule_and_is_refused_with_the_way_out():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\].*register a rule"):
        PerSampleGradEngine(model).__enter__()


def test_builtins_are_on_the_registry():
    assert rules.rule_for(nn.Linear(2, 2)).name == "nn.Linear"
    assert rules.rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)).name == "nn.Linear"
    assert rules.rule_for(nn.Embedding(3, 2)).name == "nn.Embedding"
    assert rules.rule_for(nn.LayerNorm(2)).name == "nn.LayerNorm"
    assert "max_norm" in rules.rule_for(nn.Embedding(3, 2, max_norm=1.0)).refuse(nn.Embedding(3, 2, max_norm=1.0))


def test_the_readme_rule_example_runs_as_written_and_is_exact():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "register_per_sample_rule" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    try:
        scale_cls = scope["Scale"]

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp, self.scale, self.head = nn.Linear(4, 5), scale_cls(5), nn.Linear(5, 3)

            def forward(self, x):
                return self.head(torch.tanh(self.scale(torch.tanh(self.inp(x)))).mean(1))

        torch.manual_seed(0)
        model = Net().to(F64)
        with torch.no_grad():
            model.scale.weight.normal_()
        batch = {"x": torch.randn(4, 3, 4, dtype=F64), "labels": _labels(4)}
        _, ref = check_against_loop(model, _ce, batch, 4, F64)
        assert "scale.weight" in ref
    finally:
        rules._RULES.pop(scope["Scale"], None)


# ---- PEFT's LoRA on an embedding (factors in child ParameterDicts) -------------------------------
class EmbedNet(nn.Module):
    def __init__(self, vocab=13, d=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.emb(x))).mean(1))


def _peft_embedding_model(dtype=F64):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(EmbedNet().to(dtype), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["emb"],
                                                                       modules_to_save=["head"]))
    with torch.no_grad():   # PEFT starts A at zero for embeddings: B's gradient would be zero
        for name, p in model.named_parameters():
            if "lora_embedding" in name:
                p.normal_()
    return model


def test_peft_lora_embedding_exact_vs_the_float64_loop_padding_included():
    model = _peft_embedding_model()
    n = 5
    ids = torch.randint(0, 13, (n, 7), generator=torch.Generator().manual_seed(3))
    ids[:, -2:] = 0                      # padding: no gradient for A's padding column, B still sees it
    batch = {"x": ids, "labels": _labels(n)}
    _, ref = check_against_loop(model, _ce, batch, n, F64)
    names = [k for k in ref if "lora_embedding" in k]
    assert len(names) == 2, list(ref)
    a = next(k for k in names if "lora_embedding_A" in k)
    assert ref[a][:, :, 0].abs().max() == 0   # the padding row (column of A) gets nothing


def test_peft_lora_embedding_serves_dp_gradient_with_the_default_check():
    model = _peft_embedding_model(torch.float32)
    n = 4
    batch = {"x": torch.randint(1, 13, (n, 5)), "labels": _labels(n)}
    res = dk.dp_gradient(model, _ce, batch, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=float(n),
                         generator=None, backend="torch")
    assert any("lora_embedding_A" in k for k in res.grads) and res.batch_size == n


# ---- DoRA's magnitude vector (PEFT use_dora=True on Linear layers) -------------------------------
def _dora_model(dtype=F64):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(ScaleFreeMLP().to(dtype), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, use_dora=True, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    with torch.no_grad():   # B starts at zero: give the A gradient and the norm's B A term something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


class ScaleFreeMLP(nn.Module):
    def __init__(self, d_in=6, d_h=8, classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d_in, d_h), nn.Linear(d_h, d_h), nn.Linear(d_h, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))).mean(1))


def test_dora_magnitude_and_factors_exact_vs_the_float64_loop():
    model = _dora_model()
    n = 5
    batch = {"x": torch.randn(n, 4, 6, dtype=F64), "labels": _labels(n)}
    _, ref = check_against_loop(model, _ce, batch, n, F64)
    assert sum("lora_magnitude_vector" in k for k in ref) == 2 and sum("lora_A" in k for k in ref) == 2


def test_dora_serves_dp_gradient_with_the_default_check():
    model = _dora_model(torch.float32)
    n = 4
    res = dk.dp_gradient(model, _ce, {"x": torch.randn(n, 3, 6), "labels": _labels(n)}, clip_norm=1.0,
                         noise_multiplier=0.0, expected_batch_size=float(n), generator=None, backend="torch")
    assert any("lora_magnitude_vector" in k for k in res.grads)


def test_gpt2_with_lora_only_biases_on_conv1d_exact_vs_the_float64_loop():
    """The user's case: tiny random GPT-2, PEFT LoRA on Conv1D (fan_in_fan_out) with bias="lora_only",
    which trains the Conv1D base biases (refused before the Conv1D rule)."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    from dplora_kernels.hf import CausalLMCollator, per_sample_causal_lm_loss

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = peft.get_peft_model(GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
        bias="lora_only", task_type="CAUSAL_LM")).to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("base_layer.bias"):
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(0, 50, (k,), generator=g)} for k in (5, 3, 7, 4)]
    batch = CausalLMCollator(pad_token_id=0)(feats)
    _, ref = check_against_loop(model, per_sample_causal_lm_loss, batch, 4, F64)
    biases = [k for k in ref if k.endswith("base_layer.bias")]
    assert len(biases) == 6 and all("c_attn" in k or "c_proj" in k for k in biases)   # attn c_attn, c_proj; mlp c_proj
