"""`lalora notebooks`: execute the paper's notebooks with papermill, one parameter profile at a time.

Each notebook source is a jupytext ``py:percent`` file ``notebooks/NN_name.py`` whose first code
cell is tagged ``parameters``. A profile (``ci``: seconds, for tests; ``offline``: the default main
job on a CPU; ``paper``: the paper's settings on a GPU with data and weights on disk;
``paper-smoke``: the paper's models and shapes on generated inputs, one or two rounds, no
downloads; ``LALORA_SMOKE_SIZE=cpu`` shrinks it for a CPU) is a folder
``notebooks/params/<profile>/`` of YAML files, one per notebook. The runner

1. discovers ``NN_*.py`` (report notebooks, ``*_report``, run last so they see every result),
2. converts each with jupytext (kernel ``python3``; a kernelspec pointing at this interpreter is
   installed into ``sys.prefix`` if none exists),
3. injects ``params/<profile>/<name>.yaml`` plus ``profile``, ``output_dir`` and ``runs_dir``
   (a parameter the notebook does not declare is an error naming the file and the key: a typo
   would otherwise silently run the default),
4. executes it with papermill (cwd = repository root) into ``results/<profile>/notebooks/``,
   or only injects the parameters with ``--prepare-only`` (how the ``paper`` profile is checked
   on a machine without its data),
5. keeps going when one notebook fails, and ends with a summary naming every failure,
6. appends a cell that stamps the kernel's provenance (lalora.provenance) into the notebook's
   ``<output_dir>/<name>.json``, and scrubs the stored outputs (no warnings, no absolute
   temporary/venv/home paths: :func:`clean_executed_notebook`).

The module also holds the small helpers the result notebooks share (``experiment_base``,
``make_config``, ``run_grid``, ``accuracy_table``): a grid of federated runs through
``lalora.federated.runs.run_experiment`` (cached by config hash) and the mean ± std table
over seeds that ``lalora.report`` reads. Variant labels such as ``dp-lora+filter`` map to a method
plus config overrides (``VARIANTS``).

Why the runner and not plain ``papermill`` calls: the three profiles, the shared run cache
(``runs_dir``; identical federated configs are trained once for all notebooks) and the
"report last" order are conventions every notebook relies on.
"""
from __future__ import annotations

import ast
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

PROFILES = ("ci", "offline", "offline-full", "evidence", "paper", "paper-smoke")
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")
KERNEL_NAME = "python3"
# Parameters every notebook declares; the runner always injects them.
RUNNER_PARAMETERS = ("profile", "output_dir", "runs_dir")


@dataclass
class NotebookOutcome:
    """What happened to one notebook."""

    name: str
    status: str  # "ok" | "prepared" | "failed"
    seconds: float
    output_path: str
    error: str = ""


@dataclass
class RunSummary:
    profile: str
    outcomes: list[NotebookOutcome] = field(default_factory=list)
    # how the results were produced: the command line and the code version (lalora.provenance.git_info),
    # so that committed results name what made them (issue 15)
    command: str = ""
    code: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[NotebookOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "command": self.command,
            "code": self.code,
            "total_seconds": round(sum(o.seconds for o in self.outcomes), 2),
            "notebooks": [asdict(o) for o in self.outcomes],
        }


# --------------------------------------------------------------------------------------------
# Discovery and parameters
# --------------------------------------------------------------------------------------------
def find_repo_root(start: Path | None = None) -> Path:
    """The folder holding ``notebooks/``: the cwd or one of its parents, else the source checkout."""
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "notebooks").is_dir() and (candidate / "lalora").is_dir():
            return candidate
    return Path(__file__).resolve().parents[1]


def is_report(name: str) -> bool:
    return name.endswith("_report")


def discover(notebooks_dir: Path) -> list[Path]:
    """``NN_name.py`` sources in number order, report notebooks last."""
    if not notebooks_dir.is_dir():
        raise FileNotFoundError(f"notebooks_dir: {notebooks_dir} is not a folder")
    sources = [p for p in notebooks_dir.iterdir() if NOTEBOOK_PATTERN.match(p.name)]
    return sorted(sources, key=lambda p: (is_report(p.stem), p.stem))


def select(sources: Sequence[Path], only: Iterable[str] | None) -> list[Path]:
    """Keep the sources named by ``--only`` (``01_main_vision``, ``01`` or ``main_vision``)."""
    wanted = list(only or [])
    if not wanted:
        return list(sources)
    chosen = []
    for want in wanted:
        want = want.removesuffix(".py")
        hits = [p for p in sources if p.stem == want or p.stem.split("_", 1)[0] == want
                or p.stem.split("_", 1)[-1] == want]
        if not hits:
            names = ", ".join(p.stem for p in sources)
            raise ValueError(f"only: no notebook named {want!r} (have: {names})")
        chosen.extend(h for h in hits if h not in chosen)
    # Keep the canonical order (report last) whatever order --only gave.
    return [p for p in sources if p in chosen]


def load_params(params_dir: Path, profile: str, name: str) -> tuple[dict[str, Any], Path | None]:
    """The YAML parameters of one notebook in one profile ({} and None if there is no file)."""
    import yaml

    path = params_dir / profile / f"{name}.yaml"
    if not path.exists():
        return {}, None
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data, path


def declared_parameters(nb) -> list[str]:
    """Names assigned at top level in the cell tagged ``parameters`` (in order)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            names: list[str] = []
            for node in ast.parse(cell.source).body:
                targets = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id not in names:
                        names.append(t.id)
            return names
    return []


def read_notebook(source: Path):
    """jupytext ``py:percent`` -> nbformat notebook with the ``python3`` kernelspec set."""
    import jupytext

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def resolve_parameters(nb, source: Path, params: dict[str, Any], params_path: Path | None,
                       injected: dict[str, Any]) -> dict[str, Any]:
    """Profile YAML + runner values, checked against the notebook's parameters cell."""
    declared = declared_parameters(nb)
    if not declared:
        raise ValueError(f"{source.name}: no cell tagged 'parameters' (add `# %% tags=[\"parameters\"]`)")
    where = params_path or "runner"
    for key in (*params, *injected):
        if key not in declared:
            raise ValueError(f"{where}: parameter {key!r} is not declared in the parameters cell of "
                             f"{source.name} (declared: {', '.join(declared)})")
    return {**params, **injected}


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure kernel ``name`` exists and runs this interpreter; install it into sys.prefix if not.

    jupyter_client substitutes ``sys.executable`` for a bare ``python``/``python3`` argv[0], so
    the stock ipykernel spec is fine. A user-level ``python3`` spec pointing at another
    interpreter would silently run the notebooks without lalora; then we install and use a
    dedicated ``lalora-python3`` spec in this environment instead.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    generic = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
        exe = spec.argv[0] if spec.argv else ""
        if exe in generic or Path(exe).resolve() == Path(sys.executable).resolve():
            return name
        name = "lalora-python3"
        try:
            spec = manager.get_kernel_spec(name)
            if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
                return name
        except NoSuchKernel:
            pass
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=name, prefix=sys.prefix, display_name=f"Python 3 ({name})")
    return name


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------
def _short_error(err: BaseException) -> str:
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    text = f"{ename}: {evalue}".strip()
    return text if len(text) < 800 else text[:800] + " ..."


def run_notebooks(profile: str, *, only: Iterable[str] | None = None, root: Path | str | None = None,
                  output_dir: Path | str | None = None, runs_dir: Path | str | None = None,
                  prepare_only: bool = False, quiet: bool | None = None, log_output: bool = False,
                  execution_timeout: int | None = None, keep_going: bool = True,
                  echo=print) -> RunSummary:
    """Execute (or, with ``prepare_only``, only parameterise) the notebooks of one profile.

    ``output_dir`` defaults to ``results/<profile>`` and ``runs_dir`` to ``runs`` (both relative
    to the repository root, which is also the kernel's cwd). Returns a summary; it is also
    written to ``<output_dir>/notebooks/runner_summary.json``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    import papermill as pm

    root = Path(root).resolve() if root else find_repo_root()
    notebooks_dir = root / "notebooks"
    params_dir = notebooks_dir / "params"
    output_dir = Path(output_dir) if output_dir else Path("results") / profile
    runs_dir = Path(runs_dir) if runs_dir else Path("runs")
    abs_output = output_dir if output_dir.is_absolute() else root / output_dir
    executed_dir = abs_output / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)  # papermill needs the folder to exist

    if quiet is None:
        quiet = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    # Inherited by the kernels: no progress-bar spam in CI logs, no network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One intra-op thread per kernel unless the user says otherwise: the offline models are tiny,
    # so a second thread gains little on an idle 2-core machine (measured: a digits run 17.1 s
    # with 1 thread vs 15.0 s with 2), while OpenMP threads that spin against any other busy
    # process slowed runs by 10-20x here (a 13 s run took over 4 minutes).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # tqdm.auto warns in every kernel that ipywidgets is missing (we never draw widget bars); the
    # warning carried the build machine's venv path into every committed notebook (issue 20).
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found") if w)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["LALORA_QUIET"] = "1"

    sources = select(discover(notebooks_dir), only)
    kernel = KERNEL_NAME if prepare_only else ensure_kernel()
    from lalora.provenance import git_info

    summary = RunSummary(profile=profile, code=git_info(root),
                         command=" ".join(["lalora notebooks", f"--profile {profile}",
                                           *(f"--only {p.stem}" for p in sources if only)]))
    injected_common = {"profile": profile, "output_dir": str(output_dir), "runs_dir": str(runs_dir)}

    for source in sources:
        name = source.stem
        out_path = executed_dir / f"{name}.ipynb"
        start = time.perf_counter()
        try:
            nb = read_notebook(source)
            add_provenance_cell(nb, name)
            params, params_path = load_params(params_dir, profile, name)
            if params_path is None and not quiet:
                echo(f"[{name}] no params/{profile}/{name}.yaml: using the notebook's defaults")
            parameters = resolve_parameters(nb, source, params, params_path, injected_common)
            echo(f"[{name}] {'preparing' if prepare_only else 'running'} ({profile}) -> "
                 f"{out_path.relative_to(root) if out_path.is_relative_to(root) else out_path}")
            engine_kwargs = {}
            if execution_timeout:
                engine_kwargs["execution_timeout"] = execution_timeout
            pm.execute_notebook(nb, str(out_path), parameters=parameters, prepare_only=prepare_only,
                                kernel_name=kernel, language="python", progress_bar=not quiet,
                                log_output=log_output, cwd=str(root), **engine_kwargs)
            status, error = ("prepared" if prepare_only else "ok"), ""
        except Exception as err:  # noqa: BLE001 -- one failing notebook must not stop the others
            status, error = "failed", _short_error(err)
        try:
            if out_path.exists():
                clean_executed_notebook(out_path, root)
        except Exception as err:  # noqa: BLE001 -- cleaning must not hide the run's own outcome
            status, error = "failed", error or f"cleaning outputs: {_short_error(err)}"
        if status == "failed":
            echo(f"[{name}] FAILED: {error}\n[{name}] see {out_path}")
        seconds = time.perf_counter() - start
        shown = out_path.relative_to(root) if out_path.is_relative_to(root) else out_path   # no machine path
        summary.outcomes.append(NotebookOutcome(name, status, round(seconds, 2), str(shown), error))
        if status != "failed":
            echo(f"[{name}] {status} in {seconds:.1f} s")
        elif not keep_going:
            break

    _write_json_atomic(executed_dir / ("prepare_summary.json" if prepare_only else "runner_summary.json"),
                       summary.to_dict())
    echo(format_summary(summary))
    return summary


# --------------------------------------------------------------------------------------------
# Provenance and clean outputs
# --------------------------------------------------------------------------------------------
PROVENANCE_TAG = "lalora-provenance"


def add_provenance_cell(nb, name: str) -> None:
    """Append a cell that records the kernel's provenance (lalora.provenance: commit, versions,
    CPU flags, threads, backbones loaded) in the notebook's ``<output_dir>/<name>.json``.
    It runs in the kernel because that is where the threads were set and the backbones loaded."""
    import nbformat

    source = (f"# Added by `lalora notebooks`: record how this result was produced (issue 19).\n"
              f"from lalora.provenance import stamp_result_json\n"
              f"stamp_result_json(f\"{{output_dir}}/{name}.json\")")
    nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": [PROVENANCE_TAG]}))


# A warning as Python prints it: "<path>.py:<line>: <Category>Warning: <message>" and the source
# line under it (indented).
_WARNING_LINE = re.compile(r"^\S*\.py:\d+: \w*Warning: .*\n(?:[ \t]+.*\n?)?", re.M)


def scrub_text(text: str, root: Path | str | None = None) -> str:
    """Stored output without warnings and without this machine's absolute paths: the repository
    root becomes ``.``, a virtual environment's site-packages ``<site-packages>``, the home folder
    ``~`` and a temporary folder ``<tmp>``."""
    text = _WARNING_LINE.sub("", text)
    if root:
        text = text.replace(str(Path(root).resolve()) + "/", "./").replace(str(Path(root).resolve()), ".")
    text = re.sub(r"(?:/[^\s'\"/]+)+/site-packages", "<site-packages>", text)
    text = re.sub(r"/(?:tmp|var/tmp|var/folders)(?:/[^\s'\":,)]+)+", "<tmp>", text)
    home = str(Path.home())
    if home not in ("/", ""):
        text = text.replace(home + "/", "~/")
    return text


def clean_executed_notebook(path: Path | str, root: Path | str | None = None) -> bool:
    """Scrub every text output of an executed notebook in place (see :func:`scrub_text`);
    stream outputs left empty are dropped. Returns True if the file changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = scrub_text(out.get("text", ""), root)
                changed |= text != out.get("text", "")
                out["text"] = text
                if not text:
                    continue
            else:
                for mime, value in (out.get("data") or {}).items():
                    if mime.startswith("text/") and isinstance(value, str):
                        new = scrub_text(value, root)
                        changed |= new != value
                        out["data"][mime] = new
                if out.get("output_type") == "error":
                    tb = [scrub_text(t, root) for t in out.get("traceback", [])]
                    changed |= tb != out.get("traceback", [])
                    out["traceback"] = tb
            kept.append(out)
        if "outputs" in cell and len(kept) != len(cell["outputs"]):
            cell["outputs"], changed = kept, True
    # papermill records where it read and wrote the notebook: the build machine's absolute paths
    papermill = nb.metadata.get("papermill") or {}
    for key in ("input_path", "output_path"):
        value = papermill.get(key)
        if isinstance(value, str):
            new = scrub_text(value, root)
            changed |= new != value
            papermill[key] = new
    if changed:
        from lalora.results import atomic_write_bytes

        atomic_write_bytes(path, (nbformat.writes(nb) + "\n").encode())
    return changed


def format_summary(summary: RunSummary) -> str:
    lines = [f"== lalora notebooks --profile {summary.profile}: "
             f"{len(summary.outcomes) - len(summary.failed)}/{len(summary.outcomes)} succeeded, "
             f"{sum(o.seconds for o in summary.outcomes):.1f} s =="]
    for o in summary.outcomes:
        lines.append(f"  {o.status:8s} {o.seconds:8.1f} s  {o.name}" + (f"  -- {o.error}" if o.error else ""))
    if summary.failed:
        lines.append("failed: " + ", ".join(o.name for o in summary.failed)
                     + " (the executed notebooks hold the traceback)")
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: Any) -> None:
    from lalora.results import atomic_write_json

    atomic_write_json(path, data)


def profile_paths(params: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(task, data_root, weights_path) of every task one notebook's parameters name, resolved the
    way :func:`experiment_base` passes them to the task factory."""
    tasks = params.get("tasks") or ([params["task"]] if params.get("task") else [])
    out = []
    for task in tasks:
        base = experiment_base(task, task_overrides=params.get("task_overrides"),
                               data_root=params.get("data_root"), weights_path=params.get("weights_path"))
        ov = base["task_overrides"]
        out.append((task, ov.get("data_root"), ov.get("weights_path")))
    return out


def check_paths(profile: str, *, only: Iterable[str] | None = None, root: Path | str | None = None) -> list[str]:
    """One line per missing or malformed data/weights path in the profile's parameters (relative
    paths are taken from the repository root, the kernels' cwd); [] when all are in place."""
    from lalora.tasks.paper import path_problems

    root = Path(root).resolve() if root else find_repo_root()
    problems: list[str] = []
    seen: set = set()
    for source in select(discover(root / "notebooks"), only):
        params, path = load_params(root / "notebooks" / "params", profile, source.stem)
        for task, data_root, weights_path in profile_paths(params):
            absolute = [None if v is None else (root / Path(v).expanduser()) for v in (data_root, weights_path)]
            if (task, *map(str, absolute)) in seen:
                continue
            seen.add((task, *map(str, absolute)))
            rel = path.relative_to(root) if path else source.stem
            problems += [f"{rel}: {line}" for line in path_problems(task, *absolute)]
    return problems


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("notebooks", help="execute the notebooks of one profile with papermill",
                              description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=PROFILES, default="offline",
                   help="parameter profile: ci (seconds), offline (CPU main job, make reproduce), offline-full (the evidence: "
                        "the DP-bites regime, 5 paired seeds, ~80 min on 2 cores in two processes, results committed), "
                        "evidence (every arm tuned on a public validation split, the paper's eps grid, K = 20: "
                        "docs/EVIDENCE_PLAN.md), "
                        "paper (GPU, data on disk), "
                        "paper-smoke (paper models on generated inputs, 1-2 rounds)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this notebook (01_main_vision, 01 or main_vision); repeatable")
    p.add_argument("--prepare-only", action="store_true",
                   help="inject parameters without executing (checks that a profile resolves)")
    p.add_argument("--output-dir", help="default results/<profile>")
    p.add_argument("--runs-dir", help="federated run cache shared by all notebooks (default runs)")
    p.add_argument("--quiet", action="store_true", default=None,
                   help="no progress bars (default when CI=true)")
    p.add_argument("--log-output", action="store_true", help="stream cell output to the terminal")
    p.add_argument("--execution-timeout", type=int, default=None, help="seconds per cell")
    p.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--list", action="store_true", help="list the notebooks and exit")
    p.add_argument("--check", action="store_true",
                   help="check every data/weights path of the profile and its layout, train nothing; exit 2 "
                        "on a problem (the paper profile also runs this check before executing)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    root = find_repo_root()
    if args.list:
        for source in select(discover(root / "notebooks"), args.only):
            print(source.stem)
        return 0
    if args.check or (args.profile == "paper" and not args.prepare_only):
        problems = check_paths(args.profile, only=args.only, root=root)
        for line in problems:
            print(f"lalora notebooks: error: {line}", file=sys.stderr)
        if problems:
            return 2
        if args.check:
            print(f"lalora notebooks --profile {args.profile} --check: every data and weights path is in place")
            return 0
    summary = run_notebooks(args.profile, only=args.only, root=root, output_dir=args.output_dir,
                            runs_dir=args.runs_dir, prepare_only=args.prepare_only, quiet=args.quiet,
                            log_output=args.log_output, execution_timeout=args.execution_timeout,
                            keep_going=not args.stop_on_failure)
    return 1 if summary.failed else 0


# --------------------------------------------------------------------------------------------
# Helpers the notebooks call: a grid of federated runs -> per-seed records -> mean ± std table
# --------------------------------------------------------------------------------------------
# A variant label that is not a method id maps to (method, RunConfig overrides): the ablation's
# arms are DP-LoRA and LA-LoRA with the low-pass filter switched on or off.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dp-lora+filter": ("dp-lora", {"filter": True}),
    "la-lora-filter": ("la-lora", {"filter": False}),
}


def make_config(base: dict[str, Any], **changes: Any):
    """A RunConfig from a dict of fields; ``method`` may be a variant label (see VARIANTS)."""
    from lalora.config import RunConfig

    fields = {**base, **changes}
    label = fields.get("method")
    if label in VARIANTS:
        method, overrides = VARIANTS[label]
        fields = {**fields, **overrides, "method": method}
    return RunConfig(**fields)


def experiment_base(task: str, *, task_overrides: dict[str, Any] | None = None, data_root: str | None = None,
                    weights_path: str | None = None, **fields: Any) -> dict[str, Any]:
    """RunConfig fields shared by a notebook's grid; ``None`` means "the task's default".

    ``task_overrides`` may be keyed by task name ({"digits-swin": {...}}) or flat; ``data_root``
    and ``weights_path`` (paper profile) are passed to the task factory when given.
    """
    overrides = dict(task_overrides or {})
    if overrides and all(isinstance(v, dict) for v in overrides.values()):
        overrides = dict(overrides.get(task, {}))
    if data_root is not None:
        overrides["data_root"] = data_root
    if weights_path is not None:
        overrides["weights_path"] = weights_path
    base = {k: v for k, v in fields.items() if v is not None}
    return {"task": task, **base, "task_overrides": overrides}


def run_grid(base: dict[str, Any], grid: list[dict[str, Any]], seeds: Sequence[int], runs_dir: str | os.PathLike,
             *, progress: bool | None = None, echo=print) -> list[dict[str, Any]]:
    """Run ``base`` updated by each entry of ``grid``, once per seed; one record per run.

    Identical resolved configs share one cached run folder (``run_experiment``), so notebooks
    that ask for the same run do not train it twice. A record holds the label (``method``, which
    may be a variant such as ``dp-lora+filter``), the grid's own keys, the seed, the final test
    accuracy in %, the ε the most-used client spent, the target ε and the accuracy curve.
    """
    import math

    from lalora.federated.runs import run_experiment

    if progress is None:
        progress = os.environ.get("LALORA_QUIET", "") != "1"
    records = []
    total = len(grid) * len(seeds)
    for i, point in enumerate(grid):
        for seed in seeds:
            cfg = make_config(base, **point, seed=int(seed))
            start = time.perf_counter()
            result = run_experiment(cfg, runs_dir=runs_dir, progress=progress)
            final = result.final
            acc = final.get("accuracy")
            rec = {k: v for k, v in point.items()}
            rec.update({
                "task": cfg.task, "method": point.get("method", cfg.method), "seed": int(seed),
                "epsilon": _eps(point.get("epsilon", cfg.epsilon)),
                "accuracy": 100.0 * float(acc) if acc is not None else math.nan,
                "epsilon_spent": _num(final.get("epsilon_spent")),
                "target_epsilon": _num(final.get("target_epsilon")),
                "noise_multiplier": _num(final.get("noise_multiplier")),
                "private": bool(final.get("private")),
                "accountant": final.get("accountant", result.config.accountant),
                "config": result.config.to_dict(),   # what `lalora verify-results` re-runs
                "cached": bool(result.cached), "wall_time_s": _num(final.get("wall_time_s")),
                # a real path: notebook 06 loads the checkpoint from it. Committed results are produced with
                # a repository-relative runs dir (test_notebook_outputs checks they hold no absolute path)
                "run_dir": str(result.run_dir),
                # evidence bookkeeping: the mechanism (as-released is NOT DP), the bar "did not train"
                # is judged against, and how fedsa-lora was scored
                "dp_mode": cfg.dp_mode, "majority_baseline": 100.0 * _num(final.get("majority_baseline")),
                **{k: final[k] for k in ("privacy", "fedsa_scoring") if k in final},
                "curve": [[m["round"], 100.0 * m["test_accuracy"]] for m in result.metrics
                          if m.get("test_accuracy") is not None],
            })
            records.append(rec)
            if echo:
                state = "cached" if result.cached else f"{time.perf_counter() - start:.0f} s"
                echo(f"[{len(records)}/{total}] {cfg.task} {rec['method']} ε={rec['epsilon']} seed={seed}: "
                     f"acc {rec['accuracy']:.1f}%  ε spent {rec['epsilon_spent']:.3g}  ({state})")
    return records


def _num(value) -> float:
    import math

    if value is None:
        return math.nan
    return float(value)  # "inf" strings (strict JSON) become inf


def _eps(value) -> float | str:
    v = _num(value)
    return "inf" if v == float("inf") else v


def accuracy_table(records: Sequence[dict[str, Any]], by: Sequence[str] = ("task", "method", "epsilon")
                   ) -> list[dict[str, Any]]:
    """Mean ± sample std (ddof=1; 0 for one seed) of the accuracy over seeds, per ``by`` group.

    ``epsilon_spent`` is the largest over the group's seeds (and clients): the number to hold
    against the target.
    """
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in by), []).append(rec)
    rows = []
    for key, recs in groups.items():
        acc = np.array([r["accuracy"] for r in recs], dtype=float)
        row = dict(zip(by, key))
        row.update({
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n_seeds": len(recs),
            "accuracies": [float(a) for a in acc],
            "epsilon_spent": float(max(r["epsilon_spent"] for r in recs)),
            "target_epsilon": recs[0]["target_epsilon"],
            "noise_multiplier": float(np.mean([r["noise_multiplier"] for r in recs])),
        })
        rows.append(row)
    return rows
