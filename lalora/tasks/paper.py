"""The paper's tasks (SPEC §4) on local data and local weights; nothing is downloaded.

Vision: CIFAR-100 and Tiny-ImageNet, resized to ``image_size`` (224) with ImageNet
normalisation, on timm Swin-T (``swin_tiny_patch4_window7_224``) or Swin-B
(``swin_base_patch4_window7_224.ms_in22k``) loaded from a local checkpoint file
(``weights_path``); the checkpoint's classifier is dropped and a fresh seeded head is added.
Language: GLUE SST-2 / QNLI / MNLI / QQP from the GLUE TSV files, on RoBERTa-base loaded from a
local directory (``weights_path``, ``local_files_only=True``) with the RobertaForSequenceClassification
head on the <s> token. LoRA and the experiment defaults follow SPEC §4.

Accepted layouts (``data_root``):
- CIFAR-100: torchvision's ``<root>/cifar-100-python/{train,test,meta}``, or an ImageFolder tree
  ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``.
- Tiny-ImageNet: ``<root>/tiny-imagenet-200/`` or ``<root>/`` holding ``train/<wnid>/images/*``
  and ``val/images/*`` + ``val/val_annotations.txt`` (the official zip); ``val/<wnid>/*`` works
  too. The labelled val set is the test set (the official test set has no labels).
- GLUE: ``<root>/<SST-2|QNLI|MNLI|QQP>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv``), as written
  by the GLUE download script, or those files directly in ``<root>``. The dev set is the test set.
A missing path raises FileNotFoundError naming it and saying how to obtain it; ``path_problems``
checks both paths and their layout without loading anything (``lalora run``, ``lalora notebooks
--check``). Images are decoded and resized per item (``lalora.tasks.data.ImageDataset``), never held
as one 224² tensor. ``paper_task_defaults`` and ``paper_noise_table`` give a task's SPEC §4 settings
and the σ they calibrate without the data.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lalora.privacy.accountant import DEFAULT_ACCOUNTANT
from lalora.privacy.plan import RunPlan

from .data import CifarPickleImages, ImageDataset, ImageFiles, stack_collate, to_rgb
from .registry import Task, register
from .text import LANGUAGE_DEFAULTS, load_encoder_and_tokenizer, make_text_task
from .vision import VISION_TARGETS, freeze_backbone_inject_lora, vision_forward

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# SPEC §4, vision column; values the paper leaves open follow the released code's README run
# (junkangLiu0/LA-LORA, DP_lora.py: 8 clients, selection 0.5, batch 16, K 20, 100 rounds, SGD
# lr 0.1 with decay 0.99 per round, Dirichlet 0.1, r 16). samples_per_client = 500 is the released
# code's CIFAR-100 nums_sample (dirichlet_data.py); it fixes q = 16/500 and so the noise regime.
PAPER_VISION_DEFAULTS = dict(
    clients=8, clients_per_round=4, partition="dirichlet-released", beta=0.1, samples_per_client=500,
    rounds=100, local_steps=20, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=1e-3,
    lr_decay=0.99, eval_batch_size=512,  # evaluation at a large batch (no gradients: memory allows it)
)
# SPEC §4, language column (= lalora.tasks.text.LANGUAGE_DEFAULTS: 20 clients / 4, β = 0.8, AdamW
# lr 2e-4 wd 0.01 as the released DP_LLM.py README); samples_per_client unset: the training set is
# split over the 20 clients.
PAPER_LANGUAGE_DEFAULTS = dict(LANGUAGE_DEFAULTS, eval_batch_size=512)
PAPER_VISION_LORA = dict(r=16, alpha=16.0)     # SPEC §4: r = α = 16 on attn.qkv, attn.proj
PAPER_LANGUAGE_LORA = dict(r=8, alpha=8.0)     # SPEC §4: r = α = 8 on query/key/value/attn output


def paper_task_defaults(task: str) -> dict:
    """The experiment defaults (Task.defaults) a paper task will carry, without loading its data."""
    if task.endswith("-roberta"):
        return dict(PAPER_LANGUAGE_DEFAULTS, **PAPER_LANGUAGE_LORA)
    if task.startswith(("cifar100-", "tinyimagenet-")):
        return dict(PAPER_VISION_DEFAULTS, **PAPER_VISION_LORA)
    raise ValueError(f"task {task!r} is not a paper task")


def paper_plan(defaults: dict, epsilon: float, *, seed: int = 0, delta: float = 1e-5,
               accountant: str = DEFAULT_ACCOUNTANT, client_sizes=None, train_size: int | None = None) -> RunPlan:
    """The RunPlan (schedule, steps, q, the one σ) of a run with these resolved ``defaults``, without
    building the task: the run's own rule (lalora.privacy.plan), so σ here is the σ a run calibrates.

    ``client_sizes``: each client's |D_i|. Default: ``samples_per_client`` for every client (exact
    for the vision profile: the released scheme draws that many per client), else
    ``train_size // clients`` for every client -- an approximation for the language profile, whose
    Dirichlet split needs the labels; a run plans on its real partition."""
    clients = defaults["clients"]
    if client_sizes is None:
        n_i = defaults.get("samples_per_client")
        if n_i is None:
            if train_size is None:
                raise ValueError("train_size is needed when samples_per_client is not set")
            n_i = train_size // clients
        client_sizes = [n_i] * clients
    return RunPlan.create(seed=seed, clients=clients, clients_per_round=defaults["clients_per_round"],
                          rounds=defaults["rounds"], local_steps=defaults["local_steps"],
                          batch_size=defaults["batch_size"], client_sizes=client_sizes, epsilon=epsilon,
                          delta=delta, accountant=accountant)


def noise_multipliers(defaults: dict, epsilons, *, seed: int = 0, delta: float = 1e-5,
                      accountant: str = DEFAULT_ACCOUNTANT, client_sizes=None,
                      train_size: int | None = None) -> dict[float, float]:
    """σ per ε that a run with these (resolved) defaults calibrates (:func:`paper_plan`)."""
    return {float(e): paper_plan(defaults, float(e), seed=seed, delta=delta, accountant=accountant,
                                 client_sizes=client_sizes, train_size=train_size).noise_multiplier
            for e in epsilons}


# Labelled training rows of the GLUE train.tsv files (the GLUE release; MNLI train has no "-" label);
# only used to price σ before the data is on disk: a run calibrates σ on the rows it reads.
GLUE_TRAIN_ROWS = {"sst2": 67_349, "qnli": 104_743, "mnli": 392_702}


def paper_noise_table(epsilons=(1.0, 2.0, 3.0), seeds=(0, 1, 2), delta: float = 1e-5,
                      accountant: str = DEFAULT_ACCOUNTANT) -> str:
    """Markdown table of the σ the paper profile's runs calibrate for each ε (notebook 00, README).

    Vision: 8 clients × 500 samples, q = 16/500, K = 20, 100 rounds with 4 of 8 clients per round;
    σ depends on the seed only through the busiest client's number of rounds. Language: GLUE
    train sets split evenly over 20 clients (seed 0; a run's Dirichlet split is uneven, its σ is
    planned on the real sizes). The accountant is the runs' default (PRV; until issue 28 this
    table used RDP and so printed a larger σ than the runs calibrate)."""
    rows = ["| setting | seed | busiest client's DP steps | q | " + " | ".join(f"σ at ε = {e:g}" for e in epsilons)
            + " |", "|---|---|---|---|" + "---|" * len(epsilons)]

    def row(label, defaults, seed, train_size=None):
        plans = [paper_plan(defaults, float(e), seed=seed, delta=delta, accountant=accountant,
                            train_size=train_size) for e in epsilons]
        steps, n_i = max(plans[0].planned_steps), plans[0].client_sizes[0]
        sig = {float(e): p.noise_multiplier for e, p in zip(epsilons, plans)}
        rows.append(f"| {label} | {seed} | {steps} | {defaults['batch_size']}/{n_i} = "
                    f"{defaults['batch_size'] / n_i:.4g} | " + " | ".join(f"{sig[float(e)]:.3f}" for e in epsilons) + " |")

    for seed in seeds:
        row("vision (CIFAR-100, Tiny-ImageNet; Swin-T/B)", paper_task_defaults("cifar100-swin-t"), seed)
    for glue, n in GLUE_TRAIN_ROWS.items():
        row(f"language {glue.upper()} ({n:,} rows / 20 clients)", paper_task_defaults(f"{glue}-roberta"), seeds[0], n)
    return (f"Noise multipliers σ ({accountant.upper()} accountant, δ = {delta:g}, Poisson rate q = batch/|D_i|, "
            "one σ for all clients set by the busiest one):\n\n" + "\n".join(rows))


HOW = {
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into "
                "data_root (giving data_root/cifar-100-python/), e.g. with "
                "torchvision.datasets.CIFAR100(data_root, download=True) on a machine with internet",
    "tinyimagenet": "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into data_root "
                    "(giving data_root/tiny-imagenet-200/train, val)",
    "glue": "download GLUE (https://gluebenchmark.com/tasks, or the GLUE download script) so that "
            "data_root/<SST-2|QNLI|MNLI|QQP>/train.tsv and dev.tsv exist",
    "swin": "on a machine with internet: m = timm.create_model('{name}', pretrained=True); "
            "torch.save(m.state_dict(), weights_path) (or download model.safetensors of timm/{name} "
            "from the Hugging Face hub)",
    "roberta": "on a machine with internet: huggingface-cli download FacebookAI/roberta-base "
               "--local-dir weights_path (or AutoModel/AutoTokenizer.from_pretrained('roberta-base')"
               ".save_pretrained(weights_path))",
}


def _missing(what: str, path: Path | str, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {path}: {how}")


def _need_path(param: str, path) -> Path:
    if path is None:
        raise ValueError(f"{param} is required for this paper task (a local path; nothing is downloaded)")
    return Path(path).expanduser()


# --------------------------------------------------------------------------- path checks
# What each paper task expects at data_root / weights_path, checked before anything is loaded so
# that `lalora run` and `lalora notebooks --check` fail in one line instead of a traceback.
EXPECTED = {
    "cifar100": "a folder holding cifar-100-python/{train,test,meta} (or ImageFolder train/<class>/ + test/<class>/)",
    "tinyimagenet": "a folder holding tiny-imagenet-200/ (or its contents) with train/<wnid>/images/ and "
                    "val/images/ + val/val_annotations.txt",
    "glue": "a folder holding <TASK>/train.tsv and the dev file (SST-2, QNLI: dev.tsv; MNLI: dev_matched.tsv)",
    "swin": "a timm checkpoint file (.pth/.pt/.bin/.safetensors) or a folder with model.safetensors",
    "roberta": "a RoBERTa-base folder in save_pretrained layout (config.json, model.safetensors or "
               "pytorch_model.bin, tokenizer.json or vocab.json + merges.txt)",
}


def is_paper_task(task: str) -> bool:
    return task.endswith("-roberta") or task.startswith(("cifar100-", "tinyimagenet-"))


def _data_problem(task: str, root: Path) -> str | None:
    """None if ``root`` has the layout ``task`` reads, else what is wrong."""
    if task.startswith("cifar100-"):
        c = root / "cifar-100-python"
        if (c / "train").is_file() and (c / "test").is_file():
            return None
        if (root / "train").is_dir() and (root / "test").is_dir():
            return None
        return f"{root} has neither cifar-100-python/train + test nor train/ + test/ folders"
    if task.startswith("tinyimagenet-"):
        t = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
        if not (t / "train").is_dir() or not any(p.is_dir() for p in (t / "train").iterdir()):
            return f"{t}/train has no class folders"
        if not (t / "val").is_dir():
            return f"{t}/val is missing"
        if not (t / "val" / "val_annotations.txt").is_file() and not any(
                p.is_dir() and p.name != "images" for p in (t / "val").iterdir()):
            return f"{t}/val has neither val_annotations.txt nor class folders"
        return None
    glue = task.removesuffix("-roberta")
    spec = GLUE[glue]
    for d in (root / spec["dir"], root):
        if (d / "train.tsv").is_file() and (d / spec["test"]).is_file():
            return None
    return f"{root / spec['dir']} lacks train.tsv or {spec['test']}"


def _weights_problem(task: str, path: Path) -> str | None:
    if task.endswith("-roberta"):
        if not path.is_dir():
            return f"{path} is not a folder"
        missing = [n for n, ok in (
            ("config.json", (path / "config.json").is_file()),
            ("model.safetensors or pytorch_model.bin",
             (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()),
            ("tokenizer.json or vocab.json + merges.txt", (path / "tokenizer.json").is_file()
             or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())),
        ) if not ok]
        return f"{path} lacks {', '.join(missing)}" if missing else None
    if path.is_file():
        return None
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()
                          or len(list(path.glob("*.pth")) + list(path.glob("*.pt"))) == 1):
        return None
    return f"{path} is not a checkpoint file or a folder with one" if path.exists() else f"{path} does not exist"


def path_problems(task: str, data_root, weights_path, names: dict | None = None) -> list[str]:
    """One line per problem with ``task``'s paths: the name (``names`` maps data_root/weights_path to
    what the user typed, e.g. --data-root), what is wrong, what is expected and how to obtain it."""
    names = {"data_root": "data_root", "weights_path": "weights_path", **(names or {})}
    if not is_paper_task(task):
        return []
    kind = "cifar100" if task.startswith("cifar100-") else "tinyimagenet" if task.startswith("tinyimagenet-") else "glue"
    wkind = "roberta" if task.endswith("-roberta") else "swin"
    model = SWIN_NAMES[task.split("-", 1)[1]] if wkind == "swin" else ""
    out = []
    for key, value, exp, how, check in (
            ("data_root", data_root, EXPECTED[kind], HOW[kind], _data_problem),
            ("weights_path", weights_path, EXPECTED[wkind], HOW[wkind].format(name=model), _weights_problem)):
        if value is None:
            problem = "not given"
        else:
            path = Path(value).expanduser()
            problem = f"{path} does not exist" if not path.exists() else check(task, path)
        if problem:
            out.append(f"{names[key]} for task {task}: {problem}; expected {exp}; to obtain it: {how} "
                       "(docs/PAPER_DATA.md)")
    return out


# --------------------------------------------------------------------------- image datasets
def image_transform(image_size: int):
    """RGB, bicubic resize to image_size², ImageNet normalisation (the released code's transform,
    without augmentation)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Lambda(to_rgb),
        T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _image_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, files, labels) of an ImageFolder tree, scanned once (no image is opened)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, class_to_idx = find_classes(str(root))
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS + (".JPEG",))
    return classes, [f for f, _ in samples], [y for _, y in samples]


def load_cifar100(data_root, image_size: int = 224):
    """(train, test, class_names) as per-item ImageDatasets; see the module docstring for layouts."""
    root = _need_path("data_root", data_root)
    tf = image_transform(image_size)
    pickles = root / "cifar-100-python"
    if pickles.is_dir():
        for f in ("train", "test"):
            if not (pickles / f).is_file():
                raise _missing(f"CIFAR-100 pickle {f}", pickles / f, HOW["cifar100"])
        tr, te = CifarPickleImages(pickles / "train"), CifarPickleImages(pickles / "test")
        classes = [str(i) for i in range(100)]
        if (pickles / "meta").is_file():
            import pickle

            with open(pickles / "meta", "rb") as f:
                classes = list(pickle.load(f, encoding="latin1")["fine_label_names"])
        return ImageDataset(tr, tr.labels, tf), ImageDataset(te, te.labels, tf), classes
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, tr_files, tr_y = _image_folder(root / "train")
        te_classes, te_files, te_y = _image_folder(root / "test")
        if classes != te_classes:
            raise ValueError(f"data_root {root}: train/ and test/ have different class folders")
        return ImageDataset(ImageFiles(tr_files), tr_y, tf), ImageDataset(ImageFiles(te_files), te_y, tf), classes
    raise _missing("CIFAR-100 (cifar-100-python/ or train/ + test/ folders)", root, HOW["cifar100"])


def load_tiny_imagenet(data_root, image_size: int = 224):
    root = _need_path("data_root", data_root)
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise _missing("Tiny-ImageNet (train/ and val/ folders)", root, HOW["tinyimagenet"])
    tf = image_transform(image_size)
    classes, tr_files, tr_y = _image_folder(root / "train")  # train/<wnid>/images/*.JPEG
    class_to_idx = {c: i for i, c in enumerate(classes)}
    ann = root / "val" / "val_annotations.txt"
    if ann.exists():
        te_files, te_y = [], []
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in class_to_idx:
                raise ValueError(f"{ann}: class {parts[1]!r} is not a train/ folder")
            te_files.append(root / "val" / "images" / parts[0])
            te_y.append(class_to_idx[parts[1]])
    else:
        te_classes, te_files, te_y = _image_folder(root / "val")
        if te_classes != classes:
            raise ValueError(f"{root}/val has class folders different from train/")
    return ImageDataset(ImageFiles(tr_files), tr_y, tf), ImageDataset(ImageFiles(te_files), te_y, tf), classes


# --------------------------------------------------------------------------- timm Swin weights
SWIN_NAMES = {"swin-t": "swin_tiny_patch4_window7_224", "swin-b": "swin_base_patch4_window7_224.ms_in22k"}


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        for cand in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / cand).exists():
                path = path / cand
                break
        else:
            found = sorted(p.name for p in path.glob("*.pth")) + sorted(p.name for p in path.glob("*.pt"))
            if len(found) != 1:
                raise FileNotFoundError(f"no checkpoint (model.safetensors, pytorch_model.bin or one .pth) in {path}")
            path = path / found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd


def build_timm_swin(model_name: str, weights_path, num_classes: int, model_kwargs: dict | None = None,
                    state: dict | None = None) -> nn.Module:
    """timm Swin with ``num_classes`` outputs; backbone from ``weights_path`` (or ``state``), head fresh."""
    import timm
    from timm.models.swin_transformer import checkpoint_filter_fn

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    if state is None:
        path = _need_path("weights_path", weights_path)
        if not path.exists():
            raise _missing(f"Swin checkpoint for {model_name}", path, HOW["swin"].format(name=model_name))
        state = load_state_dict_file(path)
    sd = {k: v for k, v in checkpoint_filter_fn(dict(state), model).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith("head.")]
    if bad_missing or unexpected:
        raise RuntimeError(f"checkpoint {weights_path} does not fit {model_name}: missing "
                           f"{bad_missing[:8]}, unexpected {unexpected[:8]}")
    return model


def _subsample(ds: ImageDataset, max_samples: int | None, seed: int) -> ImageDataset:
    if max_samples is None:
        return ds
    if max_samples < 1:
        raise ValueError(f"max_train_samples must be >= 1, got {max_samples}")
    return ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples]))


def _paper_vision_task(name, loader, data_root, weights_path, model_name, image_size, model_kwargs,
                       r, alpha, dropout, seed, max_train_samples) -> Task:
    wpath = _need_path("weights_path", weights_path)
    if not wpath.exists():  # fail before reading a large dataset
        raise _missing(f"Swin checkpoint for {model_name}", wpath, HOW["swin"].format(name=model_name))
    train, test, classes = loader(data_root, image_size)
    train = _subsample(train, max_train_samples, seed)
    memo: dict = {}

    def build_model(r: int = r, alpha: float = alpha, dropout: float = dropout) -> nn.Module:
        if "state" not in memo:
            memo["state"] = load_state_dict_file(wpath)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_timm_swin(model_name, wpath, len(classes), model_kwargs, state=memo["state"])
        return freeze_backbone_inject_lora(model, VISION_TARGETS, r, alpha, dropout, seed, "head.fc")

    return Task(
        name=name, num_classes=len(classes), train=train, test=test,
        train_labels=np.asarray(train.targets, np.int64), build_model=build_model,
        lora_targets=list(VISION_TARGETS), head_name="head.fc", forward=vision_forward,
        collate=stack_collate, defaults=dict(PAPER_VISION_DEFAULTS, r=r, alpha=float(alpha)),
        test_labels=np.asarray(test.targets, np.int64),
        info={"data_root": str(data_root), "weights_path": str(wpath), "model": model_name,
              "classes": classes, "sizes": {"private": len(train), "test": len(test)}},
    )


def _vision_factory(name: str, loader, swin: str):
    def factory(*, data_root=None, weights_path=None, model_name: str = SWIN_NAMES[swin], image_size: int = 224,
                model_kwargs: dict | None = None, r: int = 16, alpha: float = 16.0, dropout: float = 0.05,
                seed: int = 0, max_train_samples: int | None = None) -> Task:
        return _paper_vision_task(name, loader, data_root, weights_path, model_name, image_size,
                                  model_kwargs, r, alpha, dropout, seed, max_train_samples)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"{name}: {SWIN_NAMES[swin]} on local data; see the lalora.tasks.paper docstring."
    register(name)(factory)
    return factory


for _data, _loader in (("cifar100", load_cifar100), ("tinyimagenet", load_tiny_imagenet)):
    for _swin in ("swin-t", "swin-b"):
        _vision_factory(f"{_data}-{_swin}", _loader, _swin)


# --------------------------------------------------------------------------- GLUE + RoBERTa
GLUE = {
    "sst2": dict(dir="SST-2", cols=("sentence", None), label="label", labels=["0", "1"], test="dev.tsv", max_len=64),
    "qnli": dict(dir="QNLI", cols=("question", "sentence"), label="label",
                 labels=["entailment", "not_entailment"], test="dev.tsv", max_len=128),
    "mnli": dict(dir="MNLI", cols=("sentence1", "sentence2"), label="gold_label",
                 labels=["entailment", "neutral", "contradiction"], test="dev_matched.tsv", max_len=128),
    "qqp": dict(dir="QQP", cols=("question1", "question2"), label="is_duplicate", labels=["0", "1"],
                test="dev.tsv", max_len=128),
}


def _tsv_rows(path: Path, f):
    """csv rows of an open GLUE TSV; a NUL byte or any csv.Error is a ValueError naming file and line.

    Python 3.11's csv accepts NUL bytes silently; a NUL in a GLUE file means a binary or corrupt
    file, which must not be tokenised as text.
    """
    rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as err:  # e.g. a field over csv.field_size_limit()
            raise ValueError(f"{path}, line {rows.line_num}: malformed TSV ({err})") from err
        if any("\x00" in cell for cell in row):
            raise ValueError(f"{path}, line {rows.line_num}: NUL byte (binary or corrupt file?)")
        yield row


def read_glue_tsv(path: Path, spec: dict) -> tuple[list[str], list[str] | None, np.ndarray, int]:
    """(texts_a, texts_b, labels, skipped_rows) of one GLUE TSV (header row, no quoting).

    Rows with the wrong number of fields or a label outside ``spec["labels"]`` are skipped and
    counted; a file that is empty, lacks a needed column, has no labelled row, is not UTF-8, holds
    a NUL byte or trips the csv parser raises a ValueError naming the file.
    """
    a_col, b_col = spec["cols"]
    label_of = {s: i for i, s in enumerate(spec["labels"])}
    texts_a, texts_b, labels, skipped = [], [], [], 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = _tsv_rows(path, f)
            header = next(rows, None)
            if header is None:
                raise ValueError(f"{path} is empty")
            need = [c for c in (a_col, b_col, spec["label"]) if c is not None]
            if any(c not in header for c in need):
                raise ValueError(f"{path}: header {header} lacks one of the columns {need}")
            ia, il = header.index(a_col), header.index(spec["label"])
            ib = header.index(b_col) if b_col else None
            for row in rows:
                if len(row) != len(header) or row[il].strip() not in label_of:
                    skipped += 1  # QQP has a few malformed rows; MNLI gold_label "-" has no consensus
                    continue
                texts_a.append(row[ia])
                if ib is not None:
                    texts_b.append(row[ib])
                labels.append(label_of[row[il].strip()])
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not labels:
        raise ValueError(f"{path}: no labelled rows")
    return texts_a, (texts_b if b_col else None), np.asarray(labels, np.int64), skipped


def glue_files(data_root, glue: str) -> tuple[Path, Path]:
    spec = GLUE[glue]
    root = _need_path("data_root", data_root)
    for d in (root / spec["dir"], root):
        tr, te = d / "train.tsv", d / spec["test"]
        if tr.exists() and te.exists():
            return tr, te
    raise _missing(f"GLUE {spec['dir']} (train.tsv and {spec['test']})", root / spec["dir"], HOW["glue"])


def _glue_factory(glue: str):
    name = f"{glue}-roberta"

    def factory(*, data_root=None, weights_path=None, max_len: int | None = None, r: int = 8,
                alpha: float = 8.0, dropout: float = 0.05, seed: int = 0,
                max_train_samples: int | None = None, max_test_samples: int | None = None) -> Task:
        spec = GLUE[glue]
        wpath = _need_path("weights_path", weights_path)
        if not (wpath / "config.json").exists():
            raise _missing("RoBERTa-base (a directory with config.json, weights and tokenizer)", wpath,
                           HOW["roberta"])
        tr_file, te_file = glue_files(data_root, glue)
        tr_a, tr_b, tr_y, tr_skip = read_glue_tsv(tr_file, spec)
        te_a, te_b, te_y, te_skip = read_glue_tsv(te_file, spec)

        def cut(a, b, y, n, s):
            if n is None:
                return a, b, y
            if n < 1:
                raise ValueError(f"max_train_samples/max_test_samples must be >= 1, got {n}")
            keep = np.sort(np.random.default_rng(s).permutation(len(y))[:n])
            return [a[i] for i in keep], (None if b is None else [b[i] for i in keep]), y[keep]

        tr_a, tr_b, tr_y = cut(tr_a, tr_b, tr_y, max_train_samples, seed)
        te_a, te_b, te_y = cut(te_a, te_b, te_y, max_test_samples, seed + 1)
        encoder, tok = load_encoder_and_tokenizer(wpath)
        return make_text_task(
            name=name, encoder=encoder, tokenizer=tok, num_classes=len(spec["labels"]),
            train_texts=(tr_a, tr_b), train_labels=tr_y, test_texts=(te_a, te_b), test_labels=te_y,
            max_len=max_len or spec["max_len"], pooling="cls", head="roberta", r=r, alpha=alpha,
            dropout=dropout, seed=seed, defaults=PAPER_LANGUAGE_DEFAULTS,
            info={"data": [str(tr_file), str(te_file)], "weights_path": str(wpath), "classes": spec["labels"],
                  "skipped_rows": {"train": tr_skip, "test": te_skip}},
        )

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"{name}: GLUE {GLUE[glue]['dir']} on RoBERTa-base from a local directory."
    register(name)(factory)
    return factory


for _glue in GLUE:
    _glue_factory(_glue)
