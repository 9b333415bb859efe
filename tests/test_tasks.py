"""Offline tasks: load with the network cut off, train a few steps on exactly LoRA + head,
pretraining cache, determinism, splits, registry errors.

Pretraining here uses 1 epoch (``pretrain_epochs=1``) into a temporary cache, so the suite stays
fast; the real pretraining (cached in ~/.cache/lalora) is exercised by the notebooks.
"""
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lalora.tasks import get_task, list_tasks


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise OSError("network access refused in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_trains(task, n=32, steps=4, lr=0.05):
    torch.manual_seed(0)
    model = task.build_model()
    params = _trainable(model)
    names = set(params)
    lora = {n for n in names if n.endswith(("lora_A", "lora_B"))}
    head = {n for n in names if n.startswith(task.head_name + ".")}
    assert lora and head and names == lora | head, sorted(names - lora - head)
    # every LoRA target got both factors, and nothing outside the targets did
    assert len(lora) % 2 == 0
    batch = task.collate([task.train[i] for i in range(n)])
    assert batch["labels"].shape == (n,)
    model.eval()  # no dropout: the same batch must see its loss go down
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(task.forward(model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    # B starts at 0 and gets a nonzero gradient once the head is nonzero: both factors move
    b_names = [n for n in lora if n.endswith("lora_B")]
    assert any(params[n].abs().sum() > 0 for n in b_names)
    return model


@pytest.mark.parametrize("name,kw", [
    ("digits-swin", dict(pretrain_epochs=1)),
    ("lfw-swin", dict(pretrain_epochs=1)),
])
def test_offline_vision_task_loads_offline_and_trains(offline, name, kw):
    task = get_task(name, **kw)
    sizes = task.info["sizes"]
    idx = task.info["split_indices"]
    assert len(task.train) == sizes["private"] == len(task.train_labels)
    assert len(task.test) == sizes["test"] == len(task.test_labels)
    # public, private and test are disjoint and cover the source data
    allidx = np.concatenate([idx["public"], idx["private"], idx["test"]])
    assert len(np.unique(allidx)) == len(allidx) == sum(sizes.values())
    assert set(np.unique(task.train_labels)) == set(range(task.num_classes))
    assert task.train[0]["pixel_values"].shape == (1, task.info["swin"]["img_size"], task.info["swin"]["img_size"])
    _check_trains(task)
    assert task.info["pretrain"]["cached"] is False


def test_digits_swin_sizes_and_defaults(offline):
    task = get_task("digits-swin", pretrain_epochs=0)
    assert task.num_classes == 10
    assert task.info["sizes"] == {"public": 359, "private": 1078, "test": 360}
    assert task.lora_targets == ["attn.qkv", "attn.proj"] and task.head_name == "head.fc"
    for key in ("clients", "clients_per_round", "beta", "rounds", "local_steps", "batch_size", "lr", "r", "alpha"):
        assert key in task.defaults
    assert get_task("digits-swin", pretrain_epochs=0, max_train_samples=100).train_labels.shape == (100,)


def test_pretraining_is_cached_and_build_model_deterministic(offline):
    t1 = get_task("digits-swin", pretrain_epochs=1)
    m1 = t1.build_model()
    assert t1.info["pretrain"]["cached"] is False
    files = list((offline / "cache").glob("digits-swin-backbone-*.pt"))
    assert len(files) == 1 and not list((offline / "cache").glob("*.tmp"))
    t2 = get_task("digits-swin", pretrain_epochs=1)
    m2 = t2.build_model()
    assert t2.info["pretrain"]["cached"] is True
    assert t2.info["pretrain"]["key"] == t1.info["pretrain"]["key"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    # the backbone is really the pretrained one (not the random init) ...
    t0 = get_task("digits-swin", pretrain_epochs=0)
    m0 = t0.build_model()
    k = "layers.0.blocks.0.norm1.weight"
    assert not torch.equal(m0.state_dict()[k], s1[k])
    # ... and a different protocol gets a different cache entry
    assert t0.info["pretrain"]["key"] != t1.info["pretrain"]["key"]


def test_lfw_swin_transfers_the_digits_backbone(offline):
    """lfw-swin pretrains on NO lfw image: it reuses digits-swin's backbone (same cache entry)."""
    lfw = get_task("lfw-swin", pretrain_epochs=1)
    assert lfw.info["sizes"] == {"public": 0, "private": 140, "test": 60}
    assert lfw.test[0]["pixel_values"].shape == (1, 24, 24)
    lfw.build_model()
    assert lfw.info["pretrain"]["source"] == "digits-swin" and lfw.info["pretrain"]["public_size"] == 359
    digits = get_task("digits-swin", pretrain_epochs=1)
    digits.build_model()
    assert digits.info["pretrain"]["cached"] is True  # lfw-swin already wrote it
    assert digits.info["pretrain"]["key"] == lfw.info["pretrain"]["key"]
    assert len(list((offline / "cache").glob("*.pt"))) == 1
    # the backbone weights lfw fine-tunes are exactly digits' (only the head differs)
    sd_l, sd_d = lfw.build_model().state_dict(), digits.build_model().state_dict()
    shared = [k for k in sd_d if not k.startswith("head.") and "attn_mask" not in k and k in sd_l]
    assert shared and all(torch.equal(sd_l[k], sd_d[k]) for k in shared)


@pytest.mark.slow
def test_lfw_swin_is_not_saturated_and_learns():
    """Fresh head well below 100%, a short non-private fine-tune far above chance (the task ranks)."""
    torch.manual_seed(0)
    task = get_task("lfw-swin")  # the real 60-epoch backbone (cached in ~/.cache/lalora)
    model = task.build_model()
    x, y = task.test.tensors["pixel_values"], task.test.tensors["labels"]

    def accuracy():
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    fresh = accuracy()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        model.train()
        order = torch.randperm(len(task.train), generator=gen)
        for s in range(0, len(order), 16):
            b = task.train.batch(order[s:s + 16])
            loss = F.cross_entropy(task.forward(model, b), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned = accuracy()
    assert fresh < 0.8 and tuned > 0.8 and tuned > fresh + 0.1, (fresh, tuned)


def test_build_model_rank_override(offline):
    task = get_task("digits-swin", pretrain_epochs=0)
    m = task.build_model(r=4, alpha=4.0)
    a = dict(m.named_parameters())["layers.0.blocks.0.attn.qkv.lora_A"]
    assert a.shape == (4, 32)


def test_topics_minilm_loads_offline_and_trains(offline):
    task = get_task("topics-minilm")
    assert task.num_classes == 12
    assert task.info["classes"][:2] == ["ai", "coding"]
    assert len(task.train) + len(task.test) == sum(task.info["class_sizes"]) == 1295
    assert task.train[0]["input_ids"].shape == (32,)
    assert task.lora_targets == ["query", "key", "value", "attention.output.dense"]
    model = _check_trains(task, n=16, steps=3, lr=0.5)
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora" in n}
    assert len(lora) == 6 * 4 * 2  # 6 layers x (q, k, v, attn-out dense) x (A, B)


def test_topics_minilm_fingerprint_is_the_models_content_not_its_install_path(offline):
    # The fingerprint names a run's folder: with MiniLM's install path in it, the same run got another
    # folder (and another id in the committed results) in every checkout and venv.
    import shutil

    from lalora.federated.runs import task_fingerprint
    from lalora.tasks.text import minilm_path

    here = get_task("topics-minilm")
    moved = offline / "elsewhere" / "model"
    shutil.copytree(minilm_path(), moved)
    there = get_task("topics-minilm", model_path=moved)
    assert moved.resolve() != minilm_path().resolve()
    assert task_fingerprint(there) == task_fingerprint(here)
    with open(moved / "config.json", "a") as f:   # other content (a trailing newline: still loads)
        f.write("\n")
    changed = get_task("topics-minilm", model_path=moved)
    assert changed.info["model_sha256"] != here.info["model_sha256"]
    assert task_fingerprint(changed) != task_fingerprint(here)


def test_registry_names_and_errors():
    names = list_tasks()
    for n in ["digits-swin", "lfw-swin", "topics-minilm", "cifar100-swin-t", "cifar100-swin-b",
              "tinyimagenet-swin-t", "tinyimagenet-swin-b", "sst2-roberta", "qnli-roberta", "mnli-roberta"]:
        assert n in names
    with pytest.raises(ValueError, match="name"):
        get_task("no-such-task")
    with pytest.raises(ValueError, match="bogus"):
        get_task("digits-swin", bogus=1)
    with pytest.raises(ValueError, match="public_fraction"):
        get_task("digits-swin", public_fraction=1.5)
    with pytest.raises(ValueError, match="public_fraction"):  # nothing to pretrain on
        get_task("digits-swin", public_fraction=0.0)
