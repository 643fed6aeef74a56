"""The recipe cells of every notebook run alone — pasted into an empty notebook, without the course (issue 12).

For each notebook with cells tagged `recipe`: its parameters cell, the smoke values and concrete paths it
declares (metadata slm_course.recipe_inputs), then its recipe cells, in a fresh interpreter where
`import helpers` fails and the working directory is empty (scripts/run_recipes.py).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import run_recipes  # noqa: E402
from run_notebooks import notebooks  # noqa: E402

from helpers import data, env, evals, export, models, prefs  # noqa: E402

WITH_RECIPES = [p for p in notebooks() if run_recipes.cells(p)[1]]
ADAPTERS: dict[str, Path] = {}   # notebook stem → the adapter its recipe wrote (04's feeds 05's)


def adapter_of(stem: str, _work: Path) -> str:
    """The adapter notebook `stem`'s recipe wrote in this session, else its smoke run's (build/smoke)."""
    path = ADAPTERS.get(stem) or ROOT / "build" / "smoke" / stem / "adapter"
    if not (path / "adapter_config.json").exists():
        pytest.skip(f"no adapter from {stem}: run its recipe test (or its smoke notebook) first")
    return str(path)


def pairs_file(n: str, work: Path) -> str:
    """A preference-pairs file from the first `n` training records (notebook 07's recipe reads one)."""
    records = data.read_rows(env.DATA_DIR / "sft" / "train.jsonl")[:int(n)]
    return str(data.write_jsonl(prefs.build_pairs(records, seed=0), work / "pairs.jsonl"))


RESOLVERS = {"model": lambda name, _: models.model_path(name), "adapter": adapter_of,
             "lm_eval_tasks": lambda sub, work: evals.write_task_dir(work / sub), "pairs": pairs_file,
             "converter": lambda _, __: str(export.find_converter())}


def test_the_course_has_recipes():
    stems = {p.stem[:2] for p in WITH_RECIPES}
    assert {"02", "03", "04", "05"} <= stems, f"recipe cells expected in 02-05, found in {sorted(stems)}"


def test_harness_fails_when_a_recipe_leans_on_the_course(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["X = 1\n"]},
                    {"cell_type": "code", "metadata": {}, "source": ["Y = 2\n"]},
                    {"cell_type": "code", "metadata": {"tags": ["recipe"]}, "source": ["print(X)\n"]},
                    {"cell_type": "code", "metadata": {"tags": ["recipe"]}, "source": ["print(Y)\n"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "99_lean.ipynb"
    path.write_text(json.dumps(nb))
    res = run_recipes.run(path, tmp_path / "work", {})
    assert res.returncode != 0 and "NameError: name 'Y'" in res.stderr          # a name from a non-recipe cell
    nb["cells"][3]["source"] = ["from helpers import env\n"]
    path.write_text(json.dumps(nb))
    res = run_recipes.run(path, tmp_path / "work2", {})
    assert res.returncode != 0 and "helpers" in res.stderr                       # the course is not importable
    nb["cells"][3]["source"] = ["print('ok', X + 1)\n"]
    path.write_text(json.dumps(nb))
    res = run_recipes.run(path, tmp_path / "work3", {"X": 41})                    # the reader's value wins
    assert res.returncode == 0 and "ok 42" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("path", WITH_RECIPES, ids=lambda p: p.stem)
def test_recipe_cells_run_alone(path, tmp_path_factory):
    work = tmp_path_factory.mktemp(path.stem)
    spec = run_recipes.recipe_inputs(path)
    assert spec.get("SMOKE") is True, f"{path.name}: declare recipe_inputs with SMOKE true in its metadata"
    values = run_recipes.resolve_inputs(spec, work, RESOLVERS)
    res = run_recipes.run(path, work, values, timeout=900)
    n = len(run_recipes.cells(path)[1])
    assert res.returncode == 0, f"{path.name} recipe cells failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    assert f"--- recipe cell {n}/{n}" in res.stdout and "--- all recipe cells ran" in res.stdout
    if path.stem.startswith("04"):   # trained, saved, reloaded, generated
        adapter = Path(values["OUTPUT_DIR"]) / "adapter"
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0 and (adapter / "adapter_config.json").exists()
        ADAPTERS[path.stem] = adapter
    if path.stem.startswith("05"):   # the harness scored base and adapter
        assert "'base': {'slm_" in res.stdout and "'tuned': {'slm_" in res.stdout
