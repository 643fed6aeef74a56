"""The notebook gate (scripts/check_notebooks.py) and the stripper catch what they promise to."""

import os
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from check_notebooks import literal_assignments, problems  # noqa: E402
from strip_notebooks import strip  # noqa: E402


def make_nb(tmp_path, name="07_demo.ipynb", params="SMOKE = False\nSEED = 0\nOUTPUT_DIR = 'auto'", outputs=False):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})
    body = nbformat.v4.new_code_cell("x = 1")
    if outputs:
        body.outputs = [nbformat.v4.new_output("stream", text="1\n")]
        body.execution_count = 3
    checks = nbformat.v4.new_code_cell("assert x == 1", metadata={"tags": ["checks"]})
    colab = nbformat.v4.new_code_cell("import sys", metadata={"tags": ["colab"]})
    nb.cells = [nbformat.v4.new_markdown_cell("# Demo"), colab, p, body, checks]
    nb.metadata["slm_course"] = {"artefacts": [], "timeout": 60}
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_clean_notebook_passes(tmp_path):
    assert problems(make_nb(tmp_path)) == []


def test_recipe_and_colab_conventions_are_checked(tmp_path):
    path = make_nb(tmp_path)
    nb = nbformat.read(path, 4)
    nb.cells[3].metadata["tags"] = ["recipe"]                       # untitled, imports the course, no inputs declared
    nb.cells[3].source = "from helpers import env\nx = 1"
    del nb.cells[1]                                                 # no Colab cell
    nbformat.write(nb, path)
    found = " | ".join(problems(path))
    for expected in ("must start with a '# recipe", "imports helpers", "recipe_inputs", "tagged 'colab'"):
        assert expected in found, (expected, found)


def test_outputs_are_flagged_and_strip_removes_them(tmp_path):
    path = make_nb(tmp_path, outputs=True)
    assert any("outputs" in m for m in problems(path))
    assert strip(path) is True and problems(path) == [] and strip(path) is False


def test_strip_removes_what_jupyter_and_papermill_add_and_keeps_the_course_metadata(tmp_path):
    path = make_nb(tmp_path, outputs=True)
    nb = nbformat.read(path, as_version=4)
    ids, tags = [c.id for c in nb.cells], [c.metadata.get("tags") for c in nb.cells]
    nb.metadata.update(papermill={"duration": 3.2}, widgets={"state": {}}, kernelspec={"name": "slm-course"})
    for cell in nb.cells:
        cell.metadata.update(papermill={"status": "completed"}, execution={"iopub.status.idle": "t"}, scrolled=True)
    nbformat.write(nb, path)
    assert strip(path) is True
    nb = nbformat.read(path, as_version=4)
    assert set(nb.metadata) == {"slm_course", "kernelspec"}                 # the course's keys only
    assert [c.id for c in nb.cells] == ids and [c.metadata.get("tags") for c in nb.cells] == tags
    assert all(set(c.metadata) <= {"tags"} for c in nb.cells)              # papermill, execution, scrolled: gone
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.slow  # starts a Jupyter kernel
def test_runner_stops_a_stalled_cell_and_names_it(tmp_path):
    from run_notebooks import run_notebook

    path = make_nb(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.cells[3].source = "import time\ntime.sleep(60)"
    nbformat.write(nb, path)
    res = run_notebook(path, tmp_path / "out", cell_timeout=2, timeout=50)
    assert res.status == "timeout" and res.seconds < 50, (res.status, res.seconds)   # papermill stopped it, not the kill
    assert res.detail.startswith("cell 4/5 · import time ran past 2 s"), res.detail


def test_runner_goes_offline_when_the_hub_does_not_answer(monkeypatch):
    import time

    from run_notebooks import hub_or_offline

    from helpers import env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(env, "hub_reachable", lambda timeout: time.sleep(30))   # a DNS lookup that hangs
    t0 = time.perf_counter()
    said = hub_or_offline(wait=0.5)
    assert time.perf_counter() - t0 < 2 and "HF_HUB_OFFLINE=1" in said
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "set by you" in hub_or_offline()


def test_parameters_must_be_plain_literals(tmp_path):
    assert literal_assignments("A = 1\nB = [1, 'x']\nC = None") == {"A": 1, "B": [1, "x"], "C": None}
    with pytest.raises(ValueError, match="not a plain literal"):
        literal_assignments("STEPS = 10 * 2")
    path = make_nb(tmp_path, params="SMOKE = False\nSEED = 0\nOUTPUT_DIR = 'auto'\nimport os")
    assert any("only `NAME = literal`" in m for m in problems(path))


def test_missing_shared_parameter_and_bad_name(tmp_path):
    path = make_nb(tmp_path, name="demo.ipynb", params="SEED = 0")
    msgs = problems(path)
    assert any("NN_snake_topic" in m for m in msgs) and any("SMOKE" in m for m in msgs)


@pytest.mark.slow  # starts a Jupyter kernel
def test_runner_announces_each_code_cell_and_reports_failures(tmp_path):
    from run_notebooks import cell_labels, run_notebook

    path = make_nb(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)
    labels = cell_labels(path, parameterized=True)  # papermill inserts its injected cell after `parameters`
    assert labels == ["", "import sys", "SMOKE = False", "(papermill's injected parameters)", "x = 1", "assert x == 1"]
    seen = []
    res = run_notebook(path, tmp_path / "out", ["-p", "SEED", "1"], timeout=120, progress=seen.append)
    assert res.status == "ok", res.detail
    assert [s.split("· ", 1)[1] for s in seen] == labels[1:]
    assert all(f"cell {i}/6" in s for i, s in zip(range(2, 7), seen, strict=True))
    bad = tmp_path / "08_bad.ipynb"
    nb.cells[3].source = "raise RuntimeError('boom in cell 3')"
    nbformat.write(nb, bad)
    res = run_notebook(bad, tmp_path / "out", timeout=120)
    assert res.status == "failed" and "boom in cell 3" in res.detail


def test_collect_metrics_fills_only_the_marked_section(tmp_path):
    import json

    from collect_metrics import BEGIN, END, main

    build = tmp_path / "build"
    (build / "03_lora_target_modules").mkdir(parents=True)
    runs = [{"set": "mlp", "heldout_loss": 0.7}, {"set": "qv", "heldout_loss": 1.0}]
    (build / "03_lora_target_modules" / "metrics.json").write_text(json.dumps(
        {"notebook": "03_lora_target_modules", "model": "m", "device": "cpu", "dtype": "float32", "smoke": False, "seed": 0,
         "seconds": 12.5, "threads": 2, "versions": {"torch": "x"}, "max_steps": 15, "lora_r": 8,
         "heldout_loss_before": 3.9, "runs": runs}))
    (build / "run_summary.json").write_text(json.dumps({"total_seconds": 61.0, "all_ok": True, "notebooks": [
        {"notebook": "03_lora_target_modules.ipynb", "status": "ok", "seconds": 61.0}]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert main(["--build", str(build), "--readme", str(readme), "--page", str(tmp_path / "results.md")]) == 0
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{END}\nafter\n") and "old table" not in text
    assert "mlp 0.700 · qv 1.000 (before: 3.900)" in text and "after 15 steps (r=8)" in text
    assert "1.0 min (all passed): 03 61 s; torch threads [2]" in text
    assert text.count("not run (no metrics file)") >= 5  # every other notebook's row says so instead of a stale number
    assert "| 03_lora_target_modules | m | cpu | float32 | False | 0 | 12.5 | 2 |" in (tmp_path / "results.md").read_text()


def test_a_smoke_run_lands_in_the_smoke_folder():
    """`make nb NB=04 PARAMS="-p SMOKE True"` keeps the executed copy and outputs away from the full run's build/04…/."""
    import run_notebooks

    assert run_notebooks.is_smoke(["-p", "SMOKE", "True"]) and run_notebooks.is_smoke(["-y", "SMOKE: true"])
    assert not run_notebooks.is_smoke(["-p", "MAX_STEPS", "3"]) and not run_notebooks.is_smoke(["-p", "SMOKE", "False"])
