"""The 224² data path: per-item ImageDatasets (CIFAR-100 pickles, image files, FakeData), arbitrary
index sets served by ``batch`` (serial and threaded give the same tensors), subsets that share the
source, and DataLoader workers / pinned memory on CUDA only."""
import pickle

import numpy as np
import pytest
import torch

from lalora.tasks.data import CifarPickleImages, ImageDataset, ImageFiles, make_loader, use_device


def _pickles(root, n=10, seed=0):
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [int(i % 7) for i in range(n)]}, f)
    return d, data


def test_cifar_pickle_items_are_the_stored_pixels(tmp_path):
    from torchvision.transforms import PILToTensor

    d, data = _pickles(tmp_path)
    src = CifarPickleImages(d / "train")
    ds = ImageDataset(src, src.labels, PILToTensor())
    for i in (0, 3, 9):
        want = torch.as_tensor(data[i].reshape(3, 32, 32))     # CIFAR rows are R plane, G plane, B plane
        assert torch.equal(ds[i]["pixel_values"], want) and int(ds[i]["labels"]) == i % 7


def test_cifar_pickle_rejects_a_wrong_shape(tmp_path):
    p = tmp_path / "train"
    with open(p, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"train: 'data' must be \(N, 3072\)"):
        CifarPickleImages(p)


def test_batch_serves_arbitrary_index_sets_serial_and_threaded_alike(tmp_path):
    from lalora.tasks.paper import image_transform

    d, _ = _pickles(tmp_path, n=12)
    src = CifarPickleImages(d / "train")
    ds = ImageDataset(src, src.labels, image_transform(48))
    idx = [7, 2, 2, 11, 0]                       # unordered, repeated: any Poisson draw
    serial = ds.batch(idx)
    assert serial["pixel_values"].shape == (5, 3, 48, 48) and serial["labels"].tolist() == [0, 2, 2, 4, 0]
    for i, j in enumerate(idx):
        assert torch.equal(serial["pixel_values"][i], ds[j]["pixel_values"])
    ds.workers = 3
    threaded = ds.batch(np.asarray(idx))
    assert all(torch.equal(serial[k], threaded[k]) for k in serial)
    empty = ds.batch([])
    assert empty["pixel_values"].shape == (0, 3, 48, 48) and empty["labels"].shape == (0,)
    sub = ds.subset([11, 7])                     # shares the source, remaps positions
    assert sub.read is ds.read and len(sub) == 2
    assert torch.equal(sub.batch([1, 0])["pixel_values"], ds.batch([7, 11])["pixel_values"])
    assert torch.equal(sub.subset([1])[0]["pixel_values"], ds[7]["pixel_values"])


def test_image_files_and_loader_pass(tmp_path):
    from PIL import Image
    from torchvision.transforms import PILToTensor

    rng = np.random.default_rng(1)
    files = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(p)
        files.append(p)
    ds = ImageDataset(ImageFiles(files), [0, 1, 0, 1, 0], PILToTensor())
    loader = make_loader(ds, batch_size=2)
    assert loader.num_workers == 0 and not loader.pin_memory
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), ds.batch(range(5))["pixel_values"])
    two = list(make_loader(ds, batch_size=5, workers=2))   # worker processes: the dataset pickles
    assert torch.equal(two[0]["pixel_values"], ds.batch(range(5))["pixel_values"])


def test_workers_and_pinning_only_on_cuda(tmp_path):
    d, _ = _pickles(tmp_path)
    src = CifarPickleImages(d / "train")
    ds = ImageDataset(src, src.labels, lambda im: torch.zeros(1))
    cpu = make_loader(ds, 4, device="cpu")
    assert cpu.num_workers == 0 and cpu.pin_memory is False
    cuda = make_loader(ds, 4, device="cuda")          # constructing needs no GPU
    assert cuda.num_workers >= 1 and cuda.pin_memory is True
    use_device(ds, "cuda")
    assert ds.workers >= 1 and ds.pin_memory
    use_device(ds, "cpu")
    assert ds.workers == 0 and not ds.pin_memory
    tensors = object()
    assert use_device(tensors, "cuda") is tensors       # in-memory offline datasets are left alone


def test_smoke_task_images_are_fakedata_through_the_paper_transform(monkeypatch):
    from lalora.tasks import get_task

    monkeypatch.setenv("LALORA_SMOKE_SIZE", "cpu")
    task = get_task("smoke-swin-t", samples_per_client=2, test_size=3, image_size=40)
    assert len(task.train) == 16 and len(task.test) == 3          # 8 clients x 2
    assert task.defaults["samples_per_client"] == 2 and task.defaults["local_steps"] == 2
    b = task.train.batch([0, 5])
    assert b["pixel_values"].shape == (2, 3, 40, 40) and b["pixel_values"].dtype == torch.float32
    assert torch.equal(task.train[5]["pixel_values"], b["pixel_values"][1])   # FakeData is deterministic
    assert not torch.equal(b["pixel_values"][0], b["pixel_values"][1])
    state = torch.get_rng_state()
    task.train.workers = 4                                       # threaded decoding: same images,
    for _ in range(3):                                           # global RNG left as it was
        assert torch.equal(task.train.batch([5, 0, 5, 9])["pixel_values"][[1, 0]], b["pixel_values"])
    assert torch.equal(torch.get_rng_state(), state)
