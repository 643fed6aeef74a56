"""The course's website (`make site`, scripts/build_site.py), checked in a real browser, and its Pages workflow.

`check_site` serves a built site on 127.0.0.1 and loads every page in Debian's headless Chromium, driven by
Playwright. It reports a console error (an uncaught exception and a failed request too), an <img> that did not
load (naturalWidth == 0), a cell output holding a Python traceback, a link inside the site that leads nowhere, a
page the navigation does not reach from index.html, and notebook pages out of reading order (each page's "next"
link is the following notebook). In `make test` it runs on a small site built here from two tiny notebooks
executed like `make run` does (a matplotlib figure, a formula, a tqdm bar, a metrics.json); broken copies of that
site show it fails. `make site-test` runs it on the real site (SLM_COURSE_SITE=build/site) after `make site`.
Without Chromium the browser tests skip and say how to install it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_site  # noqa: E402
from run_notebooks import run_notebook  # noqa: E402

# CHROMIUM=/path/to/chrome (a name on PATH too) picks the browser; else Debian's chromium
CHROMIUM = shutil.which(os.environ.get("CHROMIUM", "chromium")) or os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL = "sudo apt-get install -y chromium   (Debian/Ubuntu; elsewhere set CHROMIUM=/path/to/chrome)"
SPECIAL = {"genindex.html", "search.html"}   # Sphinx's own pages: checked like the others, but need no link
TRACEBACK = "Traceback (most recent call last)"
# per page, once it has loaded: every image settled (lazy ones forced), then what the checks read
INSPECT = """async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  const settle = i => i.complete ? null : new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); });
  await Promise.race([Promise.all(imgs.map(settle)), new Promise(r => setTimeout(r, 10000))]);
  const outputs = [...document.querySelectorAll('.cell_output')];
  return {
    broken: imgs.filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src')),
    tracebacks: outputs.filter(o => o.querySelector('.traceback') || o.textContent.includes('__TRACEBACK__')).length,
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    next: document.querySelector('a.right-next')?.href ?? null,
    figure: document.querySelectorAll('.cell_output img').length,
  };
}""".replace("__TRACEBACK__", TRACEBACK)

# sphinx-book-theme 1.4 and myst-parser 5.2 use Sphinx APIs that Sphinx 11 will remove: their warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated. Check CHANGES for Sphinx API modifications")
needs_browser = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium for the browser test: {INSTALL}")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging each request (a failed one shows up as a browser error instead)."""

    def log_message(self, *args: object) -> None:
        """Say nothing."""


class QuietServer(http.server.ThreadingHTTPServer):
    """A local server that does not print a traceback when the browser drops a connection (it moved on)."""

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore a connection the browser closed; report anything else as usual."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve `site` on 127.0.0.1 (a free port) for the duration; yield its base URL."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def site_pages(site: Path) -> list[str]:
    """Every HTML page of the site, relative to it (Sphinx's _static/_sources/_images left out)."""
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if not p.relative_to(site).parts[0].startswith("_"))


def inspect_page(page, url: str, said: list[str]) -> tuple[list[str], dict]:
    """Load one page; return (its problems, what INSPECT read). `said` collects the browser's errors meanwhile."""
    said.clear()
    response = page.goto(url, wait_until="networkidle")
    found = page.evaluate(INSPECT)
    problems = [] if response and response.ok else [f"HTTP {response.status if response else '(no response)'}"]
    problems += [f"console error: {m}" for m in said]
    problems += [f"image did not load (naturalWidth 0): {src}" for src in found["broken"]]
    problems += [f"{found['tracebacks']} cell output(s) hold a Python traceback"] if found["tracebacks"] else []
    return problems, found


def crawl(page, base: str, pages: list[str], said: list[str]) -> tuple[list[str], dict[str, dict], set[str]]:
    """Follow links from index.html, then load the pages not reached; return (problems, what each page showed, reached)."""
    problems, seen, reached, queue = [], {}, {"index.html"}, ["index.html"]
    while queue or set(pages) - set(seen):
        name = queue.pop(0) if queue else sorted(set(pages) - set(seen))[0]
        page_problems, seen[name] = inspect_page(page, base + name, said)
        problems += [f"{name}: {p}" for p in page_problems]
        for link in seen[name]["links"] if name in reached else []:   # an unreached page reaches nothing
            target = link.split("#")[0].split("?")[0]
            rel = target[len(base):] if target.startswith(base) else None
            if rel is not None and rel.endswith(".html") and rel not in reached:
                reached.add(rel)
                queue.append(rel)
    return problems, seen, reached


def link_problems(base: str, seen: dict[str, dict]) -> list[str]:
    """Links inside the site to files that are not pages (metrics.json, notebook downloads): each must be served."""
    targets: dict[str, str] = {}   # target → the first page (by name) that links it
    for name, found in sorted(seen.items()):
        for link in found["links"]:
            if link.startswith(base) and not link.split("#")[0].endswith((".html", "/")):
                targets.setdefault(link.split("#")[0], name)
    out = []
    for target, name in sorted(targets.items()):
        try:
            urllib.request.urlopen(target, timeout=10).close()
        except urllib.error.URLError as err:
            out.append(f"{name}: broken link {target[len(base):]} ({err})")
    return out


def order_problems(base: str, pages: list[str], seen: dict[str, dict]) -> list[str]:
    """Reading order: index.html's "next" is the first notebook, and each notebook's "next" the following one."""
    chain = ["index.html"] + [p for p in pages if p.startswith("notebooks/")]
    out = []
    for here, want in zip(chain, chain[1:], strict=False):
        got = (seen.get(here, {}).get("next") or "")[len(base):].split("#")[0]
        if got != want:
            out.append(f"{here}: its next page is {got or 'missing'}, want {want} (reading order)")
    return out


def check_site(site: Path, screenshot: Path | None = None) -> list[str]:
    """Every problem a reader would meet on the built `site`, as 'page: what' lines (empty: all good)."""
    from playwright.sync_api import sync_playwright

    pages = site_pages(site)
    said: list[str] = []
    with serve(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: said.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda err: said.append(f"uncaught {err}"))
        # a request cut short by the next navigation (net::ERR_ABORTED, e.g. the favicon) is no fault of the site;
        # a missing file is a 404, which the console reports
        page.on("requestfailed", lambda r: said.append(f"request failed: {r.url} ({r.failure})")
                if "ERR_ABORTED" not in (r.failure or "") else None)
        problems, seen, reached = crawl(page, base, pages, said)
        problems += [f"{p}: no link leads here from index.html" for p in pages if p not in reached and p not in SPECIAL]
        problems += link_problems(base, seen) + order_problems(base, pages, seen)
        if screenshot:
            shown = next((p for p in pages if seen[p]["figure"]), "index.html")
            page.goto(base + shown, wait_until="networkidle")
            if seen[shown]["figure"]:
                page.locator(".cell_output img").first.scroll_into_view_if_needed()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        browser.close()
    return problems


# ---- a small site, built the way `make site` builds the real one -------------------------------------------------
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/slm-course/slm-course/blob/main/notebooks/00_alpha.ipynb)")
README = """# fixture course — two notebooks

An introduction paragraph.

## Two commands

```bash
make run    # executes every notebook
make test   # the tests
```

### Colab

Open a notebook with its badge.

## The notebooks

| # | notebook | what you learn |
|---|---|---|
| 00 | [alpha](notebooks/00_alpha.ipynb) | a figure and a formula |
| 01 | [beta](notebooks/01_beta.ipynb) | a second figure |
"""
METRICS_CELL = ("import json, os\nfrom pathlib import Path\n"
                "out = Path(os.environ['SLM_COURSE_BUILD']) / '{stem}'\n"
                "(out / 'metrics.json').write_text(json.dumps({{'notebook': '{stem}', 'seconds': 1.0}}))")


def fixture_notebooks(folder: Path) -> list[Path]:
    """Two numbered notebooks: a badge, a formula, matplotlib figures, a tqdm bar, a link to a docs anchor, metrics."""
    folder.mkdir(parents=True)
    plot = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2))\nax.{}([0, 1, 2], [0, 1, 4])\nplt.show()"
    cells = {
        "00_alpha": [nbformat.v4.new_markdown_cell(f"# 00 · Alpha\n\n{BADGE}\n\nLoRA adds $\\frac{{\\alpha}}{{r}} B A$."),
                     nbformat.v4.new_code_cell(plot.format("plot")),
                     nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass\nprint('looped')"),
                     nbformat.v4.new_code_cell(METRICS_CELL.format(stem="00_alpha"))],
        "01_beta": [nbformat.v4.new_markdown_cell("# 01 · Beta\n\nBack to [alpha](00_alpha.ipynb); see the "
                                                  "[guide](../docs/guide.md#the-anchor)."),
                    nbformat.v4.new_code_cell(plot.format("bar"))],
    }
    paths = []
    for stem, body in cells.items():
        nb = nbformat.v4.new_notebook(cells=body)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / f"{stem}.ipynb")
        paths.append(folder / f"{stem}.ipynb")
    return paths


@pytest.fixture(scope="module")
def small_site(tmp_path_factory) -> Path:
    """The two fixture notebooks executed by the course's runner into build/, then `build_site` → build/site."""
    root = tmp_path_factory.mktemp("course")
    (root / "README.md").write_text(README)
    (root / "docs").mkdir()
    (root / "docs" / "guide.md").write_text('# Guide\n\n<a id="the-anchor"></a>\n\n## Anchored section\n\nText.\n')
    for path in fixture_notebooks(root / "notebooks"):
        res = run_notebook(path, root / "build", timeout=120)
        assert res.status == "ok", res.detail
    build_site.build_site(root / "notebooks", root / "build", root / "build" / "site", root / "README.md", root / "docs")
    return root / "build" / "site"


def test_a_missing_executed_notebook_names_make_run(tmp_path):
    paths = fixture_notebooks(tmp_path / "notebooks")
    (tmp_path / "build" / "00_alpha").mkdir(parents=True)
    shutil.copy(paths[0], tmp_path / "build" / "00_alpha" / "00_alpha.ipynb")
    with pytest.raises(SystemExit, match=r"no executed copy of 01_beta .*run `make run` .*`make nb NB=01`.*PARTIAL=1"):
        build_site.page_sources(tmp_path / "notebooks", tmp_path / "build")
    pairs = build_site.page_sources(tmp_path / "notebooks", tmp_path / "build", partial=True)
    assert [(s.stem, e is not None) for s, e in pairs] == [("00_alpha", True), ("01_beta", False)]


def test_pages_are_prepared_for_a_static_site(tmp_path):
    src = fixture_notebooks(tmp_path / "notebooks")[0]
    nb = nbformat.read(src, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("display_data", data={build_site.WIDGET: {"model_id": "x"},
                                                                       "text/plain": "0%| | 0/3"}),
                           nbformat.v4.new_output("stream", text="looped\n")]
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, tmp_path / "executed.ipynb")
    page = build_site.page_notebook(src, tmp_path / "executed.ipynb", has_metrics=True)
    assert "widgets" not in page.metadata and [o.output_type for o in page.cells[3].outputs] == ["stream"]
    assert build_site.LOCAL_BADGE in page.cells[0].source and build_site.REMOTE_BADGE not in page.cells[0].source
    assert '<a href="../metrics/00_alpha/metrics.json">metrics.json</a>' in page.cells[1].source
    beta = build_site.page_notebook(tmp_path / "notebooks" / "01_beta.ipynb", None, has_metrics=False)
    assert build_site.colab_url("01_beta") in beta.cells[1].source and "Not executed in this build" in beta.cells[1].source
    assert build_site.myst_targets('x\n<a id="a-b"></a>\n## H') == "x\n(a-b)=\n## H"


@pytest.mark.slow  # executes two notebooks, runs Sphinx, starts Chromium
@needs_browser
def test_the_small_site_passes_every_check(small_site):
    shot = ROOT / "build" / "smoke" / "site_screenshot.png"
    shot.unlink(missing_ok=True)
    problems = check_site(small_site, screenshot=shot)
    assert problems == [], "\n".join(problems)
    assert shot.stat().st_size > 10_000
    index = re.sub(r"<[^>]+>", "", (small_site / "index.html").read_text())   # the text a reader sees
    for text in ("An introduction paragraph", "make run    # executes every notebook", "a figure and a formula",
                 "Open a notebook with its badge", "None of the notebooks that ran here has a row"):
        assert text in index, text
    assert json.loads((small_site / "metrics" / "00_alpha" / "metrics.json").read_text())["notebook"] == "00_alpha"
    alpha = (small_site / "notebooks" / "00_alpha.html").read_text()
    assert "looped" in alpha and "colab-badge.svg" in alpha and "colab.research.google.com/github/" in alpha
    assert (small_site / "_static" / "mathjax" / "tex-chtml.js").exists() and "cdn.jsdelivr" not in alpha


def mutate(site: Path, dest: Path, page: str, pattern: str, new: str) -> None:
    """Copy `site` to `dest` once, then replace the first `pattern` (regex) on `page` with `new`."""
    if not dest.exists():
        shutil.copytree(site, dest)
    text = (dest / page).read_text()
    changed = re.sub(pattern, new, text, count=1, flags=re.S)
    assert changed != text, (page, pattern)
    (dest / page).write_text(changed)


@pytest.mark.slow
@needs_browser
def test_a_broken_figure_fails_the_check(small_site, tmp_path):
    broken = tmp_path / "site"
    shutil.copytree(small_site, broken)
    html = (broken / "notebooks" / "01_beta.html").read_text()
    src = re.search(r'<div class="cell_output.*?<img [^>]*src="\.\./(_images/[^"]+\.png)"', html, flags=re.S).group(1)
    (broken / src).write_bytes(b"not a PNG: the figure did not survive")
    problems = check_site(broken)
    assert problems == [f"notebooks/01_beta.html: image did not load (naturalWidth 0): ../{src}"], problems


@pytest.mark.slow
@needs_browser
def test_console_errors_tracebacks_orphans_dead_links_and_order_are_caught(small_site, tmp_path):
    bad = tmp_path / "site"
    mutate(small_site, bad, "notebooks/00_alpha.html", r"</body>", "<script>console.error('planted')</script></body>")
    mutate(small_site, bad, "notebooks/01_beta.html", r'(<div class="cell_output docutils container">)',
           rf"\1<pre>{TRACEBACK}:\n  File 'x'\nValueError: planted</pre>")
    mutate(small_site, bad, "index.html", r'(<a class="right-next"\s+href=")[^"]+', r"\1notebooks/01_beta.html")
    mutate(small_site, bad, "docs/guide.html", r"</body>", '<a href="metrics/none/metrics.json">x</a></body>')
    shutil.copy(bad / "docs" / "guide.html", bad / "docs" / "orphan.html")
    found = "\n".join(check_site(bad))
    for expected in ("notebooks/00_alpha.html: console error: planted",
                     "notebooks/01_beta.html: 1 cell output(s) hold a Python traceback",
                     "index.html: its next page is notebooks/01_beta.html, want notebooks/00_alpha.html",
                     "docs/orphan.html: no link leads here from index.html",
                     "docs/guide.html: broken link docs/metrics/none/metrics.json (HTTP Error 404"):
        assert expected in found, f"{expected!r} not in:\n{found}"


@needs_browser
def test_the_built_site():
    """`make site-test`: the real site (SLM_COURSE_SITE) passes every check, with a page per numbered notebook."""
    if not os.environ.get("SLM_COURSE_SITE"):
        pytest.skip("`make site-test` checks the real site after `make site` (SLM_COURSE_SITE=build/site)")
    site = Path(os.environ["SLM_COURSE_SITE"])
    assert (site / "index.html").exists(), f"no site at {site}: run `make site` first"
    stems = [p.stem for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert [p for p in site_pages(site) if p.startswith("notebooks/")] == [f"notebooks/{s}.html" for s in stems]
    shot = ROOT / "build" / "site_screenshot.png"
    problems = check_site(site, screenshot=shot)
    assert problems == [], f"{len(problems)} problem(s) on {site}:\n" + "\n".join(problems)
    print(f"every page of {site} passed; screenshot: {shot}")


def test_the_pages_workflow_builds_from_make_run_and_deploys():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text())
    on = wf.get("on", wf.get(True))   # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"] and "workflow_dispatch" in on
    assert wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = [s.get("run", "") for s in build["steps"]]
    order = [next(i for i, r in enumerate(runs) if r.strip().startswith(cmd)) for cmd in ("make run", "make site")]
    assert order == sorted(order), "make run must come before make site"
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "build/site" and build["steps"].index(upload) > order[1]
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
