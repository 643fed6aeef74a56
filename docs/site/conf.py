"""Sphinx configuration of the course's website (`make site`; scripts/build_site.py copies this file).

scripts/build_site.py lays out the source folder it builds from (build/site_src/): index.md (the landing page),
notebooks/<stem>.ipynb (the executed notebooks of `make run`, every output kept), docs/*.md, _static/ and
_extra/metrics/. MyST-NB renders the notebooks as they are: it never executes them. Everything a page needs is
served from the site itself (MathJax included), so the site also reads offline and its browser test needs no network.
"""

project = "slm-course"
author = "slm-course contributors"
copyright = "slm-course contributors, Apache-2.0"
html_title = "slm-course · small language models, hands on"
html_baseurl = "https://slm-course.github.io/slm-course/"

extensions = [
    "myst_nb",                  # notebooks (.ipynb) and MyST markdown pages
    "sphinx-mathjax-offline",   # MathJax 3 served from _static/mathjax/, not a CDN (notebooks 03 and 05 have formulas)
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST-NB: render stored outputs, never run a cell (the outputs come from `make run`)
nb_execution_mode = "off"
nb_merge_streams = True                         # papermill splits a cell's prints into many stream chunks
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4                        # GitHub-style anchors: the notebooks link docs/sources.md#anchor
nb_ipywidgets_js = {}                           # build_site.py drops widget outputs (tqdm bars): no CDN script

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"            # else the browser asks for /favicon.ico, a 404 on every page
html_extra_path = ["_extra"]                    # metrics/<stem>/metrics.json, linked from each page
html_last_updated_fmt = None
html_theme_options = {
    "repository_url": "https://github.com/slm-course/slm-course",
    "repository_branch": "main",
    "path_to_docs": "",
    "use_repository_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},   # notebooks/<stem>.ipynb on main
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
}
# unset, pydata-sphinx-theme's script logs "Got invalid theme mode" as a console error on a first visit
html_context = {"default_mode": "auto"}
# the pages are long notebooks: a heading level that jumps (## after #### in a markdown cell) is not an error
# and a code block that Pygments cannot lex strictly (`!python` in a Python block) is still shown, highlighted loosely
suppress_warnings = ["myst.header", "misc.highlighting_failure"]
