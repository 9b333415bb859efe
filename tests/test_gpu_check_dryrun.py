"""`make gpu-check` dry run: every stage of gpu_check/run.sh on the CPU (Triton interpreter, tiny shapes)
must finish and write its results, so the script is known to run before GPU time is spent on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRYRUN="1", OUT=str(tmp_path), PY=sys.executable, TRITON_CACHE_DIR=str(tmp_path / "tc"))
    proc = subprocess.run(["bash", str(ROOT / "gpu_check" / "run.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    stages = dict(line.split() for line in (tmp_path / "stages.txt").read_text().splitlines())
    assert stages == {"0_compile": "0", "1_kernel_tests": "0", "2_numerics": "0", "3_bench": "0", "4_batched": "0"}, \
        proc.stdout[-3000:] + "\nSTDERR:\n" + proc.stderr[-3000:]
    numerics = json.loads((tmp_path / "numerics.json").read_text())
    assert numerics["dry_run"] and not numerics["failures"] and len(numerics["results"]) > 20
    bench = json.loads((tmp_path / "bench.json").read_text())
    methods = {s["method"] for s in bench["steps"] if not s.get("error")}
    assert {"non-private", "dp_gradient triton", "dp_gradient torch"} <= methods
    assert "| RoBERTa-base" in (tmp_path / "bench.md").read_text()
    batched = json.loads((tmp_path / "batched.json").read_text())
    assert batched["task"] == "smoke-swin-t" and batched["throughput_ratio_batched_over_sequential"] > 0
