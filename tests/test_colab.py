"""The Colab path, headless: the install cell of every notebook, the install plan, and no cell relying on it."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import colab_setup  # noqa: E402
from run_notebooks import notebooks  # noqa: E402


def colab_cell(path: Path):
    cells = [c for c in nbformat.read(path, 4).cells if "colab" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged 'colab', found {len(cells)}"
    return cells[0]


def test_every_notebook_has_the_same_colab_cell():
    sources = {p.name: colab_cell(p).source for p in notebooks()}
    assert len(set(sources.values())) == 1, "Colab cells differ: " + ", ".join(sources)


def run_cell(source: str, monkeypatch, course_exists: bool) -> list[list[str]]:
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    monkeypatch.setattr("os.path.isdir", lambda p: course_exists)
    monkeypatch.setattr("os.chdir", lambda p: calls.append(["chdir", p]))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(source, "<colab cell>", "exec"), {})
    return calls


def test_colab_cell_clones_once_and_installs_through_the_plan(monkeypatch):
    source = colab_cell(notebooks()[0]).source
    first = run_cell(source, monkeypatch, course_exists=False)
    assert first[0][:2] == ["git", "clone"] and first[0][-1] == "/content/slm-course"
    assert first[1][1].endswith("scripts/colab_setup.py") and first[1][2] == "--loaded" and "sys" in first[1][3].split(",")
    assert first[2] == ["chdir", "/content/slm-course/notebooks"]
    again = run_cell(source, monkeypatch, course_exists=True)          # a second run does not clone again
    assert [c[0] for c in again] == [sys.executable, "chdir"]


def test_colab_cell_does_nothing_elsewhere(monkeypatch):
    calls = []
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(compile(colab_cell(notebooks()[0]).source, "<colab cell>", "exec"), {})
    assert calls == []


# A Colab runtime as it could look (late 2026): CUDA torch, an older transformers, no peft/trl/bitsandbytes/lm_eval.
COLAB = {"torch": "2.9.0+cu126", "transformers": "4.57.1", "tokenizers": "0.22.1", "safetensors": "0.6.2",
         "huggingface-hub": "0.35.3", "accelerate": "1.10.1", "datasets": "4.0.0", "numpy": "2.0.2",
         "pandas": "2.2.2", "matplotlib": "3.10.0", "psutil": "5.9.5", "pyyaml": "6.0.3", "tqdm": "4.67.1",
         "ipykernel": "6.17.1", "ipywidgets": "7.7.1"}


def test_install_plan_for_a_colab_runtime():
    reqs = colab_setup.pins()
    todo = colab_setup.plan(reqs, COLAB, loaded={"numpy", "pandas", "transformers", "IPython"})
    names = {x.split("==")[0] for x in todo["install"]}
    assert {"transformers", "peft", "trl", "bitsandbytes", "lm-eval", "datasets"} <= names
    assert not names & {"torch", "jupyterlab", "ipykernel", "pytest", "ruff", "papermill", "nbformat", "numpy", "pandas",
                        "llama-cpp-python", "sphinx", "playwright"}   # compiled (only 09 asks for it); the site's tools
    only = colab_setup.plan(reqs, COLAB, loaded=set(), only={"llama-cpp-python"})
    assert only["install"] == [f"llama-cpp-python=={reqs['llama-cpp-python']}"]
    assert all(x == f"{x.split('==')[0]}=={reqs[x.split('==')[0]]}" for x in todo["install"])   # exact pins
    assert "numpy 2.0.2" in todo["kept"] and "pandas 2.2.2" in todo["kept"]
    assert todo["restart_for"] == ["transformers"]            # imported at an older version: restart, said clearly
    fresh = colab_setup.plan(reqs, COLAB, loaded={"IPython"})
    assert fresh["restart_for"] == [] and fresh["install"] == todo["install"]
    done = colab_setup.plan(reqs, {**COLAB, **{n: v for n, v in reqs.items()}}, loaded={"transformers"})
    assert done["install"] == [] and done["restart_for"] == []  # second run after the restart: nothing to do


@pytest.mark.skipif(os.environ.get("LATEST") == "1",
                    reason="LATEST=1: the latest-releases lane installs the newest releases, so the pins are to install")
def test_colab_setup_dry_run_prints_the_plan():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab_setup.py"), "--dry-run", "--loaded", "numpy"],
                         capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    assert set(out) == {"install", "kept", "restart_for"} and out["install"] == []   # .venv already has the pins


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_no_cell_relies_on_the_colab_cell(path, tmp_path):
    nb = nbformat.read(path, 4)
    nb.cells = [c for c in nb.cells if "colab" not in c.metadata.get("tags", [])]
    copy = tmp_path / path.name
    nbformat.write(nb, copy)
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821", str(copy)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{path.name} uses names only the Colab cell defines:\n{res.stdout[-2000:]}"
