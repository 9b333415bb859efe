"""JupyterLab for the notebook sources: `make lab` runs `jupyter lab --config=jupyter/jupyter_lab_config.py`.

* serves ``notebooks/`` (the jupytext ``py:percent`` sources; ``notebooks/jupytext.toml``),
* opens a ``.py`` there as a notebook on double click (``jupyter/lab/settings/overrides.json``:
  the default viewer for Python files is the jupytext extension's "Jupytext Notebook"; right
  click > Open With > Editor still shows the text),
* listens on 127.0.0.1 only and needs no network (JupyterLab's assets ship in the wheel).
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent

c = get_config()  # noqa: F821  (injected by Jupyter when it loads this file)
c.ServerApp.root_dir = str(HERE.parent / "notebooks")
c.ServerApp.ip = "127.0.0.1"
# Settings overrides (JupyterLab reads <app_settings_dir>/overrides.json): a folder in the repo,
# so the default viewer travels with the checkout instead of living in the venv or in ~.
c.LabApp.app_settings_dir = str(HERE / "lab" / "settings")
# The extension manager would query PyPI on start; the project runs offline.
c.LabApp.extension_manager = "readonly"
