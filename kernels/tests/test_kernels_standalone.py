"""dplora_kernels stands alone: the README example runs with none of lalora/opacus/timm/transformers.

The fast test runs the README's example in a fresh interpreter of this venv and inspects sys.modules.
The slow test builds a brand-new virtual environment (no system site-packages), installs torch from a
local wheel directory (DPLORA_TORCH_WHEELS, default /opt/wheels; skipped if none is there) and then only
`pip install ./kernels`, and runs the example there (~3-5 min).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS_DIR = Path(__file__).resolve().parents[1]
FORBIDDEN = ("lalora", "opacus", "timm", "transformers", "peft")


def readme_example() -> str:
    text = (KERNELS_DIR / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def _script() -> str:
    return readme_example() + textwrap.dedent(f"""
        import sys
        bad = [m for m in {FORBIDDEN!r} if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)]
        assert not bad, f"imported: {{bad}}"
        print("STANDALONE-OK")
    """)


def _env():
    # no TRITON_INTERPRET, and no PYTHONPATH: a developer's PYTHONPATH pointing at the repo would let
    # the subprocess (and `pip list`) see lalora's sources and metadata
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
    return env


def test_readme_example_imports_nothing_of_lalora(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_script())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(),
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STANDALONE-OK" in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln[:1].isdigit()]
    assert len(lines) == 3            # three training steps printed


@pytest.mark.slow
def test_fresh_venv_pip_install_kernels_only(tmp_path):
    wheel_dir = os.environ.get("DPLORA_TORCH_WHEELS", "/opt/wheels")
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "torch-*.whl")))
    if not wheels:
        pytest.skip(f"no local torch wheel in {wheel_dir} (set DPLORA_TORCH_WHEELS)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch from the local wheel file (never a multi-GB CUDA download; its small deps come from the
    # index), then only ./kernels
    # _env() for pip too: a developer's PYTHONPATH pointing at the repo made pip resolve torch's
    # dependencies against the repo's environment, leaving typing_extensions out of the fresh venv
    subprocess.run(pip + [wheels[-1]], check=True, timeout=900, env=_env())
    # install from a copy, so that setuptools leaves no build/ or egg-info in the source tree
    src = tmp_path / "kernels"
    shutil.copytree(KERNELS_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    subprocess.run(pip + [str(src)], check=True, timeout=900, env=_env())
    script = tmp_path / "example.py"
    script.write_text(_script())
    out = subprocess.run([py, str(script)], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STANDALONE-OK" in out.stdout
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path).stdout
    assert not [ln for ln in listed.splitlines() if ln.split("==")[0].lower() in FORBIDDEN], listed
