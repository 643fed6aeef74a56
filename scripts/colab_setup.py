"""Colab setup for the course: install only what the Colab runtime lacks, and say when a restart is needed.

Run by each notebook's Colab-only cell (after it cloned the course) as
    python scripts/colab_setup.py --loaded <comma-separated top-level modules the kernel has imported>

- torch stays Colab's own CUDA build; development tools (jupyterlab, ipykernel, pytest, ruff, papermill, …) are
  not installed: Colab runs the notebooks itself.
- General libraries the course uses lightly (numpy, pandas, matplotlib, psutil, PyYAML, tqdm) are kept as Colab
  has them; installed only if missing.
- The fast-moving stack (transformers, peft, trl, bitsandbytes, datasets, lm_eval, …) is pinned exactly as in
  requirements.txt: installed when missing or at another version. llama-cpp-python compiles from source (no
  Linux wheel on PyPI), so only notebook 09 installs it (`--only llama-cpp-python`). If one of those was already imported by the
  kernel, the new version only takes effect after Runtime → Restart session (then run the cell again: nothing
  left to install, no restart).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"torch", "papermill", "nbformat", "nbclient", "ipykernel", "jupyterlab", "ipywidgets", "pytest", "ruff",
        "check-jsonschema", "sphinx", "myst-nb", "sphinx-book-theme", "sphinx-mathjax-offline", "playwright"}  # site + its test
KEEP_COLABS = {"numpy", "pandas", "matplotlib", "psutil", "pyyaml", "tqdm"}
# compiled from source on Linux (no wheel on PyPI): only the notebook that needs it asks for it (--only)
ON_DEMAND = {"llama-cpp-python"}
IMPORT_NAME = {"pyyaml": "yaml", "huggingface-hub": "huggingface_hub", "lm-eval": "lm_eval",
               "llama-cpp-python": "llama_cpp", "scikit-learn": "sklearn"}
RESTART = "Runtime → Restart session, then run this cell again"


def norm(name: str) -> str:
    """PEP 503 normalised package name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """name → pinned version from a requirements file (comments and unpinned lines ignored)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[A-Za-z0-9_,.-]+\])?==([^\s#]+)", line.strip())  # extras: not on Colab
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out


def installed(name: str) -> str | None:
    """The installed version of a package, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(requirements: dict[str, str], have: dict[str, str | None], loaded: set[str],
         only: set[str] | None = None) -> dict:
    """What to install (name==version), what is kept as the runtime has it, and whether a restart is needed.

    `only`: just these packages (e.g. notebook 09's {"llama-cpp-python"}); else everything but SKIP and ON_DEMAND.
    """
    install, kept, restart_for = [], [], []
    for name, version in requirements.items():
        if (name not in only) if only else (name in SKIP or name in ON_DEMAND):
            continue
        current = have.get(name)
        if current is not None and (name in KEEP_COLABS or current == version):
            kept.append(f"{name} {current}")
            continue
        install.append(f"{name}=={version}")
        if current is not None and IMPORT_NAME.get(name, name.replace("-", "_")) in loaded:
            restart_for.append(name)
    return {"install": install, "kept": kept, "restart_for": restart_for}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loaded", default="", help="top-level modules the notebook kernel has imported (comma-separated)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON, install nothing")
    ap.add_argument("--only", default="", help="install just these packages (comma-separated), e.g. llama-cpp-python")
    args = ap.parse_args()
    requirements = pins()
    only = {norm(n) for n in args.only.split(",") if n}
    todo = plan(requirements, {n: installed(n) for n in requirements}, set(filter(None, args.loaded.split(","))), only)
    if args.dry_run:
        print(json.dumps(todo))
        return 0
    print(f"kept as Colab has them: {', '.join(todo['kept']) or 'none'}")
    if todo["install"]:
        print(f"installing: {' '.join(todo['install'])}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *todo["install"]], check=True)
    if not only:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    if todo["restart_for"]:
        print(f"\n*** {', '.join(todo['restart_for'])} changed version after the kernel imported it: {RESTART}. ***")
    else:
        print("ready: no restart needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
