"""Build the course's website from the notebooks that `make run` executed (`make site` → build/site/index.html).

The pages, in reading order, are the numbered notebooks (notebooks/[0-9][0-9]_*.ipynb, found by glob) as their
executed copies build/<stem>/<stem>.ipynb, every output and figure kept, each with its Colab badge and a link to its
metrics.json (copied into the site); then docs/*.md. The landing page takes README's introduction, notebook table,
two commands and Colab note, and the *Measured* table of the same run (scripts/collect_metrics.py). Sphinx with
MyST-NB and sphinx-book-theme renders it (docs/site/conf.py): nothing is executed, nothing is downloaded.

    python scripts/build_site.py              # every notebook must have run (`make run`), else it says which did not
    python scripts/build_site.py --partial    # those that ran; the others as their source without outputs, marked
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "docs" / "site"
REPO = "slm-course/slm-course"
REMOTE_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "../_static/colab-badge.svg"  # the site serves its own badge: no page loads anything from elsewhere
WIDGET = "application/vnd.jupyter.widget-view+json"
# the course's anchors are `<a id="name"></a>` lines (what GitHub renders, tests/test_links.py); MyST needs `(name)=`
ANCHOR = re.compile(r'^<a id="([A-Za-z0-9_-]+)"></a>[ \t]*$', flags=re.M)


def myst_targets(markdown: str) -> str:
    """Turn each `<a id="name"></a>` line into a MyST target `(name)=`, so `page.md#name` links resolve in the site."""
    return ANCHOR.sub(r"(\1)=", markdown)


def colab_url(stem: str) -> str:
    """The notebook on Colab, at the path the notebooks' own badges use."""
    return f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{stem}.ipynb"


def page_sources(notebooks: Path, build: Path, partial: bool = False) -> list[tuple[Path, Path | None]]:
    """(source, executed copy or None) per numbered notebook in reading order; exit naming `make run` if one is missing."""
    pairs = []
    for source in sorted(notebooks.glob(collect_metrics.NOTEBOOK_GLOB)):
        executed = build / source.stem / f"{source.stem}.ipynb"
        pairs.append((source, executed if executed.exists() else None))
    missing = [s.stem for s, e in pairs if e is None]
    if not pairs:
        raise SystemExit(f"no numbered notebooks ({collect_metrics.NOTEBOOK_GLOB}) in {notebooks}")
    if missing and not partial:
        first = missing[0]
        raise SystemExit(
            f"make site: no executed copy of {', '.join(missing)} in {build}/ (e.g. {build}/{first}/{first}.ipynb). "
            f"The site shows the notebooks as `make run` executed them: run `make run` first (or one notebook: "
            f"`make nb NB={first[:2]}`); `make site PARTIAL=1` builds from those that ran.")
    return pairs


def drop_widgets(nb: nbformat.NotebookNode) -> None:
    """Remove ipywidgets outputs (tqdm bars: they need a live kernel and a CDN script) and the stored widget state."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if WIDGET not in o.get("data", {})]
    nb.metadata.pop("widgets", None)


def about_cell(stem: str, executed: bool, has_badge: bool, has_metrics: bool) -> nbformat.NotebookNode:
    """The note under a page's title: what the page shows, its metrics.json, and the Colab badge if the title lacks it."""
    badge = f"[![Open In Colab]({LOCAL_BADGE})]({colab_url(stem)})\n\n" if not has_badge else ""
    metrics = (f'its figures are in <a href="../metrics/{stem}/metrics.json">metrics.json</a>' if has_metrics
               else "it wrote no metrics.json in this build")
    if executed:
        text = (f"*This page is `notebooks/{stem}.ipynb` as `make run` executed it: every output and figure below comes "
                f"from that run; {metrics}.*")
    else:
        text = (f"**Not executed in this build:** this page is the notebook's source, without outputs. "
                f"`make nb NB={stem[:2]}` (or `make run`) executes it, then `make site`.")
    return nbformat.v4.new_markdown_cell(badge + text, id="site-about")


def page_notebook(source: Path, executed: Path | None, has_metrics: bool) -> nbformat.NotebookNode:
    """The notebook a page renders: the executed copy (else the source), the badge served locally, the note under the title."""
    nb = nbformat.read(executed or source, as_version=4)
    drop_widgets(nb)
    has_badge = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            has_badge = has_badge or REMOTE_BADGE in cell.source
            cell.source = myst_targets(cell.source.replace(REMOTE_BADGE, LOCAL_BADGE))
    nb.cells.insert(1, about_cell(source.stem, executed is not None, has_badge, has_metrics))
    return nb


def section(text: str, heading: str) -> str:
    """The body of README's `heading` section (up to the next heading of the same or a higher level)."""
    level = len(heading) - len(heading.lstrip("#"))
    m = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^#{{1,{level}}} |\Z)", text, flags=re.M | re.S)
    if not m:
        raise SystemExit(f"README.md has no {heading!r} section: scripts/build_site.py takes the landing page from it")
    return m.group(1).strip()


def landing_page(readme: Path, stems: list[str], docs: list[str], run: str, measured: str) -> str:
    """index.md: README's introduction, notebook table, two commands and Colab note; the run's Measured table; the toctrees."""
    text = readme.read_text()
    title = text.splitlines()[0].lstrip("# ").strip()
    intro = text.split("\n## ", 1)[0].split("\n", 1)[1].strip()
    table = "\n".join(ln for ln in section(text, "## The notebooks").splitlines() if ln.startswith("|"))
    commands = re.search(r"```bash\n.*?```", section(text, "## Two commands"), flags=re.S)
    if not commands:
        raise SystemExit("README.md's '## Two commands' has no ```bash block: the landing page shows it")
    colab = section(text, "### Colab").split("\n\n")[0]
    toc = "\n".join(f"notebooks/{s}" for s in stems)
    reference = "\n".join(f"docs/{d}" for d in docs)
    reference = f"```{{toctree}}\n:caption: Reference\n:maxdepth: 1\n:hidden:\n\n{reference}\n```\n" if docs else ""
    return f"""# {title}

{intro}

## What you learn

Each page below is a notebook as `make run` executed it, with every output and figure. {run}

{table}

## Run it yourself

{commands.group(0)}

{colab}

## Measured

The figures of the run these pages come from (`make results` puts the same table in README):

{measured}

```{{toctree}}
:caption: Notebooks
:maxdepth: 1
:hidden:

{toc}
```

{reference}"""


def run_line(pairs: list[tuple[Path, Path | None]]) -> str:
    """'Executed at commit abc1234 on AMD EPYC, 2 cores, 2026-12-01.': where the pages' outputs come from."""
    done = [e for _, e in pairs if e is not None]
    if not done:
        return "No notebook has been executed in this build: the pages show their sources only."
    newest = max(p.stat().st_mtime for p in done)
    date = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"These were executed at commit `{collect_metrics.git_commit(ROOT)}` on {collect_metrics.cpu_kind()}, "
            f"{date} ({len(done)} of {len(pairs)} notebooks).")


def stage(src: Path, pairs: list[tuple[Path, Path | None]], build: Path, readme: Path, docs: Path) -> None:
    """Lay out Sphinx's source folder `src`: config, badge, landing page, pages, docs, metrics files."""
    if src.exists():
        shutil.rmtree(src)
    (src / "_static").mkdir(parents=True)
    (src / "notebooks").mkdir()
    shutil.copy(CONFIG / "conf.py", src / "conf.py")
    for name in ("colab-badge.svg", "favicon.svg"):
        shutil.copy(CONFIG / name, src / "_static" / name)
    for source, executed in pairs:
        metrics = build / source.stem / "metrics.json"
        if executed and metrics.exists():
            (src / "_extra" / "metrics" / source.stem).mkdir(parents=True)
            shutil.copy(metrics, src / "_extra" / "metrics" / source.stem / "metrics.json")
        nb = page_notebook(source, executed, has_metrics=bool(executed and metrics.exists()))
        nbformat.write(nb, src / "notebooks" / source.name)
    (src / "_extra").mkdir(exist_ok=True)
    pages = sorted(docs.glob("*.md")) if docs.is_dir() else []
    if pages:
        (src / "docs").mkdir()
    for page in pages:
        (src / "docs" / page.name).write_text(myst_targets(page.read_text()))
    measured = collect_metrics.table(collect_metrics.load(build), skip_missing=True)
    if len(measured.splitlines()) <= 2:  # the header alone: no notebook of this build has a row there yet
        measured = "None of the notebooks that ran here has a row in the table yet (scripts/collect_metrics.py `ROWS`)."
    index = landing_page(readme, [s.stem for s, _ in pairs], [p.stem for p in pages], run_line(pairs), measured)
    (src / "index.md").write_text(index)


def build_site(notebooks: Path, build: Path, out: Path, readme: Path, docs: Path, partial: bool = False) -> Path:
    """Stage the pages beside `out` (build/site_src) and render them with Sphinx into `out`; return out/index.html."""
    from sphinx.cmd.build import build_main

    pairs = page_sources(notebooks, build, partial)
    src = out.parent / f"{out.name}_src"
    stage(src, pairs, build, readme, docs)
    html = src / "_build" / "html"   # MyST-NB keeps its scratch files beside it (_build/jupyter_execute)
    # -W: a warning (a broken cross-reference, a page outside the navigation) fails the build; -E: no stale pages
    status = build_main(["-b", "html", "-q", "-E", "-W", "--keep-going", "-d", str(src / "_build" / "doctrees"),
                         str(src), str(html)])
    if status != 0:
        raise SystemExit(f"make site: Sphinx failed (status {status}); its warnings are above. Source: {src}")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(html, out)
    return out / "index.html"


def main(argv: list[str]) -> int:
    """CLI: build the site; print where it is and which notebooks it shows executed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notebooks", default=str(ROOT / "notebooks"))
    ap.add_argument("--build", default=str(ROOT / "build"), help="where `make run` wrote <stem>/<stem>.ipynb")
    ap.add_argument("--out", default=str(ROOT / "build" / "site"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="its *.md become reference pages")
    ap.add_argument("--partial", action="store_true", help="build from the notebooks that ran; mark the others")
    args = ap.parse_args(argv)
    pairs = page_sources(Path(args.notebooks), Path(args.build), args.partial)
    index = build_site(Path(args.notebooks), Path(args.build), Path(args.out), Path(args.readme), Path(args.docs),
                       args.partial)
    not_run = [s.stem for s, e in pairs if e is None]
    print(f"site: {index} ({len(pairs) - len(not_run)} of {len(pairs)} notebooks executed"
          + (f"; not executed: {', '.join(not_run)})" if not_run else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
