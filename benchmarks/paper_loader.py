"""Images per second the paper data path sustains at 224² on this machine, on fake data written to a
temporary folder in the real layouts (CIFAR-100 pickles, Tiny-ImageNet JPEG tree).

    python benchmarks/paper_loader.py --json benchmarks/paper_loader_cpu.json

Variants, timed interleaved (each repeat runs every variant once, in a rotating order), medians:
- ``batch-serial``: the training path, ``ImageDataset.batch`` of a random 16-index set (what a
  Poisson step asks for) decoded in the calling thread (the CPU default);
- ``batch-threads``: the same with ``--threads`` decoding threads (what ``use_device`` sets on CUDA);
- ``loader-eval``: a ``make_loader`` pass at batch 256 (evaluation) with ``--workers`` processes.
Reported: wall-clock images/s and process CPU ms per image (the main process only: a DataLoader
worker's CPU time is not in it); ratios
against ``batch-serial`` of the same repeat.
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_fake_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist()}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)


def write_fake_tiny(root: Path, classes: int, per_class: int, n_val: int, seed: int = 0) -> None:
    """64×64 JPEGs (Tiny-ImageNet's size and format) in train/<wnid>/images/ and val/images/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    t = root / "tiny-imagenet-200"
    wnids = [f"n{idx:08d}" for idx in range(classes)]
    for w in wnids:
        (t / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                t / "train" / w / "images" / f"{w}_{i}.JPEG", quality=90)
    (t / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(n_val):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            t / "val" / "images" / f"val_{i}.JPEG", quality=90)
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    (t / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16, help="training index-set size (the paper's batch)")
    p.add_argument("--train-batches", type=int, default=4, help="training batches per timed repeat")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-items", type=int, default=512, help="items per timed evaluation pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write the raw timings here (atomically)")
    args = p.parse_args(argv)

    import torch

    from lalora.results import atomic_write_json
    from lalora.tasks.data import make_loader
    from lalora.tasks.paper import load_cifar100, load_tiny_imagenet

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lalora-loader-") as tmp:
        root = Path(tmp)
        write_fake_cifar(root, n_train=2000, n_test=args.eval_items)
        write_fake_tiny(root, classes=20, per_class=50, n_val=args.eval_items)
        datasets = {"cifar100": load_cifar100(root, args.image_size),
                    "tinyimagenet": load_tiny_imagenet(root, args.image_size)}
        for name, (train, test, _) in datasets.items():
            def batches(threads):
                train.workers = threads
                n = 0
                for _ in range(args.train_batches):
                    n += len(train.batch(rng.integers(0, len(train), args.batch))["labels"])
                return n

            def evaluate():
                return sum(len(b["labels"]) for b in make_loader(test, args.eval_batch, workers=args.workers))

            variants = {"batch-serial": lambda: batches(0), f"batch-threads{args.threads}": lambda: batches(args.threads),
                        f"loader-eval-workers{args.workers}": evaluate}
            batches(0)  # warm-up: file cache, thread pool
            times = {v: [] for v in variants}
            order = list(variants)
            for rep in range(args.repeats):
                for v in order[rep % len(order):] + order[:rep % len(order)]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    n = variants[v]()
                    times[v].append((n, time.perf_counter() - w0, time.process_time() - c0))
            base = [n / w for n, w, _ in times["batch-serial"]]
            results[name] = {}
            for v, rows in times.items():
                ips = [n / w for n, w, _ in rows]
                results[name][v] = {
                    "images_per_s_median": statistics.median(ips),
                    "ratio_vs_serial_median": statistics.median(a / b for a, b in zip(ips, base)),
                    "cpu_ms_per_image_median": statistics.median(1000 * c / n for n, _, c in rows),
                    "raw": rows}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"image size {args.image_size}², load average {load}, {os.cpu_count()} CPUs")
    print("| data | variant | images/s (median) | × serial | process CPU ms/image |")
    print("|---|---|---|---|---|")
    for name, res in results.items():
        for v, r in res.items():
            print(f"| {name} | {v} | {r['images_per_s_median']:.0f} | {r['ratio_vs_serial_median']:.2f} | "
                  f"{r['cpu_ms_per_image_median']:.2f} |")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "loadavg": load, "cpus": os.cpu_count(),
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
