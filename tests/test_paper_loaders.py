"""Paper-task loaders on fakes written into tmp_path: an ImageFolder tree, a CIFAR-100 pickle
tree, a Tiny-ImageNet tree, three-row GLUE TSVs, a tiny timm Swin checkpoint (torch.save) and a
tiny RoBERTa saved with save_pretrained. Missing paths must fail with the path in the message."""
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lalora.tasks import get_task

SWIN_KW = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access refused in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _png(path, rng, size=12):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def swin_ckpt(tmp_path):
    import timm

    torch.manual_seed(1)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=7, **SWIN_KW)
    sd = m.state_dict()
    sd["layers.0.blocks.0.norm1.weight"] = torch.full_like(sd["layers.0.blocks.0.norm1.weight"], 0.123)
    path = tmp_path / "swin_t.pth"
    torch.save(sd, path)
    return path


def _check_vision(task, n_classes):
    assert task.num_classes == n_classes
    item = task.train[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["labels"].dtype == torch.int64
    model = task.build_model()
    w = dict(model.named_parameters())["layers.0.blocks.0.norm1.weight"]
    assert torch.allclose(w, torch.full_like(w, 0.123))  # the checkpoint's backbone, not a random init
    assert model.head.fc.out_features == n_classes
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) or n.startswith("head.fc.") for n in trainable)
    assert any("attn.qkv.lora_A" in n for n in trainable) and any("attn.proj.lora_B" in n for n in trainable)
    batch = task.train.batch(range(len(task.train)))
    loss = F.cross_entropy(task.forward(model, batch), batch["labels"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    empty = task.train.batch([])
    assert empty["pixel_values"].shape == (0, 3, 32, 32)


def test_cifar100_imagefolder(offline, tmp_path, swin_ckpt):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in ("apple", "bear", "cup"):
            for i in range(n):
                _png(tmp_path / "c100" / split / c / f"{i}.png", rng)
    task = get_task("cifar100-swin-t", data_root=tmp_path / "c100", weights_path=swin_ckpt,
                    image_size=32, model_kwargs=SWIN_KW)
    assert len(task.train) == 9 and len(task.test) == 3
    assert task.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert task.defaults["beta"] == 0.1 and task.defaults["r"] == 16 and task.defaults["clients"] == 8
    _check_vision(task, 3)


def test_cifar100_torchvision_layout(offline, tmp_path, swin_ckpt, monkeypatch):

    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)  # fakes: no md5
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": [i % 4 for i in range(n)]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a", "b", "c", "d"]}, f)
    task = get_task("cifar100-swin-t", data_root=tmp_path, weights_path=swin_ckpt, image_size=32,
                    model_kwargs=SWIN_KW)
    assert len(task.train) == 6 and task.train_labels.tolist() == [0, 1, 2, 3, 0, 1]
    _check_vision(task, 4)


def test_tiny_imagenet_layout(offline, tmp_path, swin_ckpt):
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    for w in wnids:
        for i in range(2):
            _png(root / "train" / w / "images" / f"{w}_{i}.JPEG", rng)
    lines = []
    for i, w in enumerate(["n02", "n01", "n02"]):
        _png(root / "val" / "images" / f"val_{i}.JPEG", rng)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    task = get_task("tinyimagenet-swin-b", data_root=tmp_path, weights_path=swin_ckpt,
                    model_name="swin_tiny_patch4_window7_224", image_size=32, model_kwargs=SWIN_KW)
    assert task.test_labels.tolist() == [1, 0, 1]
    _check_vision(task, 2)


def _tiny_roberta(path):
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from lalora.tasks.text import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)  # any local tokenizer
    cfg = RobertaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=80, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")


def test_glue_sst2_qnli_mnli(offline, tmp_path):
    rob = _tiny_roberta(tmp_path / "roberta")
    g = tmp_path / "glue"
    _tsv(g / "SST-2" / "train.tsv", ["sentence", "label"],
         [["a fine film", "1"], ["dull and \"long\"", "0"], ["great", "1"]])
    _tsv(g / "SST-2" / "dev.tsv", ["sentence", "label"], [["bad", "0"], ["good", "1"], ["ok", "1"]])
    _tsv(g / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
         [["0", "who?", "him.", "entailment"], ["1", "what?", "no.", "not_entailment"], ["2", "x?", "y.", "entailment"]])
    _tsv(g / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"], [["0", "q?", "s.", "not_entailment"]])
    mh = ["index", "sentence1", "sentence2", "gold_label"]
    _tsv(g / "MNLI" / "train.tsv", mh, [["0", "a", "b", "neutral"], ["1", "c", "d", "contradiction"], ["2", "e", "f", "-"]])
    _tsv(g / "MNLI" / "dev_matched.tsv", mh, [["0", "a", "b", "entailment"]])

    sst = get_task("sst2-roberta", data_root=g, weights_path=rob)
    assert sst.train_labels.tolist() == [1, 0, 1] and sst.test_labels.tolist() == [0, 1, 1]
    assert sst.train[0]["input_ids"].shape == (64,)  # SST-2 max_len 64
    assert sst.defaults["optimizer"] == "adamw" and sst.defaults["beta"] == 0.8 and sst.defaults["r"] == 8
    qnli = get_task("qnli-roberta", data_root=g, weights_path=rob, max_len=24)
    assert qnli.train_labels.tolist() == [0, 1, 0] and qnli.train[0]["input_ids"].shape == (24,)
    mnli = get_task("mnli-roberta", data_root=g / "MNLI", weights_path=rob)  # files directly in data_root
    assert mnli.num_classes == 3 and mnli.train_labels.tolist() == [1, 2]  # the "-" row is skipped
    assert mnli.info["skipped_rows"]["train"] == 1

    model = qnli.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("head.")} == {
        f"encoder.encoder.layer.{i}.{m}.lora_{f}" for i in range(2)
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
        for f in "AB"}
    assert {"head.dense.weight", "head.out_proj.weight"} <= trainable
    batch = qnli.train.batch(range(3))
    loss = F.cross_entropy(qnli.forward(model, batch), batch["labels"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_missing_paths_name_the_path(tmp_path, swin_ckpt):
    nope = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist.*cifar-100-python"):
        get_task("cifar100-swin-t", data_root=nope, weights_path=swin_ckpt)
    with pytest.raises(FileNotFoundError, match="does-not-exist.*tiny-imagenet-200.zip"):
        get_task("tinyimagenet-swin-t", data_root=nope, weights_path=swin_ckpt)
    with pytest.raises(FileNotFoundError, match="missing.pth.*timm.create_model"):
        get_task("cifar100-swin-b", data_root=tmp_path, weights_path=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="does-not-exist.*roberta-base"):
        get_task("sst2-roberta", data_root=tmp_path, weights_path=nope)
    (tmp_path / "rob").mkdir()
    (tmp_path / "rob" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="does-not-exist.*SST-2.*gluebenchmark"):
        get_task("sst2-roberta", data_root=nope, weights_path=tmp_path / "rob")
    with pytest.raises(ValueError, match="data_root"):
        get_task("mnli-roberta", weights_path=tmp_path / "rob")


@pytest.mark.parametrize("body,match", [
    (b"sentence\tlabel\nok\t1\nbad\x00row\t1\n", r"train\.tsv, line 3: NUL byte"),
    (b"sent\x00ence\tlabel\nok\t1\n", r"train\.tsv, line 1: NUL byte"),
    (b"sentence\tlabel\nok\t1\n" + b"y" * 200_000 + b"\t1\n", r"train\.tsv, line 3: malformed TSV"),  # csv.Error
    (b"sentence\tlabel\nok\t1\n\xff\xfe\t0\n", r"train\.tsv: not UTF-8"),
])
def test_glue_tsv_corrupt_file_is_a_value_error_naming_file_and_line(tmp_path, body, match):
    from lalora.tasks.paper import GLUE, read_glue_tsv

    p = tmp_path / "train.tsv"
    p.write_bytes(body)
    with pytest.raises(ValueError, match=match):
        read_glue_tsv(p, GLUE["sst2"])
