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

With ``--jobs N`` (default: the cores this process may use) up to N notebooks execute at once,
each in its own kernel, report notebooks after all the others, and each notebook's grid of runs
trains up to N runs at once in worker processes (lalora.nbtools.run_grid), with at most N runs
training machine-wide (shared slots); every run trains to the same bits as with ``--jobs 1``
(one intra-op thread per process either way; a run two notebooks ask for is trained by one of
them and read from the run cache by the other).

The helpers the result notebooks call (``experiment_base``, ``run_grid``, ``accuracy_table``)
live in :mod:`lalora.nbtools`.

Why the runner and not plain ``papermill`` calls: the three profiles, the shared run cache
(``runs_dir``; identical federated configs are trained once for all notebooks) and the
"report last" order are conventions every notebook relies on.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lalora.nbtools import experiment_base

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
    jobs: int = 1             # notebooks executed at once (--jobs)
    wall_seconds: float = 0.0  # start to end; less than the notebooks' sum when jobs > 1

    @property
    def failed(self) -> list[NotebookOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "command": self.command,
            "code": self.code,
            "total_seconds": round(sum(o.seconds for o in self.outcomes), 2),
            "jobs": self.jobs, "wall_seconds": self.wall_seconds,
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


def default_jobs() -> int:
    """The cores this process may use: ``lalora notebooks``' default ``--jobs``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Execution:
    """What every notebook of one ``run_notebooks`` call shares (picklable: sent to the workers)."""

    profile: str
    root: Path
    params_dir: Path
    executed_dir: Path
    injected: dict
    kernel: str
    prepare_only: bool
    quiet: bool
    log_output: bool
    execution_timeout: int | None


def _execute(job: _Execution, source: Path, echo=print) -> NotebookOutcome:
    """Parameterise, execute and clean one notebook; a failure becomes the outcome, never an exception."""
    import papermill as pm

    root, name = job.root, source.stem
    out_path = job.executed_dir / f"{name}.ipynb"
    start = time.perf_counter()
    try:
        nb = read_notebook(source)
        add_provenance_cell(nb, name)
        params, params_path = load_params(job.params_dir, job.profile, name)
        if params_path is None and not job.quiet:
            echo(f"[{name}] no params/{job.profile}/{name}.yaml: using the notebook's defaults")
        parameters = resolve_parameters(nb, source, params, params_path, job.injected)
        echo(f"[{name}] {'preparing' if job.prepare_only else 'running'} ({job.profile}) -> "
             f"{out_path.relative_to(root) if out_path.is_relative_to(root) else out_path}")
        engine_kwargs = {}
        if job.execution_timeout:
            engine_kwargs["execution_timeout"] = job.execution_timeout
        pm.execute_notebook(nb, str(out_path), parameters=parameters, prepare_only=job.prepare_only,
                            kernel_name=job.kernel, language="python", progress_bar=not job.quiet,
                            log_output=job.log_output, cwd=str(root), **engine_kwargs)
        status, error = ("prepared" if job.prepare_only else "ok"), ""
    except Exception as err:  # noqa: BLE001 -- one failing notebook must not stop the others
        status, error = "failed", _short_error(err)
    try:
        if out_path.exists():
            clean_executed_notebook(out_path, root)
    except Exception as err:  # noqa: BLE001 -- cleaning must not hide the run's own outcome
        status, error = "failed", error or f"cleaning outputs: {_short_error(err)}"
    seconds = time.perf_counter() - start
    shown = out_path.relative_to(root) if out_path.is_relative_to(root) else out_path   # no machine path
    return NotebookOutcome(name, status, round(seconds, 2), str(shown), error)


def _execute_in_worker(job: _Execution, source: Path) -> NotebookOutcome:
    """A worker's progress lines go straight to its stdout (the terminal); the outcome goes back to the
    parent, which reports it through the caller's ``echo``."""
    return _execute(job, source, echo=lambda line: print(line, flush=True))


def _echo_outcome(outcome: NotebookOutcome, echo) -> None:
    if outcome.status == "failed":
        echo(f"[{outcome.name}] FAILED: {outcome.error}\n[{outcome.name}] see {outcome.output_path}")
    else:
        echo(f"[{outcome.name}] {outcome.status} in {outcome.seconds:.1f} s")


def _execute_all(job: _Execution, sources: Sequence[Path], jobs: int, keep_going: bool, echo
                 ) -> tuple[list[NotebookOutcome], bool]:
    """Execute ``sources`` with up to ``jobs`` notebooks at once; (outcomes in source order, stopped).

    Each notebook runs in its own kernel either way, with the same environment (one intra-op
    thread unless the user set OMP_NUM_THREADS), so a run trains to the same bits whichever
    notebook trains it; notebooks asking for the same run share it through the run folder's lock
    (RunDir.exclusive: the second waits, then reads the finished run)."""
    if jobs <= 1 or len(sources) <= 1:
        outcomes = []
        for source in sources:
            outcomes.append(_execute(job, source, echo))
            _echo_outcome(outcomes[-1], echo)
            if outcomes[-1].status == "failed" and not keep_going:
                return outcomes, True
        return outcomes, False
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the parent may hold threads (a test runner, torch) that fork would copy mid-state
    by_source: dict[Path, NotebookOutcome] = {}
    stopped = False
    with ProcessPoolExecutor(max_workers=min(jobs, len(sources)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_execute_in_worker, job, source): source for source in sources}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                source = pending.pop(future)
                if future.cancelled():
                    continue
                by_source[source] = future.result()
                _echo_outcome(by_source[source], echo)
                if by_source[source].status == "failed" and not keep_going and not stopped:
                    stopped = True
                    for other in pending:   # notebooks already running finish; queued ones never start
                        other.cancel()
    return [by_source[s] for s in sources if s in by_source], stopped


@contextmanager
def _run_slots(jobs: int):
    """Let each kernel's grids train up to ``jobs`` runs at once (``LALORA_JOBS``, read by
    lalora.nbtools.run_grid) with at most ``jobs`` runs training machine-wide (``LALORA_RUN_SLOTS``:
    the notebooks running side by side share the slots). Both are restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("LALORA_JOBS", "LALORA_RUN_SLOTS")}
    with tempfile.TemporaryDirectory(prefix="lalora-slots-") as folder:
        os.environ["LALORA_JOBS"] = str(jobs)
        os.environ["LALORA_RUN_SLOTS"] = f"{folder}:{jobs}"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_notebooks(profile: str, *, only: Iterable[str] | None = None, root: Path | str | None = None,
                  output_dir: Path | str | None = None, runs_dir: Path | str | None = None,
                  prepare_only: bool = False, quiet: bool | None = None, log_output: bool = False,
                  execution_timeout: int | None = None, keep_going: bool = True, jobs: int = 1,
                  echo=print) -> RunSummary:
    """Execute (or, with ``prepare_only``, only parameterise) the notebooks of one profile.

    ``output_dir`` defaults to ``results/<profile>`` and ``runs_dir`` to ``runs`` (both relative
    to the repository root, which is also the kernel's cwd). ``jobs`` notebooks run at once (each
    in its own kernel); report notebooks start after every other notebook has finished. Returns a
    summary; it is also written to ``<output_dir>/notebooks/runner_summary.json``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    if int(jobs) < 1:
        raise ValueError(f"jobs: expected a whole number >= 1, got {jobs!r}")

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
    # process slowed runs by 10-20x here (a 13 s run took over 4 minutes). The cores are used by
    # running notebooks side by side instead (``jobs``), which keeps every run's arithmetic the
    # same as in a one-notebook-at-a-time run.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # tqdm.auto warns in every kernel that ipywidgets is missing (we never draw widget bars); the
    # warning carried the build machine's venv path into every committed notebook (issue 20).
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found") if w)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["LALORA_QUIET"] = "1"

    sources = select(discover(notebooks_dir), only)
    if not only:
        sources = _in_profile(sources, params_dir / profile, profile, echo)
    kernel = KERNEL_NAME if prepare_only else ensure_kernel()
    from lalora.provenance import git_info

    # --jobs is not part of the command: it changes how long the results take, not the results
    summary = RunSummary(profile=profile, code=git_info(root),
                         command=" ".join(["lalora notebooks", f"--profile {profile}",
                                           *(f"--only {p.stem}" for p in sources if only)]))
    job = _Execution(profile=profile, root=root, params_dir=params_dir, executed_dir=executed_dir,
                     injected={"profile": profile, "output_dir": str(output_dir), "runs_dir": str(runs_dir)},
                     kernel=kernel, prepare_only=prepare_only, quiet=bool(quiet), log_output=log_output,
                     execution_timeout=execution_timeout)
    # Parameterising is instant: only executed notebooks are worth a process each.
    parallel = 1 if prepare_only else int(jobs)
    start = time.perf_counter()
    stopped = False
    with _run_slots(parallel):
        for stage in ([s for s in sources if not is_report(s.stem)], [s for s in sources if is_report(s.stem)]):
            if stopped:
                break
            outcomes, stopped = _execute_all(job, stage, parallel, keep_going, echo)
            summary.outcomes += outcomes
    summary.jobs, summary.wall_seconds = parallel, round(time.perf_counter() - start, 2)

    path = executed_dir / ("prepare_summary.json" if prepare_only else "runner_summary.json")
    _write_json_atomic(path, _with_earlier_pass(path, summary.to_dict(), partial=bool(only)))
    echo(format_summary(summary))
    return summary


def _with_earlier_pass(path: Path, current: dict, partial: bool) -> dict:
    """What runner_summary.json should hold after this call. A whole-profile pass replaces it; an
    ``--only`` call (e.g. the report notebook re-run after the report code changed) keeps the last whole
    pass's command, code, wall time and notebooks, and appends itself under ``reruns``: the file then
    still says how long the profile took from an empty cache, and which notebooks were re-run since."""
    if not partial or not path.is_file():
        return current
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return current
    if not isinstance(earlier, dict) or "notebooks" not in earlier:
        return current
    rerun = {k: current[k] for k in ("command", "code", "wall_seconds", "notebooks")}
    return {**earlier, "reruns": [*earlier.get("reruns", []), rerun]}


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
    ``~``, a temporary folder ``<tmp>`` and the cache folder named by ``LALORA_CACHE`` (wherever it lies:
    a pass from an empty cache prints where it stores the backbone) ``$LALORA_CACHE``."""
    text = _WARNING_LINE.sub("", text)
    cache = os.environ.get("LALORA_CACHE", "").rstrip("/")   # lalora.tasks.pretrain.cache_dir's variable
    if cache:
        for form in dict.fromkeys((str(Path(cache).resolve()), cache)):
            text = text.replace(form, "$LALORA_CACHE")
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
             f"{sum(o.seconds for o in summary.outcomes):.1f} s"
             + (f" in {summary.wall_seconds:.1f} s wall with {summary.jobs} at once" if summary.jobs > 1 else "")
             + " =="]
    for o in summary.outcomes:
        lines.append(f"  {o.status:8s} {o.seconds:8.1f} s  {o.name}" + (f"  -- {o.error}" if o.error else ""))
    if summary.failed:
        lines.append("failed: " + ", ".join(o.name for o in summary.failed)
                     + " (the executed notebooks hold the traceback)")
    return "\n".join(lines)


def _write_json_atomic(path: Path, data: Any) -> None:
    from lalora.results import atomic_write_json

    atomic_write_json(path, data)


def _in_profile(sources: list[Path], profile_dir: Path, profile: str, echo) -> list[Path]:
    """A profile that has parameter files runs only the notebooks it names: a notebook added later
    (e.g. 14, written for the evidence profile) would otherwise run a committed profile such as
    offline-full at its own small defaults and write a result that belongs to no protocol. Without
    any parameter file (a bare profile folder, a test's tree) every notebook runs at its defaults."""
    if not profile_dir.is_dir() or not any(profile_dir.glob("*.yaml")):
        return sources
    kept = [s for s in sources if (profile_dir / f"{s.stem}.yaml").is_file()]
    for s in sources:
        if s not in kept:
            echo(f"[{s.stem}] not in the {profile} profile (no params/{profile}/{s.stem}.yaml): skipped")
    return kept


def profile_paths(params: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(task, data_root, weights_path) of every task one notebook's parameters name, resolved the
    way :func:`lalora.nbtools.experiment_base` passes them to the task factory."""
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
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="notebooks executed at once, each in its own kernel (default: the number of cores; "
                        "results are the same for any N)")
    p.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--list", action="store_true", help="list the notebooks and exit")
    p.add_argument("--check", action="store_true",
                   help="check every data/weights path of the profile and its layout, train nothing; exit 2 "
                        "on a problem (the paper profile also runs this check before executing)")
    p.set_defaults(func=_main)


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


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
                            keep_going=not args.stop_on_failure,
                            jobs=args.jobs if args.jobs is not None else default_jobs())
    return 1 if summary.failed else 0
