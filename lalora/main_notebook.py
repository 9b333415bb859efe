"""The one body of notebooks 01 (vision) and 02 (language): the paper's main table on a grid of
tasks, methods, ε and seeds. The two notebooks differ only in their text and parameters; each calls
:func:`main_results_notebook` with its own name, so one change reaches both (issue 28).

Output: ``<output_dir>/<notebook>.json`` with the same keys as before (records, table, verdicts,
summary: the report and the tests read them) and the figure ``<notebook>_bars``.
"""
from __future__ import annotations

import time
from typing import Any

from lalora.main_results import (pivot_table, ranking_verdicts, run_main_grid, summarize, with_ci95,
                                 write_results)
from lalora.plotting import accuracy_bars_figure, savefig


def _show(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:   # pragma: no cover - IPython comes with the notebooks extra
        print(obj)
        return
    display(obj)


def main_results_notebook(notebook: str, title: str, *, profile: str, output_dir: str, runs_dir: str,
                          tasks, methods, reference_method, epsilons, seeds, rounds, local_steps,
                          batch_size=None, clients=None, clients_per_round=None, lr=None,
                          task_overrides=None, data_root=None, weights_path=None, device="auto",
                          precision="fp32", started: float | None = None) -> dict[str, Any]:
    """Run (or read) every (task, method, ε, seed), show the mean ± std table, check the claimed
    ranking, draw the bars and write the results JSON; returns the summary."""
    started = time.perf_counter() if started is None else started
    records, table = run_main_grid(tasks, methods, epsilons, seeds, runs_dir, reference_method=reference_method,
                                   task_overrides=task_overrides or {}, data_root=data_root,
                                   weights_path=weights_path, rounds=rounds, local_steps=local_steps,
                                   batch_size=batch_size, clients=clients, clients_per_round=clients_per_round,
                                   lr=lr, device=device, precision=precision)
    _show(pivot_table(table))
    verdicts = ranking_verdicts(records)
    fig = accuracy_bars_figure(with_ci95(table), records, list(tasks), f"{title} ({profile} profile)")
    savefig(fig, output_dir, f"{notebook}_bars")
    summary = summarize(records, table, verdicts, tasks=tasks, methods=methods, epsilons=epsilons, seeds=seeds,
                        rounds=rounds, local_steps=local_steps)
    write_results(output_dir, notebook, profile, records=records, table=table, verdicts=verdicts,
                  summary=summary, started=started)
    return summary
