"""Paper tasks from the command line: --data-root/--weights-path, one-line errors (exit 2, no
traceback) for a missing or wrong path, and `lalora notebooks --profile paper --check` against
fake trees in exactly the layout docs/PAPER_DATA.md tells the user to create."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lalora.cli import main
from lalora.notebooks import check_paths

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "kernels" / "src"), str(REPO)]))
    env.pop("LALORA_KILL_AFTER_ROUND", None)
    return env


def test_run_paper_task_without_paths_is_one_line_exit_2(tmp_path):
    """The issue's acceptance check, as a user runs it: a fresh process, no paths."""
    proc = subprocess.run([sys.executable, "-m", "lalora.cli", "run", "--task", "cifar100-swin-t",
                           "--method", "la-lora", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("lalora run: error: --data-root for task cifar100-swin-t: not given")
    assert "cifar-100-python" in lines[0] and "cifar-100-python.tar.gz" in lines[0]  # expected + how
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def _cifar(root: Path):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split in ("train", "test"):
        with open(d / split, "wb") as f:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a", "b"]}, f)


@pytest.mark.parametrize("case", ["weights-missing", "weights-dir-empty", "data-wrong-layout", "roberta-no-tokenizer"])
def test_run_wrong_path_names_the_flag(tmp_path, capsys, case):
    _cifar(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    task, data, weights, flag, what = {
        "weights-missing": ("cifar100-swin-t", tmp_path / "data", tmp_path / "nope.pth", "--weights-path",
                            "nope.pth does not exist"),
        "weights-dir-empty": ("cifar100-swin-b", tmp_path / "data", tmp_path / "empty", "--weights-path",
                              "is not a checkpoint file"),
        "data-wrong-layout": ("tinyimagenet-swin-t", tmp_path / "data", tmp_path / "w.pth", "--data-root",
                              "train has no class folders"),
        "roberta-no-tokenizer": ("sst2-roberta", tmp_path / "glue", tmp_path / "rob", "--weights-path",
                                 "lacks tokenizer.json or vocab.json + merges.txt"),
    }[case]
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        (tmp_path / "glue" / "SST-2" / f).write_text("sentence\tlabel\nok\t1\n")
    (tmp_path / "rob").mkdir()
    (tmp_path / "rob" / "config.json").write_text("{}")
    (tmp_path / "rob" / "model.safetensors").write_bytes(b"x")
    rc = main(["run", "--task", task, "--method", "la-lora", "--data-root", str(data), "--weights-path",
               str(weights), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"lalora run: error: {flag} for task {task}:") and what in err[0], err[0]
    assert "expected" in err[0] and "to obtain it" in err[0]


def test_data_root_on_a_non_paper_task_is_refused(tmp_path, capsys):
    rc = main(["run", "--task", "digits-swin", "--method", "la-lora", "--data-root", str(tmp_path)])
    assert rc == 2 and "--data-root is only for the paper tasks" in capsys.readouterr().err


def _paper_tree(root: Path):
    """Data and weights exactly where notebooks/params/paper expects them (docs/PAPER_DATA.md)."""
    _cifar(root / "data")
    t = root / "data" / "tiny-imagenet-200"
    (t / "train" / "n01443537" / "images").mkdir(parents=True)
    (t / "train" / "n01443537" / "images" / "n01443537_0.JPEG").write_bytes(b"x")
    (t / "val" / "images").mkdir(parents=True)
    (t / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\t0\t0\t1\t1\n")
    for d, dev in (("SST-2", "dev.tsv"), ("QNLI", "dev.tsv"), ("MNLI", "dev_matched.tsv")):
        (root / "data" / "glue" / d).mkdir(parents=True)
        for f in ("train.tsv", dev):
            (root / "data" / "glue" / d / f).write_text("h\n")
    w = root / "weights"
    (w / "roberta-base").mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        (w / "roberta-base" / f).write_text("{}")
    for f in ("swin_tiny_patch4_window7_224.pth", "swin_base_patch4_window7_224.ms_in22k.pth"):
        (w / f).write_bytes(b"x")


def test_notebooks_check_passes_on_the_documented_layout_and_names_each_gap(tmp_path, capsys, monkeypatch):
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    problems = check_paths("paper", root=tmp_path)
    assert any("00_quickstart.yaml: data_root for task cifar100-swin-t" in p for p in problems)
    assert any("02_main_language.yaml: weights_path for task sst2-roberta" in p for p in problems)
    _paper_tree(tmp_path)
    assert check_paths("paper", root=tmp_path) == []
    (tmp_path / "data" / "glue" / "MNLI" / "dev_matched.tsv").unlink()
    (tmp_path / "weights" / "swin_base_patch4_window7_224.ms_in22k.pth").unlink()
    problems = check_paths("paper", root=tmp_path)
    assert any("02_main_language.yaml: data_root for task mnli-roberta:" in p and "dev_matched.tsv" in p
               for p in problems), problems
    assert any("weights_path for task cifar100-swin-b:" in p and "ms_in22k.pth does not exist" in p
               for p in problems), problems
    assert not any("sst2-roberta" in p or "cifar100-swin-t" in p for p in problems)
    # the CLI: exit 2, one line per problem, before anything runs
    monkeypatch.setattr("lalora.notebooks.find_repo_root", lambda *a, **k: tmp_path)
    assert main(["notebooks", "--profile", "paper", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(problems) and all(line.startswith("lalora notebooks: error: ") for line in err)
    assert main(["notebooks", "--profile", "paper", "--check", "--only", "08"]) == 0  # synthetic: no paths
