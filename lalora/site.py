"""`lalora site`: the executed notebooks of a profile as a static HTML site, opened by a file:// URL.

``results/<profile>/notebooks/NN_name.ipynb`` (written by ``lalora notebooks``) become
``results/<profile>/site/NN_name.html`` (nbconvert's lab template, figures embedded as data URIs),
beside an ``index.html`` that lists each notebook with

* its one-paragraph summary (the first paragraph of the notebook's first markdown cell),
* its verdicts, judged by the one rule of ``lalora.verdicts`` from ``results/<profile>/NN_name.json``
  (claims recomputed from the per-seed runs; checks; no yes/no from two numbers without an interval),
  each linked to the notebook section and figure behind it,
* its key numbers (the other numeric entries of the JSON's ``summary``) and figure thumbnails.

The pages load nothing from the network: the lab template's CDN scripts (require.js, MathJax, mermaid,
widgets) are dropped
(the notebooks' markdown has no TeX; the figures' TeX is rendered by matplotlib into the PNGs), and
the figures are copied into ``site/figures/`` so the folder is self-contained.

``verdict_target``/``verdict_links_md`` are also what ``lalora.report`` uses to link each verdict in
``paper/REPORT.md`` to the committed executed notebook (titled with its section) and figure.
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lalora.results import atomic_write_bytes
from lalora.result_files import collect_results, flatten, profile_runs, read_result
from lalora.verdicts import Finding, notebook_findings, trained_tasks

RESULT_NOTEBOOK = re.compile(r"^(\d\d)_[A-Za-z0-9_]+$")
# `savefig(fig, output_dir, "NN_name_what")` is how every notebook saves a figure (lalora.plotting).
SAVEFIG = re.compile(r"savefig\(\s*\w+\s*,\s*\w+\s*,\s*[rf]?[\"']([\w.-]+)[\"']")
HEADING = re.compile(r"<h([1-6])\s+id=\"([^\"]+)\"[^>]*>(.*?)</h\1>", re.S)
KEY_NUMBERS_SHOWN = 10
# The lab template without the scripts it loads from CDNs (require.js, MathJax, mermaid, the widget
# manager): the site must open offline, and the notebooks have no TeX markdown, diagrams or widgets.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""
# Words that say nothing about which section a verdict comes from.
STOPWORDS = {"the", "a", "an", "of", "and", "or", "vs", "to", "in", "on", "at", "for", "is", "than",
             "with", "by", "per", "from", "eps", "ε", "claim", "here", "what", "does"}


# --------------------------------------------------------------------------------------------
# Notebook structure: sections (heading ids as nbconvert renders them) and the figures they save
# --------------------------------------------------------------------------------------------
@dataclass
class Section:
    title: str                      # heading text
    anchor: str                     # the id nbconvert gives the heading (already URL-safe)
    body: str = ""                  # the markdown under the heading (for matching verdicts)
    figures: list[str] = field(default_factory=list)  # figure names saved by code in the section


def _cell_source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def markdown_to_html(source: str) -> str:
    """Markdown as nbconvert renders a markdown cell (same heading ids and anchor links)."""
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    return MarkdownWithMath(renderer=IPythonRenderer(escape=False, anchor_link_text="¶")).render(source)


def _text(fragment: str) -> str:
    """Visible text of an HTML fragment (drops the ¶ anchor link)."""
    fragment = re.sub(r"<a class=\"anchor-link\".*?</a>", "", fragment, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def notebook_sections(nb: Mapping[str, Any]) -> list[Section]:
    """Every markdown heading of a notebook, in order, with the figures saved below it."""
    sections: list[Section] = []
    for cell in nb.get("cells", []):
        source = _cell_source(cell)
        if cell.get("cell_type") == "markdown":
            rendered = markdown_to_html(source)
            headings = list(HEADING.finditer(rendered))
            for match in headings:
                sections.append(Section(_text(match.group(3)), html.unescape(match.group(2))))
            if sections:
                # The cell's prose (minus heading lines) describes the last heading of the cell.
                sections[-1].body += "\n" + "\n".join(
                    line for line in source.splitlines() if not line.lstrip().startswith("#"))
        elif cell.get("cell_type") == "code" and sections:
            sections[-1].figures += SAVEFIG.findall(source)
    return sections


def load_notebook(results_root: Path, profile: str, name: str) -> dict | None:
    """The executed notebook, else its jupytext source (same markdown, so the same sections)."""
    executed = Path(results_root) / profile / "notebooks" / f"{name}.ipynb"
    try:
        if executed.is_file():
            return json.loads(executed.read_text())
        source = _repo_root() / "notebooks" / f"{name}.py"
        if source.is_file():
            import jupytext

            return jupytext.read(source)
    except (OSError, ValueError, ImportError):
        return None
    return None


def _repo_root() -> Path:
    from lalora.notebooks import find_repo_root

    return find_repo_root()


def first_paragraph(nb: Mapping[str, Any]) -> str:
    """The first paragraph (markdown) of the first markdown cell, heading lines skipped."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        lines: list[str] = []
        for line in _cell_source(cell).splitlines():
            if line.lstrip().startswith("#"):
                if lines:
                    break
                continue
            if not line.strip():
                if lines:
                    break
                continue
            lines.append(line)
        text = " ".join(line.strip() for line in lines)
        # A paragraph that leads into a table or list ("... and compare") is marked as cut.
        return text if not text or text[-1] in ".!?)" else text + " …"
    return ""


def notebook_title(nb: Mapping[str, Any], name: str) -> str:
    sections = notebook_sections(nb)
    return sections[0].title if sections else name


# --------------------------------------------------------------------------------------------
# Verdicts and key numbers from the results JSON
# --------------------------------------------------------------------------------------------
def verdicts(data: Mapping[str, Any], trained: Mapping[str, bool] | None = None) -> list[Finding]:
    """What the index shows as a notebook's verdicts: ``lalora.verdicts.notebook_findings`` (the one
    rule; claims recomputed from the runs, no yes/no from two numbers without an interval)."""
    return notebook_findings(data, trained)


def key_numbers(data: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Numeric entries of the JSON's ``summary`` (top-level scalars when it has none)."""
    summary = data.get("summary") if isinstance(data.get("summary"), Mapping) else None
    items = flatten(summary) if summary else [(k, v) for k, v in data.items() if not isinstance(v, (Mapping, list))]
    return [(k, v) for k, v in items
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def fmt_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "∞"
    return f"{value:.4g}"


# --------------------------------------------------------------------------------------------
# Which section and figure produced a verdict
# --------------------------------------------------------------------------------------------
def _tokens(text: str) -> set[str]:
    text = re.sub(r"(?<=[a-zA-Z])(?=\d)|(?<=\d)(?=[a-zA-Z])", " ", text.lower())
    words = re.findall(r"[a-zα-ω0-9]+", text)
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in STOPWORDS}


def verdict_target(sections: list[Section], key: str) -> tuple[Section | None, str | None]:
    """(section, figure name) behind a verdict key.

    The section whose heading (weight 2) and prose (weight 1) share the most words with the key;
    ranking verdicts go to the section that asks whether the ranking holds. With no shared word,
    the first section that saves a figure. The figure is the first one saved in or after the
    section (a verdict's table section is usually followed by its figure).
    """
    if not sections:
        return None, None
    words = _tokens(key)
    if "ranking" in words:
        words |= {"hold"}
    best, best_score = None, 0
    for section in sections[1:] or sections:  # the title section matches everything; last resort
        score = 2 * len(words & _tokens(section.title)) + len(words & _tokens(section.body))
        if score > best_score:
            best, best_score = section, score
    if best is None:
        best = next((s for s in sections if s.figures), sections[0])
    start = sections.index(best)
    figure = next((f for s in sections[start:] for f in s.figures), None)
    if figure is None:
        figure = next((f for s in sections for f in s.figures), None)
    return best, figure


def verdict_links_md(results_root: str | os.PathLike, profile: str, notebook: str, key: str,
                     from_dir: str | os.PathLike) -> str:
    """`` ([notebook § Title](…/notebooks/NN_name.ipynb), [figure](…png))`` for a Markdown file in ``from_dir``.

    Links go to files the repository commits: the executed notebook (``results/<profile>/notebooks``),
    else the notebook's JSON, and the figure in ``results/<profile>/figures``; never into the rendered
    site (``results/*/site`` is not committed). Empty when neither the notebook nor its JSON exists.
    """
    root = Path(results_root)
    rel = Path(os.path.relpath((root / profile).resolve(), Path(from_dir).resolve())).as_posix()
    section, figure = verdict_target(_cached_sections(str(root.resolve()), profile, notebook), key)
    if (root / profile / "notebooks" / f"{notebook}.ipynb").is_file():
        title = f"{notebook} § {_md_text(section.title)}" if section else notebook
        links = [f"[{title}](<{rel}/notebooks/{notebook}.ipynb>)"]
    elif (root / profile / f"{notebook}.json").is_file():
        links = [f"[{notebook}.json](<{rel}/{notebook}.json>)"]
    else:
        return ""
    if figure and (root / profile / "figures" / f"{figure}.png").is_file():
        links.append(f"[figure {figure}](<{rel}/figures/{figure}.png>)")
    return " (" + ", ".join(links) + ")"


@functools.lru_cache(maxsize=64)
def _cached_sections(root: str, profile: str, notebook: str) -> list[Section]:
    # The report asks once per verdict; parse each notebook once per process.
    nb = load_notebook(Path(root), profile, notebook)
    return notebook_sections(nb) if nb is not None else []


def _md_text(text: str) -> str:
    return re.sub(r"([\[\]|*_`<>])", r"\\\1", text)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _exporter():
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", template_file="lalora_site.html.j2",
                        extra_loaders=[jinja2.DictLoader({"lalora_site.html.j2": OFFLINE_TEMPLATE})])


RELATIVE_URL = re.compile(r'(<(?:a|img)\s[^>]*?(?:href|src)=")(?![#/]|[a-zA-Z][a-zA-Z0-9+.-]*:)([^"]+)(")')


def rebase_links(page: str, base: Path, out_dir: Path, default_out: Path | None = None) -> str:
    """Relative links written for a file in ``base`` (the report's Markdown) re-pointed from ``out_dir``.

    A link into ``default_out`` (the profile's usual site folder) goes to ``out_dir`` instead: the
    site links to itself wherever it is written.
    """
    out_dir = Path(out_dir).resolve()
    default_out = Path(default_out).resolve() if default_out else out_dir

    def fix(m):
        url = html.unescape(m.group(2))
        path, sep, fragment = url.partition("#")
        target = Path(os.path.normpath(Path(base).resolve() / path)) if path else None
        if target is not None and target.is_relative_to(default_out):
            target = out_dir / target.relative_to(default_out)
        new = (Path(os.path.relpath(target, Path(out_dir).resolve())).as_posix() if target else "") + sep + fragment
        return m.group(1) + html.escape(new, quote=True) + m.group(3)
    return RELATIVE_URL.sub(fix, page)


def link_base(profile_dir: Path, data: Mapping | None) -> Path:
    """The folder a notebook's output links are relative to: that of the report it wrote, else the profile's."""
    report_path = ((data or {}).get("summary") or {}).get("report_path") if isinstance(data, Mapping) else None
    if isinstance(report_path, str) and report_path:
        path = Path(report_path)
        return (path if path.is_absolute() else _repo_root() / path).parent  # the runner's cwd is the repo root
    return profile_dir


def render_notebook(exporter, ipynb: Path, title: str, base: Path | None = None, out_dir: Path | None = None) -> str:
    import nbformat

    nb = nbformat.read(str(ipynb), as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    if base is not None and out_dir is not None:
        body = rebase_links(body, base, out_dir, Path(ipynb).parent.parent / "site")
    nav = ('<nav class="lalora-nav" style="padding:8px 16px;font-family:sans-serif">'
           '<a href="index.html">← all notebooks</a></nav>')
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)


INDEX_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em} h2{font-size:1.2em;margin:0 0 .3em} .nb{border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
.meta{color:#666;font-size:.9em} .ok{color:#1a7f37} .fail{color:#c62828} table{border-collapse:collapse;font-size:.9em}
td{padding:2px 10px 2px 0;vertical-align:top} .thumbs img{height:140px;margin:4px 8px 0 0;border:1px solid #eee}
ul.verdicts{padding-left:1.2em;margin:.4em 0} code{background:#f4f4f4;padding:0 3px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _mark(verdict: str) -> str:
    """✔ for a check that passed or a claim that holds, ✘ for a failed check or a reversed claim, and
    the rule's words otherwise (unresolved, insufficient seeds, below majority baseline, ...)."""
    if verdict in ("yes", "holds"):
        return f'<span class="ok">✔ {_e(verdict)}</span>'
    if verdict in ("no", "reversed", "fails"):
        return f'<span class="fail">✘ {_e(verdict)}</span>'
    return f'<span class="meta">○ {_e(verdict)}</span>'


def _index_entry(name: str, nb: dict | None, data: dict | None, page: str | None,
                 outcome: Mapping | None, figures: list[str], trained: Mapping[str, bool] | None = None) -> str:
    title = notebook_title(nb, name) if nb else name
    head = f'<a href="{_e(page)}">{_e(title)}</a>' if page else _e(title)
    parts = [f'<section class="nb" id="{_e(name)}"><h2>{head}</h2>']
    meta = [f"<code>{_e(name)}</code>"]
    if outcome:
        status = outcome.get("status", "?")
        meta.append(f'<span class="{"ok" if status == "ok" else "fail"}">{_e(status)}</span>'
                    f" in {float(outcome.get('seconds', 0)):.0f} s")
    if not page:
        meta.append('<span class="fail">no executed notebook</span>')
    parts.append(f'<div class="meta">{" · ".join(meta)}</div>')
    if nb:
        paragraph = first_paragraph(nb)
        if paragraph:
            parts.append(markdown_to_html(paragraph))
    if data is None:
        parts.append("<p class=\"meta\">No results JSON.</p>")
    elif "_error" in data:
        parts.append(f'<p class="fail">Could not read the results JSON: {_e(data["_error"])}</p>')
    else:
        sections = notebook_sections(nb) if nb else []
        items = []
        for v in verdicts(data, trained):
            mark = _mark(v.verdict)
            links = []
            section, figure = verdict_target(sections, v.key)
            if section and page:
                links.append(f'<a href="{_e(page)}#{_e(section.anchor)}">§ {_e(section.title)}</a>')
            if figure and figure in figures:
                links.append(f'<a href="figures/{_e(figure)}.png">figure</a>')
            items.append(f"<li>{mark} — {_e(v.text)}" + (f' <span class="meta">({", ".join(links)})</span>'
                                                          if links else "") + "</li>")
        if items:
            parts.append(f'<strong>Verdicts</strong><ul class="verdicts">{"".join(items)}</ul>')
        numbers = key_numbers(data)
        if numbers:
            rows = [f"<tr><td>{_e(k)}</td><td>{_e(fmt_number(v))}</td></tr>" for k, v in numbers]
            parts.append(f"<strong>Key numbers</strong><table>{''.join(rows[:KEY_NUMBERS_SHOWN])}</table>")
            if len(rows) > KEY_NUMBERS_SHOWN:
                parts.append(f"<details><summary>{len(rows) - KEY_NUMBERS_SHOWN} more</summary>"
                             f"<table>{''.join(rows[KEY_NUMBERS_SHOWN:])}</table></details>")
    own = [f for f in figures if f.startswith(name + "_")]
    if own:
        parts.append('<div class="thumbs">' + "".join(
            f'<a href="figures/{_e(f)}.png"><img src="figures/{_e(f)}.png" alt="{_e(f)}"></a>' for f in own)
            + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def build_site(results_root: str | os.PathLike, profile: str, out_dir: str | os.PathLike | None = None,
               log=print) -> Path:
    """Render every executed notebook of ``profile`` and write ``index.html``; returns its path."""
    root = Path(results_root)
    profile_dir = root / profile
    nb_dir = profile_dir / "notebooks"
    executed = sorted(p for p in nb_dir.glob("*.ipynb") if RESULT_NOTEBOOK.match(p.stem)) if nb_dir.is_dir() else []
    if not executed:
        raise FileNotFoundError(f"profile: no executed notebooks in {nb_dir} "
                                f"(run `lalora notebooks --profile {profile}` first)")
    out = Path(out_dir) if out_dir else profile_dir / "site"
    out.mkdir(parents=True, exist_ok=True)

    # Figures travel with the site so the folder opens anywhere.
    figures: list[str] = []
    fig_out = out / "figures"
    fig_out.mkdir(exist_ok=True)
    for png in sorted((profile_dir / "figures").glob("*.png")):
        atomic_write_bytes(fig_out / png.name, png.read_bytes())
        figures.append(png.stem)
    for stale in fig_out.glob("*.png"):
        if stale.stem not in figures:
            stale.unlink()

    exporter = _exporter()
    pages = {}
    for ipynb in executed:
        nb = json.loads(ipynb.read_text())
        base = link_base(profile_dir, read_result(profile_dir / f"{ipynb.stem}.json"))
        text = render_notebook(exporter, ipynb, notebook_title(nb, ipynb.stem), base, out)
        atomic_write_bytes(out / f"{ipynb.stem}.html", text.encode())
        pages[ipynb.stem] = f"{ipynb.stem}.html"
        log(f"site: rendered {ipynb.stem}")
    for stale in out.glob("*.html"):
        if stale.stem not in pages and stale.name != "index.html":
            stale.unlink()

    outcomes = {}
    summary_path = nb_dir / "runner_summary.json"
    if summary_path.is_file():
        try:
            outcomes = {o["name"]: o for o in json.loads(summary_path.read_text()).get("notebooks", [])}
        except (OSError, ValueError, KeyError, TypeError):
            outcomes = {}
    names = sorted(set(pages) | {p.stem for p in profile_dir.glob("*.json") if RESULT_NOTEBOOK.match(p.stem)}
                   | set(outcomes))
    results = collect_results(root, [profile]).get(profile, {})
    trained = trained_tasks(profile_runs(results))     # the rule needs the profile's non-private runs
    entries = []
    for name in names:
        nb = load_notebook(root, profile, name)
        entries.append(_index_entry(name, nb, results.get(name), pages.get(name), outcomes.get(name), figures,
                                    trained))
    toc = "".join(f'<li><a href="#{_e(n)}">{_e(n)}</a></li>' for n in names)
    index = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f"<title>lalora results: {_e(profile)}</title><style>{INDEX_CSS}</style></head><body>\n"
             f"<h1>lalora results — profile <code>{_e(profile)}</code></h1>\n"
             f"<p>Each notebook as executed by <code>lalora notebooks --profile {_e(profile)}</code>, rendered "
             f"by <code>lalora site</code>. Verdicts and key numbers come from "
             f"<code>results/{_e(profile)}/NN_name.json</code>, judged by one rule (<code>lalora.verdicts</code>: "
             f"≥ 5 paired seeds, both arms above the majority baseline, paired 95% CI; ○ marks a claim without "
             f"a verdict); each verdict links to the notebook section and the figure behind it.</p>\n<ul>{toc}</ul>\n" + "\n".join(entries) + "\n</body></html>\n")
    index_path = out / "index.html"
    atomic_write_bytes(index_path, index.encode())
    return index_path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("site", help="render the executed notebooks of a profile as a static HTML site",
                              description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="offline", help="results/<profile>/notebooks to render (default offline)")
    p.add_argument("--results-dir", default="results", help="folder holding <profile>/ (default results)")
    p.add_argument("--out", help="output folder (default results/<profile>/site)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.profile or ""):
        print(f"lalora site: --profile must be a folder name such as ci or offline, got {args.profile!r}",
              file=sys.stderr)
        return 2
    try:
        index = build_site(args.results_dir, args.profile, args.out)
    except FileNotFoundError as err:
        print(f"lalora site: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"lalora site: needs the notebooks extra (pip install 'lalora[notebooks]'): {err}", file=sys.stderr)
        return 2
    print(f"site: open {index.resolve().as_uri()}")
    return 0
