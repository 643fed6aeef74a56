"""Nothing lost: a run validates its inputs before touching earlier outputs, never deletes an earlier run's adapter
or checkpoints, keeps smoke runs apart from full runs, and notebook 04 resumes from its checkpoints like the
command line does."""

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import LANES

from helpers import env, launch, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import run_notebook  # noqa: E402

NB04 = ROOT / "notebooks" / "04_sft_training.ipynb"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_set_aside_moves_and_keeps_every_byte(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.bin").write_bytes(b"weights")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "s.json").write_text("{}")
    before = digest(tmp_path)
    said = []
    kept = train.set_aside(tmp_path, ["adapter", "checkpoints", "precision_probe"], say=said.append)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints").exists()
    assert kept.parent == tmp_path / "previous" and str(kept) in said[0]
    assert {k.split("/", 2)[-1]: v for k, v in digest(tmp_path).items()} == before  # the same bytes, moved
    assert train.set_aside(tmp_path, ["adapter"]) is None                          # nothing left to move
    (tmp_path / "adapter").mkdir()
    again = train.set_aside(tmp_path, ["adapter"], say=said.append)
    assert again != kept and kept.exists() and again.exists()                    # a second move never overwrites


def test_smoke_runs_have_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(env.BUILD_ENV, str(tmp_path))
    assert env.output_dir("auto", "04_sft_training") == tmp_path / "04_sft_training"
    assert env.output_dir("auto", "04_sft_training", smoke=True) == tmp_path / "smoke" / "04_sft_training"
    assert train.find_adapter.__defaults__ == ("auto", False)
    monkeypatch.setenv(env.BUILD_ENV, str(tmp_path / "smoke"))  # the tests' build root is already the smoke folder
    assert env.output_dir("auto", "04_sft_training", smoke=True) == tmp_path / "smoke" / "04_sft_training"
    assert env.output_dir("mine", "04_sft_training") == tmp_path / "smoke" / "mine"   # relative: inside build/, not cwd
    assert env.output_dir(str(tmp_path / "abs"), "04_sft_training") == tmp_path / "abs"


def earlier_run(smoke_runs, tmp_path_factory, name: str) -> Path:
    """A copy of this session's notebook 04 smoke output (adapter/ and checkpoints/): an earlier run's folder."""
    out = tmp_path_factory.mktemp(name) / "run04"
    shutil.copytree(smoke_runs.adapter("04_sft_training").parent, out,
                    ignore=shutil.ignore_patterns("*.ipynb", "previous", ".datasets_cache"))
    assert (out / "adapter" / "adapter_model.safetensors").exists() and launch.last_complete_checkpoint(out)
    return out


def run04(out: Path, *params: str):
    """Notebook 04 in smoke mode into `out`, with `params` ("NAME=value"), queued on a test lane."""
    flags = ["-p", "SMOKE", "True", "-p", "OUTPUT_DIR", str(out)]
    for p in params:
        flags += ["-p", *p.split("=", 1)]
    timeout = json.loads(NB04.read_text())["metadata"]["slm_course"]["timeout"]
    job = lambda cpus: run_notebook(NB04, out.parent / "nb", flags, timeout=timeout, env_extra=OFFLINE, cpus=cpus)  # noqa: E731
    return LANES.submit(f"test_runs:{out.parent.name}", job)


@pytest.fixture(scope="module")
def bad_data_run(smoke_runs, tmp_path_factory):
    """An earlier run's folder, its digest, and notebook 04 run again on it with a malformed data file (queued)."""
    out = earlier_run(smoke_runs, tmp_path_factory, "bad-data")
    bad = out.parent / "bad.jsonl"
    bad.write_text('{"prompt": "kitchen lights on", "completion": "{}"}\n{"prompt": "hall fan off"}\n')
    return out, digest(out), run04(out, f"DATA_FILE={bad}")


@pytest.fixture(scope="module")
def resumed_run(smoke_runs, tmp_path_factory):
    """An earlier run's folder, what it held, and notebook 04 resumed on it for two more steps (queued)."""
    out = earlier_run(smoke_runs, tmp_path_factory, "resume")
    last = launch.last_complete_checkpoint(out)
    step = int(last.name.rsplit("-", 1)[1])
    held = {"adapter": digest(out / "adapter"), "checkpoint": digest(last), "last": last, "step": step}
    return out, held, run04(out, "RESUME=True", f"MAX_STEPS={step + 2}")


@pytest.mark.slow
def test_a_bad_data_file_leaves_the_earlier_run_intact(bad_data_run, resumed_run):
    earlier_run, before, future = bad_data_run
    res = future.result()
    assert res.status == "failed" and "DataFormatError" in res.detail and "row 2" in res.detail, res.detail[-1500:]
    assert digest(earlier_run) == before and not (earlier_run / "previous").exists()  # byte for byte, nothing moved


@pytest.mark.slow
def test_notebook_04_resumes_and_keeps_the_earlier_adapter(resumed_run):
    earlier_run, held, future = resumed_run
    first_adapter, kept_checkpoint, last, step = held["adapter"], held["checkpoint"], held["last"], held["step"]
    res = future.result()
    assert res.status == "ok", res.detail[-3000:]
    assert digest(last) == kept_checkpoint                       # resumed from it: step `step` was not trained again
    assert launch.last_complete_checkpoint(earlier_run).name == f"checkpoint-{step + 2}"
    previous = sorted((earlier_run / "previous").iterdir())
    assert len(previous) == 1 and digest(previous[0] / "adapter") == first_adapter   # the earlier adapter, intact
    metrics = json.loads((earlier_run / "metrics.json").read_text())
    assert metrics["steps"] == step + 2 and metrics["resumed_from"] == str(last)
    # what notebook 04 wrote after a resumed run (its plumbing; the notebook's Checks keep the lessons)
    losses = metrics["loss_history"]["loss"]
    assert len(losses) == step + 2 and all(map(math.isfinite, losses))      # one finite loss per step, restored ones too
    assert metrics["task_after"]["n"] == metrics["heldout_n"] > 0 and metrics["quantization"] == "nf4"
    assert metrics["reload_reproduces_generations"] is True and metrics["max_length"] < 2048
    assert 0.9 <= metrics["memory_check_probe"]["ratio"] <= 1.1                # the planner, in the other precision too
    assert all(v > 0 for v in metrics["cpu_step_seconds"].values()) and len(metrics["cpu_step_seconds"]) == 2
    assert (earlier_run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
