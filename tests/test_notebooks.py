"""Run every notebook in notebooks/ with papermill in smoke mode (SMOKE=True, offline) and check what it wrote.

New notebooks are picked up automatically. Each declares in its metadata the artefacts it must write under
its output folder and a timeout: "slm_course": {"artefacts": [...], "timeout": seconds}.
Executed copies land in build/smoke/<stem>/ for inspection. They run in order (05 reads 04's adapter).
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import notebooks, run_notebook  # noqa: E402

SMOKE_OUT = ROOT / "build" / "smoke"
# `make test` never contacts a model hub; `make test-gpu` sets SLM_COURSE_ALLOW_HUB=1 so MODEL="auto" can pick Phi-2.
OFFLINE = {} if os.environ.get("SLM_COURSE_ALLOW_HUB") == "1" else {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Offline, a fake token (never sent anywhere) proves no notebook prints it; on the GPU lane, the real one if set.
TOKEN = os.environ.get("HF_TOKEN", "") if not OFFLINE else "hf_smokeTestSecretThatMustNeverBePrinted"


def test_there_are_notebooks():
    assert notebooks(), "no notebooks found in notebooks/"


@pytest.mark.slow
@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebook_smoke(path):
    meta = json.loads(path.read_text())["metadata"]["slm_course"]
    res = run_notebook(path, SMOKE_OUT, ["-p", "SMOKE", "True"], timeout=meta["timeout"], env_extra={**OFFLINE, "HF_TOKEN": TOKEN})
    assert res.status == "ok", f"{path.name} {res.status} after {res.seconds:.0f} s:\n{res.detail}"
    nb = nbformat.read(res.output, as_version=4)
    checks = [c for c in nb.cells if "checks" in c.metadata.get("tags", [])]
    assert len(checks) == 1 and checks[0].execution_count is not None, "the Checks cell did not run"
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    out_dir = SMOKE_OUT / path.stem
    missing = [a for a in meta["artefacts"] if not (out_dir / a).exists()]
    assert not missing, f"{path.name} did not write {missing} under {out_dir}"
    for name in meta["artefacts"]:
        if name.endswith(".json"):
            json.loads((out_dir / name).read_text())  # valid JSON
        assert (out_dir / name).stat().st_size > 0
    if TOKEN:
        assert TOKEN not in res.output.read_text(), "the HF_TOKEN value leaked into the notebook's outputs"


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A second architecture built from a config: Qwen2 (GQA, biased q/k/v, untied head), SmolLM2's tokenizer."""
    import torch
    import transformers as tf

    from helpers import models

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tok = tf.AutoTokenizer.from_pretrained(models.model_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tf.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["03_lora_target_modules", "04_sft_training"])
def test_notebook_smoke_on_a_second_architecture(stem, tiny_qwen2, tmp_path):
    """The recipes hold beyond the course's models: the smoke runs pass with MODEL = a tiny Qwen2 folder."""
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    meta = json.loads(path.read_text())["metadata"]["slm_course"]
    res = run_notebook(path, tmp_path, ["-p", "SMOKE", "True", "-p", "MODEL", str(tiny_qwen2)],
                       timeout=meta["timeout"], env_extra={**OFFLINE, "HF_TOKEN": TOKEN})
    assert res.status == "ok", f"{path.name} on Qwen2 {res.status} after {res.seconds:.0f} s:\n{res.detail}"
    metrics = json.loads((tmp_path / stem / "metrics.json").read_text())
    assert str(tiny_qwen2) in json.dumps(metrics["model"])
