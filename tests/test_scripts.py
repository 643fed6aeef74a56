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


# ---- reference results: docs/results.json and the block in every numbered notebook's 2nd cell ----------------------
SFT_METRICS = {"notebook": "04_sft_training", "model": "smollm2-135m", "device": "cpu", "dtype": "float32", "smoke": False,
               "seed": 0, "seconds": 110.7, "threads": 2, "versions": {}, "profile": "cpu", "steps": 36,
               "first_loss": 1.594, "final_loss": 0.0171, "seconds_per_step": 2.04,
               "task_before": {"exact_match": 0.0, "schema_valid": 0.0, "n": 20},
               "task_after": {"exact_match": 0.65, "schema_valid": 1.0, "n": 20}}


def results_setup(tmp_path, monkeypatch, metrics=SFT_METRICS):
    """A build/ with notebook 04's metrics (dated 2026-03-04), two numbered notebooks, a README to fill."""
    import json

    import collect_metrics

    monkeypatch.setattr(collect_metrics, "git_commit", lambda root: "abc1234")
    monkeypatch.setattr(collect_metrics, "cpu_kind", lambda: "Test CPU, AVX-512 BF16, 2 cores")
    build = tmp_path / "build"
    (build / "04_sft_training").mkdir(parents=True)
    (build / "04_sft_training" / "metrics.json").write_text(json.dumps(metrics))
    os.utime(build / "04_sft_training" / "metrics.json", (1772625600, 1772625600))   # 2026-03-04 12:00 UTC
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    paths = [make_nb(nbs, name="04_sft_training.ipynb"), make_nb(nbs, name="09_new_topic.ipynb")]
    (tmp_path / "README.md").write_text(f"{collect_metrics.BEGIN}\n{collect_metrics.END}\n")
    argv = ["--build", str(build), "--readme", str(tmp_path / "README.md"), "--page", str(tmp_path / "results.md"),
            "--snapshot", str(tmp_path / "docs" / "results.json"), "--notebooks", str(nbs)]
    return argv, paths


def test_make_results_writes_the_snapshot_and_a_block_in_every_notebook(tmp_path, monkeypatch):
    import json

    from collect_metrics import RESULTS_BEGIN, RESULTS_END, main

    argv, (sft, new) = results_setup(tmp_path, monkeypatch)
    titles = [nbformat.read(p, 4).cells[0].source for p in (sft, new)]
    assert main(argv) == 0
    snap = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert (snap["commit"], snap["machine"], snap["date"]) == ("abc1234", "Test CPU, AVX-512 BF16, 2 cores", "2026-03-04")
    assert snap["notebooks"]["04_sft_training"]["headline"] == {
        "held-out exact match": "0 % → 65 % (n = 20)", "schema-valid answers": "0 % → 100 %",
        "training loss": "1.59 → 0.017 in 36 steps (2.0 s/step)", "run time": "111 s (2 torch threads)"}
    cells = nbformat.read(sft, 4).cells
    assert cells[0].source == titles[0] and cells[1].source.startswith(RESULTS_BEGIN) and cells[1].source.endswith(RESULTS_END)
    assert "- held-out exact match: **0 % → 65 % (n = 20)**" in cells[1].source
    assert "commit `abc1234`, 2026-03-04" in cells[1].source and "Test CPU, AVX-512 BF16, 2 cores" in cells[1].source
    assert len(cells) == 6 and [c.cell_type for c in cells[2:]] == ["code"] * 4     # inserted, nothing replaced
    other = nbformat.read(new, 4).cells
    assert other[0].source == titles[1] and "none yet" in other[1].source   # not in the run: says so, same place
    before = [p.read_bytes() for p in (sft, new)]
    assert main(argv) == 0 and [p.read_bytes() for p in (sft, new)] == before   # a second run changes nothing


def test_make_results_updates_a_stale_or_misplaced_block_in_place(tmp_path, monkeypatch):
    import json

    from collect_metrics import main

    argv, (sft, _) = results_setup(tmp_path, monkeypatch)
    main(argv)
    nb = nbformat.read(sft, 4)
    nb.cells.append(nb.cells.pop(1))                                             # the block wandered to the end
    nbformat.write(nb, sft)
    metrics = {**SFT_METRICS, "task_after": {"exact_match": 0.8, "schema_valid": 1.0, "n": 20}}
    (tmp_path / "build" / "04_sft_training" / "metrics.json").write_text(json.dumps(metrics))
    main(argv)
    cells = nbformat.read(sft, 4).cells
    blocks = [i for i, c in enumerate(cells) if c.source.startswith("<!-- results:begin")]
    assert blocks == [1] and "0 % → 80 % (n = 20)" in cells[1].source and len(cells) == 6


def test_the_gate_checks_the_block_against_the_snapshot(tmp_path, monkeypatch):
    import json

    from check_notebooks import main as gate
    from collect_metrics import main

    argv, (sft, new) = results_setup(tmp_path, monkeypatch)
    snapshot = tmp_path / "docs" / "results.json"
    assert problems(sft, None) == []                                   # no snapshot yet: blocks are not checked
    main(argv)
    snap = json.loads(snapshot.read_text())
    assert problems(sft, snap) == [] and problems(new, snap) == []
    assert gate(str(tmp_path / "notebooks"), snapshot) == 0
    stale = {**snap, "commit": "def5678"}                               # numbers or provenance changed since
    assert any("differs from docs/results.json" in m for m in problems(sft, stale))
    nb = nbformat.read(sft, 4)
    del nb.cells[1]
    nbformat.write(nb, sft)
    assert any("no reference-results block" in m for m in problems(sft, snap))
    assert gate(str(tmp_path / "notebooks"), snapshot) == 1
    assert gate(str(tmp_path / "notebooks"), tmp_path / "absent.json") == 0   # switched off without a snapshot


def test_headlines_fall_back_to_the_run_time_and_cpu_kind_reads_the_flags(tmp_path):
    from collect_metrics import cpu_kind, headline

    from helpers import env

    assert headline("09_new_topic", {"seconds": 9.6, "threads": 1}) == {"run time": "10 s (1 torch threads)"}
    assert headline("04_sft_training", {"seconds": 5, "threads": 2}) == {"run time": "5 s (2 torch threads)"}  # keys missing
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test EPYC 9000\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_kind(info) == f"Test EPYC 9000, AVX-512 BF16, {env.cpu_cores()} cores"
    info.write_text("processor\t: 0\nmodel name\t: Old Xeon\nflags\t\t: fpu avx2\n")
    assert cpu_kind(info) == f"Old Xeon, no AVX-512 BF16, {env.cpu_cores()} cores"


HEADLINE_CASES = {   # metrics shaped like each notebook's (the figures of README's Measured table) → the headline
    "02_load_4bit": ({"formats": [{"format": "full", "footprint_mib": 513.2, "perplexity": 32.71},
                                  {"format": "nf4", "footprint_mib": 165.0, "perplexity": 39.29},
                                  {"format": "nf4-dq", "footprint_mib": 160.6, "perplexity": 39.4}]},
                     {"weights in memory, fp32 → nf4-dq": "513 MiB → 161 MiB", "perplexity, fp32 → nf4": "32.7 → 39.3"}),
    "03_lora_target_modules": ({"max_steps": 8, "heldout_loss_before": 3.866, "runs": [
        {"set": "qv", "heldout_loss": 1.545}, {"set": "all-linear", "heldout_loss": 0.845},
        {"set": "blog: embed+head", "heldout_loss": 2.624}]},
        {"held-out loss after 8 steps, best target set": "all-linear 0.845 (before training: 3.866)",
         "worst target set": "blog: embed+head 2.624"}),
    "05_benchmarking": ({"task": {"n": 30, "base": {"exact match": {"rate": 0.0, "ci": [0.0, 0.114]}},
                                  "tuned": {"exact match": {"rate": 0.633, "ci": [0.455, 0.781]}},
                                  "paired_exact_match": {"p_value": 3.8e-6}},
                         "loss": {"base": {"general_text": {"perplexity": 38.31}},
                                  "tuned": {"general_text": {"perplexity": 41.96}}}},
                        {"task exact match, base → fine-tuned": "0.00 [0.00, 0.11] → 0.63 [0.46, 0.78] (n = 30, McNemar "
                                                                "p = 3.8e-06)",
                         "general-text perplexity (forgetting)": "38.3 → 42.0"}),
    "06_scaling_out": ({"two_processes": {"max_loss_diff": 0.0}, "kill_resume": {"max_loss_diff": 2.5e-7}},
                       {"2 processes vs 1: max Δ loss": "0.0e+00", "kill -9 then resume vs uninterrupted: max Δ loss": "2.5e-07"}),
    "07_preference_tuning": ({"verdict": "hurt", "gate": {"kept": "sft"}, "general_text_perplexity": {"before": 41.96, "after": 44.71},
                              "task": {"n": 30, "before": {"exact_match": {"rate": 0.633, "ci": [0.455, 0.781]}},
                                       "after": {"exact_match": {"rate": 0.2, "ci": [0.095, 0.373]}},
                                       "paired_exact_match": {"p_value": 0.0153}}},
                             {"held-out exact match, SFT → DPO": "0.63 [0.46, 0.78] → 0.20 [0.10, 0.37] (n = 30, McNemar "
                                                                 "p = 0.015)",
                              "general-text perplexity": "42.0 → 44.7",
                              "verdict, acceptance gate": "hurt; the gate keeps the SFT adapter"}),
    "09_export_gguf": ({"bar": {"q4_k_m_decode_speedup": 6.1}, "side_by_side": {
        "transformers fp32": {"size MB": 538.2, "decode tok/s": 24.14, "exact match": 0.6875},
        "GGUF Q4_K_M": {"size MB": 105.4, "decode tok/s": 147.1, "exact match": 0.6875}}},
        {"GGUF Q4_K_M (llama.cpp)": "105 MB, 147.1 tok/s decode, exact match 0.69",
         "transformers fp32": "538 MB, 24.1 tok/s decode, exact match 0.69", "Q4_K_M decode speed-up over fp32": "×6.1"}),
}


@pytest.mark.parametrize("stem", sorted(HEADLINE_CASES))
def test_each_notebooks_headline_figures(stem):
    from collect_metrics import headline

    metrics, want = HEADLINE_CASES[stem]
    assert headline(stem, {**metrics, "seconds": 60.2, "threads": 2}) == {**want, "run time": "60 s (2 torch threads)"}


def test_every_headline_topic_names_a_notebook():
    """A renamed notebook would silently lose its figures: each HEADLINES topic must match a notebook's name."""
    from collect_metrics import HEADLINES

    topics = {p.stem[3:] for p in (Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert set(HEADLINES) <= topics, set(HEADLINES) - topics
