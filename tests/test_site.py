"""`lalora site`: executed notebooks -> static HTML with an index of summaries, verdicts and key numbers.

Fast tests build a site from a tiny synthetic profile in tmp_path (two notebooks, one figure);
the slow test renders the real ``ci`` profile and loads it in headless Chromium.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from lalora import site

REPO = Path(__file__).resolve().parents[1]
PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


# --------------------------------------------------------------------------------------------
# Checking a rendered site: every <img>, <script>, <link> and internal <a> resolves
# --------------------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []   # (tag, url)
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for tag_name, attr in (("img", "src"), ("script", "src"), ("link", "href"), ("a", "href")):
            if tag == tag_name and attrs.get(attr):
                self.refs.append((tag, attrs[attr]))


def parse(path: Path) -> _Refs:
    parser = _Refs()
    parser.feed(path.read_text())
    return parser


def _check_cross_site(target: Path, fragment: str, results_root: Path | None) -> None:
    """A link out of the site (the report's links to another profile's site or figures)."""
    if target.suffix == ".html" and target.parent.name == "site" and results_root is not None:
        # Another profile's site, which may not be rendered: its notebook must exist and have the section.
        profile_dir = target.parent.parent
        assert profile_dir.parent.resolve() == Path(results_root).resolve(), target
        nb = site.load_notebook(results_root, profile_dir.name, target.stem)
        assert nb is not None, f"link to {target}: no executed notebook behind it"
        if fragment:
            assert fragment in {s.anchor for s in site.notebook_sections(nb)}, (target, fragment)
    else:
        assert target.is_file(), f"link to missing {target}"


def check_site(folder: Path, results_root: Path | None = None) -> dict:
    """Assert that every page's images and internal links resolve; returns counts for the caller."""
    pages = sorted(folder.glob("*.html"))
    parsed = {p.name: parse(p) for p in pages}
    counts = {"pages": len(pages), "img_data": 0, "img_file": 0, "links": 0, "anchors": 0, "cross_site": 0}
    for name, refs in parsed.items():
        for tag, url in refs.refs:
            if tag == "a" and (url.startswith(("http://", "https://", "mailto:"))):
                continue  # prose links to papers; not part of the site
            assert not url.startswith(("http://", "https://", "//")), f"{name}: <{tag}> loads {url} from the network"
            if url.startswith("data:"):
                assert tag == "img" and url.startswith("data:image/png;base64,"), (name, url[:40])
                assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n", name
                counts["img_data"] += 1
                continue
            parts = urlsplit(url)
            target = name if not parts.path else unquote(parts.path)
            resolved = Path(os.path.normpath(folder / target))
            if not resolved.is_relative_to(folder):
                _check_cross_site(resolved, parts.fragment, results_root)
                counts["cross_site"] += 1
                continue
            assert (folder / target).is_file(), f"{name}: <{tag}> {url} -> missing {target}"
            if tag == "img":
                assert (folder / target).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                counts["img_file"] += 1
            else:
                counts["links"] += 1
            if parts.fragment:
                assert parts.fragment in parsed[target].ids, f"{name}: {url}: no id {parts.fragment!r} in {target}"
                counts["anchors"] += 1
    return counts


# --------------------------------------------------------------------------------------------
# A tiny synthetic profile
# --------------------------------------------------------------------------------------------
def _fake_profile(root: Path, profile: str = "demo") -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    out = root / profile
    (out / "notebooks").mkdir(parents=True)
    (out / "figures").mkdir()
    (out / "figures" / "01_alpha_curve.png").write_bytes(PNG_1x1)
    png_output = new_output("display_data", data={"image/png": base64.b64encode(PNG_1x1).decode()})
    nb = new_notebook(cells=[
        new_markdown_cell("# 01 · Alpha: a test notebook\n\nThe **first** paragraph summarises it.\n\n"
                          "A second paragraph that the index leaves out."),
        new_markdown_cell("## Table: the numbers"),
        new_code_cell("x = 1", outputs=[new_output("stream", text="1\n")]),
        new_markdown_cell("## Does the ranking hold here?\n\nCompare LA-LoRA and DP-LoRA."),
        new_markdown_cell("## Figure: curve (ε ≤ 3)"),
        new_code_cell('savefig(fig, output_dir, "01_alpha_curve")', outputs=[png_output]),
        new_markdown_cell("## Filter gain check"),
    ])
    nbformat.write(nb, str(out / "notebooks" / "01_alpha.ipynb"))
    nb2 = new_notebook(cells=[new_markdown_cell("# 02 · Beta\n\nOnly a title and a paragraph.")])
    nbformat.write(nb2, str(out / "notebooks" / "02_beta.ipynb"))
    # one seed per method, LA-LoRA's mean far above DP-LoRA's: the means are ordered, but the rule
    # (>= 5 paired seeds) gives no verdict; the notebook's own bare flag says "holds"
    runs = [{"task": "toy", "method": m, "epsilon": 3.0, "seed": 0, "accuracy": a, "majority_baseline": 10.0,
             "run_dir": f"runs/toy/{m}/0"} for m, a in (("la-lora", 80.0), ("dp-lora", 60.0))]
    (out / "01_alpha.json").write_text(json.dumps({
        "notebook": "01_alpha", "runs": runs,
        "claims": [{"claim": "LA-LoRA > DP-LoRA", "verdict": "holds", "task": "toy", "epsilon": 3.0}],
        "summary": {"ranking_holds": {"toy ε=3": True}, "claim: filter_gain": True, "cached": True,
                    "final_accuracy": 68.61111, "rounds": 10, "method": "la-lora"}}))
    (out / "02_beta.json").write_text(json.dumps({"every_bug_caught": True, "trials": 400}))
    (out / "03_gamma.json").write_text("{not json")
    return out


def test_summary_verdicts_and_numbers_from_the_json():
    data = {"summary": {"ranking_holds": {"a ε=3": True}, "claim: z": False, "cached": False,
                        "la_lora_flatter": True, "n": 3, "acc": 70.5, "flag_list": [1, 2], "name": "x"}}
    # checks are yes/no; a bare flag from two numbers (an order of means, a flatness) is not a verdict
    assert [(v.key, v.verdict) for v in site.verdicts(data)] == [("claim: z", "no")]
    assert site.key_numbers(data) == [("n", 3), ("acc", 70.5)]
    # No summary: the top-level true/false entries and the {name: bool} checks of notebooks 08/09/12.
    top = site.verdicts({"every_bug_caught": True, "claims": {"c": False}, "seconds": 3.0})
    assert [(v.key, v.verdict) for v in top] == [("every_bug_caught", "yes"), ("claim: c", "no")]
    # claims written as paired-seed records are never trusted: they are recomputed from the runs by the
    # rule (a list here used to crash the site build of every profile that ran notebook 11)
    runs = [{"task": "t", "method": m, "epsilon": 1.0, "seed": s, "accuracy": a + s, "majority_baseline": 10.0}
            for s in range(5) for m, a in (("la-lora", 80.0), ("dp-lora", 70.0))]
    found = site.verdicts({"claims": [{"claim": "LA-LoRA > DP-LoRA", "verdict": "reversed"}], "runs": runs})
    assert [(v.key, v.verdict) for v in found] == [("ranking holds", "holds"), ("claim: LA-LoRA > DP-LoRA", "holds")]
    assert found[1].text.startswith("t, epsilon 1: LA-LoRA > DP-LoRA +10.00")
    one_seed = site.verdicts({"runs": [r for r in runs if r["seed"] == 0]})
    assert [v.verdict for v in one_seed] == ["insufficient seeds", "insufficient seeds"]
    assert site.first_paragraph({"cells": [{"cell_type": "code", "source": "x"},
                                           {"cell_type": "markdown", "source": "# T\n\nOne\ntwo.\n\nThree"}]}) == "One two."
    assert site.first_paragraph({"cells": [{"cell_type": "markdown", "source": "# T\n\nand compare\n\n| a |"}]}) \
        == "and compare …"


def test_verdict_goes_to_the_section_and_figure_that_produced_it(tmp_path):
    import nbformat

    out = _fake_profile(tmp_path)
    sections = site.notebook_sections(nbformat.read(str(out / "notebooks" / "01_alpha.ipynb"), as_version=4))
    assert [s.title for s in sections] == ["01 · Alpha: a test notebook", "Table: the numbers",
                                           "Does the ranking hold here?", "Figure: curve (ε ≤ 3)",
                                           "Filter gain check"]
    assert sections[3].figures == ["01_alpha_curve"]
    section, figure = site.verdict_target(sections, "ranking_holds.toy ε=3")
    assert section.title == "Does the ranking hold here?" and figure == "01_alpha_curve"
    section, figure = site.verdict_target(sections, "claim: filter_gain")
    assert section.title == "Filter gain check"
    assert figure == "01_alpha_curve"  # no figure in or after it: the notebook's first
    section, _ = site.verdict_target(sections, "something unrelated")
    assert section.title == "Figure: curve (ε ≤ 3)"  # no shared word: the first section with a figure


def test_site_from_a_synthetic_profile(tmp_path):
    out = _fake_profile(tmp_path)
    index = site.build_site(tmp_path, "demo", log=lambda *_: None)
    assert index == out / "site" / "index.html"
    folder = index.parent
    assert sorted(p.name for p in folder.glob("*.html")) == ["01_alpha.html", "02_beta.html", "index.html"]
    counts = check_site(folder)
    assert counts["img_data"] >= 1 and counts["img_file"] >= 1 and counts["anchors"] >= 2
    text = index.read_text()
    assert "The <strong>first</strong> paragraph summarises it." in text
    assert "second paragraph" not in text
    # the 1-seed ranking and claim: no verdict, whatever the notebook's flag or claim list said
    assert "toy, epsilon 3: ranking LA-LoRA &gt; DP-LoRA" in text and "○ insufficient seeds" in text
    assert "✔ holds" not in text and "ranking_holds" not in text
    assert "cached" not in text  # a run-cache flag, not a finding
    assert "68.61" in text and "every_bug_caught" in text
    assert "Could not read the results JSON" in text  # 03_gamma.json is broken: said, not fatal
    # The verdict links into the notebook at the heading nbconvert rendered.
    ids = parse(folder / "01_alpha.html").ids
    href = re.search(r'<a href="01_alpha\.html#([^"]+)">§ Filter gain check</a>', text)
    assert href and href.group(1) in ids
    page = (folder / "01_alpha.html").read_text()
    assert '<a href="index.html">' in page
    assert not re.search(r"cdnjs|unpkg|jsdelivr|googleapis", page)  # nothing fetched from a CDN

    # Rebuilding after a notebook disappears drops its page.
    (out / "notebooks" / "02_beta.ipynb").unlink()
    site.build_site(tmp_path, "demo", log=lambda *_: None)
    assert not (folder / "02_beta.html").exists()
    check_site(folder)


def test_report_links_go_to_committed_files(tmp_path):
    # results/*/site is not committed: REPORT.md links to the executed notebook and the figure instead
    out = _fake_profile(tmp_path)
    report_dir = tmp_path / "paper"
    report_dir.mkdir()
    md = site.verdict_links_md(tmp_path, "demo", "01_alpha", "ranking holds", report_dir)
    links = re.findall(r"\]\(<([^>]+)>\)", md)
    assert len(links) == 2 and "01_alpha § Does the ranking hold here?" in md
    assert (report_dir / links[0]).resolve() == (out / "notebooks" / "01_alpha.ipynb").resolve()
    assert (report_dir / links[1]).resolve() == (out / "figures" / "01_alpha_curve.png").resolve()
    assert not any("/site/" in link for link in links)
    # no executed notebook: the JSON
    (out / "notebooks" / "01_alpha.ipynb").unlink()
    md = site.verdict_links_md(tmp_path, "demo", "01_alpha", "ranking holds", report_dir)
    assert (report_dir / re.findall(r"\]\(<([^>]+)>\)", md)[0]).resolve() == (out / "01_alpha.json").resolve()
    assert site.verdict_links_md(tmp_path, "demo", "99_missing", "x", report_dir) == ""


def test_cli_bad_profile_is_one_line_exit_2(tmp_path, capsys):
    from lalora.cli import main

    assert main(["site", "--profile", "nope", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no executed notebooks" in err and "nope" in err
    assert main(["site", "--profile", "../x"]) == 2
    assert "--profile" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The real ci profile in headless Chromium
# --------------------------------------------------------------------------------------------
BROWSER_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute("src").slice(0, 40),
                                              ok: i.complete && i.naturalWidth > 0}));
  document.body.setAttribute("data-probe", JSON.stringify(imgs));
});
</script></body>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium: `make test-site` installs it (apt-get install chromium)")


def _browser(args: list[str], url: str, profile_dir: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile_dir}",
           "--hide-scrollbars", "--virtual-time-budget=10000", *args, url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root (containers)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _ci_results(tmp_path: Path) -> Path:
    """results/ci when `lalora notebooks --profile ci` ran (make test-site does), else a fresh run in tmp."""
    existing = REPO / "results"
    if (existing / "ci" / "notebooks" / "runner_summary.json").is_file():
        return existing
    from lalora import notebooks as nbr

    root = tmp_path / "results"
    summary = nbr.run_notebooks("ci", root=REPO, output_dir=root / "ci", runs_dir=tmp_path / "runs", quiet=True)
    assert not summary.failed, [f.name for f in summary.failed]
    return root


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ci_site_in_headless_chromium(tmp_path):
    results = _ci_results(tmp_path)
    executed = sorted((results / "ci" / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(executed) == len(list((REPO / "notebooks").glob("[0-9][0-9]_*.py")))
    index = site.build_site(results, "ci", log=lambda *_: None)  # results/ci/site, as `make site PROFILE=ci`
    folder = index.parent
    counts = check_site(folder, results)
    print(f"site check: {counts}")
    assert counts["pages"] == len(executed) + 1
    assert counts["img_data"] >= 10 and counts["img_file"] >= 10 and counts["anchors"] >= 10

    shots = Path(os.environ.get("LALORA_SITE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    page = folder / "09_theorem_checks.html"
    for html_file in (index, page):
        # The page as the browser builds it: parsed, scripts run, every image decoded or not.
        probe = folder / f"_probe_{html_file.name}"
        probe.write_text(html_file.read_text().replace("</body>", BROWSER_PROBE, 1))
        run = _browser(["--dump-dom"], probe.as_uri(), tmp_path / "chrome")
        probe.unlink()
        assert run.returncode == 0, run.stderr[-2000:]
        dom = run.stdout
        assert ("lalora results" if html_file is index else "Theorem checks") in dom
        found = re.search(r'data-probe="([^"]*)"', dom)
        assert found, "the page did not finish loading"
        images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        assert images and all(i["ok"] for i in images), [i for i in images if not i["ok"]]

        shot = shots / f"{html_file.stem}.png"
        run = _browser([f"--screenshot={shot}", "--window-size=1280,1600"], html_file.as_uri(), tmp_path / "chrome")
        assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
        import matplotlib.image as mpimg

        pixels = mpimg.imread(str(shot))
        assert pixels.shape[:2] == (1600, 1280) and pixels[..., :3].std() > 0.05  # not a blank page
        print(f"screenshot: {shot}")


def test_report_md_verdicts_link_to_committed_files(tmp_path):
    """REPORT.md as lalora.report writes it: each verdict links to the executed notebook and figure."""
    from lalora.report import build_report

    _fake_profile(tmp_path / "results")
    out = tmp_path / "paper" / "REPORT.md"
    text = build_report(tmp_path / "results", REPO / "paper" / "reported.yaml", out, ["demo"])
    check_rows = [line for line in text.splitlines() if line.startswith("| claim: filter_gain")]
    assert len(check_rows) == 1 and "yes ([01_alpha § Filter gain check]" in check_rows[0]
    assert "| ranking_holds.toy ε=3 | not a verdict (no interval) |" in text
    links = re.findall(r"\]\(<([^>]+)>\)", text)
    assert links and not any("/site/" in link for link in links)
    for link in links:
        assert (out.parent / link).resolve().is_file(), link
    assert "| rounds | 10 |" in text  # numbers stay plain values
