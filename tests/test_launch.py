"""helpers.launch, configs/ and the GPU lane.

Fast: recipes and accelerate configs parse, overrides, complete-vs-partial checkpoints, per-rank memory and
communication arithmetic, the GPU workflow. Slow (real runs of `python -m helpers.launch`, each in subprocesses):
- 2 processes (accelerate + torchrun, gloo) on the real SmolLM2-135M vs 1 process with the same global batch
  (2 ranks × 2 sequences = 1 process × 2 sequences × 2 accumulation steps): same batches, same losses, same adapter;
- kill -9 after a checkpoint, rerun the same command: the final adapter and loss history equal the uninterrupted run;
- SIGTERM mid-run: a checkpoint at the current step, exit 143, rerun resumes from it to the same result (tiny Phi);
- `accelerate launch --cpu --num_processes 2` (which starts ONE process) is refused.
GPU (skipped without CUDA, saying why; `make test-gpu` runs them): QLoRA step time / tokens/s / peak memory,
NF4 vs bf16, and 2-GPU DDP vs 1 GPU.

Tolerances: ranks vs one process and resumed vs uninterrupted agree to |Δloss| ≤ 1e-5 and max |Δw| ≤ 1e-6 on CPU
in fp32 (measured here: exactly 0 for both — DDP's gradient average of 2 ranks equals accumulation over 2
micro-batches bit for bit, and a resumed run restores optimizer, scheduler, RNG and data order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import data, env, launch, memory, train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RECIPE = str(CONFIGS / "sft_cpu_smollm2.yaml")
CPU_2PROC = str(CONFIGS / "accelerate" / "cpu_2proc.yaml")
# The CPU runs: GPUs hidden (on the GPU lane too: these test the gloo path), one thread per process (the 2-process
# run gets one core each, and both runs use the same CPU kernels), offline.
RUN_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GPU_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the GPU lane: GPUs visible, hub allowed by make test-gpu
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-6
CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU here: the GPU lane runs on a GPU runner (make test-gpu, .github/workflows/gpu.yml)"

# Small but real: SmolLM2-135M, 4 optimizer steps of global batch 4, sequences ≤ 99 tokens (none truncated), LoRA
# r=2 on q/v, no dropout (the 2-process run and the 1-process run then draw no random numbers differently).
SMALL = ["lora_r=2", "lora_alpha=4", "lora_dropout=0.0", "lora_targets=[q_proj,v_proj]", "max_steps=4",
         "per_device_train_batch_size=2", "learning_rate=1.0e-3", "lr_scheduler_type=constant", "warmup_steps=0",
         "max_length=128", "logging_steps=1", "save_steps=2", "eval_samples=0"]
TINY = ["model=tiny-phi", "lora_r=4", "lora_alpha=8", "lora_dropout=0.1", "max_steps=40",
        "per_device_train_batch_size=2", "max_length=192", "logging_steps=1", "save_steps=5", "save_total_limit=3",
        "eval_samples=0", "gradient_check=false"]


def sft_cmd(*sets: str, resume: str = "auto") -> list[str]:
    return [sys.executable, "-m", "helpers.launch", "--config", RECIPE, "--resume", resume, "--set", *sets]


def launch_cmd(accelerate_config: str, *sets: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
            "-m", "helpers.launch", "--config", RECIPE, "--set", *sets]


def run(cmd: list[str], timeout: float = 600, environ: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=environ or RUN_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[-12:])} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc, time.perf_counter() - t0


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]


def record(name: str, values: dict) -> None:
    """Keep measured numbers for the docs: build/test_launch/<name>.json."""
    env.write_json(env.build_dir("test_launch") / f"{name}.json", values)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """64 records of the course's task (the real data generator, seeded), as a JSONL training file."""
    return data.write_jsonl(data.make_task_records(0, n_train=64, n_heldout=1)["train"],
                            tmp_path_factory.mktemp("data") / "train.jsonl")


# ------------------------------------------------------------------------------------------- fast


def test_recipes_are_train_configs_and_fit_their_gpus():
    cpu, _ = launch.load_recipe(CONFIGS / "sft_cpu_smollm2.yaml")
    t4, _ = launch.load_recipe(CONFIGS / "sft_phi2_qlora_t4.yaml")
    a100, _ = launch.load_recipe(CONFIGS / "sft_phi2_qlora_a100.yaml")
    assert (cpu.model, cpu.quantization) == ("smollm2-135m", None)
    assert (t4.model, t4.quantization, a100.quantization) == ("phi-2", "nf4", "nf4")
    assert t4.dtype is None and a100.dtype is None  # the card decides: fp16 on a T4, bf16 on an A100
    for cfg, budget in ((t4, 15.0), (a100, 40.0)):  # usable GiB
        est = memory.estimate_memory("phi-2", quantization=cfg.quantization, dtype="bfloat16", lora_r=cfg.lora_r,
                                    lora_targets=cfg.lora_targets, batch_size=cfg.per_device_train_batch_size,
                                    seq_len=cfg.max_length, activation_checkpointing=cfg.activation_checkpointing,
                                    optimizer=cfg.optimizer, double_quant=cfg.double_quant, overhead_bytes=0.5 * 2**30)
        assert est.fits(budget), (cfg.output_dir, est.gib())
        assert est.total > 2 * 2**30  # Phi-2's NF4 weights alone are ~1.8 GiB: the planner is not trivially small


def test_overrides_launch_options_and_unknown_keys():
    cfg, opts = launch.load_recipe(RECIPE, ["max_steps=7", "lora_targets=[q_proj, v_proj]", "launch.quant_storage=bfloat16"])
    assert cfg.max_steps == 7 and cfg.lora_targets == ["q_proj", "v_proj"] and opts == {"quant_storage": "bfloat16"}
    assert launch.parse_override("dtype=null") == ("dtype", None)
    with pytest.raises(ValueError, match="did you mean.*max_steps"):
        launch.load_recipe(RECIPE, ["max_step=3"])
    with pytest.raises(ValueError, match="unknown launch option"):
        launch.load_recipe(RECIPE, ["launch.zero_stage=3"])
    with pytest.raises(ValueError, match="key=value"):
        launch.parse_override("max_steps")


def _fake_checkpoint(folder: Path, skip: str = "", state: str = '{"global_step": 1}') -> None:
    folder.mkdir(parents=True)
    for name in (*launch.CHECKPOINT_FILES, "rng_state.pth"):
        if name != skip:
            (folder / name).write_text(state if name == "trainer_state.json" else "x")


def test_last_complete_checkpoint_skips_what_a_kill_cut_short(tmp_path):
    root = tmp_path / train.CHECKPOINT_DIR
    assert launch.last_complete_checkpoint(tmp_path) is None
    _fake_checkpoint(root / "checkpoint-2")
    _fake_checkpoint(root / "checkpoint-10")
    _fake_checkpoint(root / "checkpoint-12", skip="trainer_state.json")  # killed while saving
    _fake_checkpoint(root / "checkpoint-14", state='{"global_st')         # truncated state file
    assert launch.last_complete_checkpoint(tmp_path) == root / "checkpoint-10"  # numeric order, not text order
    cfg, _ = launch.load_recipe(RECIPE, [f"output_dir={tmp_path}"])
    assert launch.resolve_resume(cfg, "auto") == str(root / "checkpoint-10")
    assert launch.resolve_resume(cfg, "never") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        launch.resolve_resume(cfg, str(root / "checkpoint-12"))


def test_signal_handlers_are_put_back_whatever_fails(monkeypatch, tmp_path):
    """GracefulStop's handlers are in place while training runs and the previous ones come back afterwards, also
    when loading the model or training raises."""
    signals = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in signals}
    args = ["--config", RECIPE, "--resume", "never", "--set", f"output_dir={tmp_path}"]
    during = []

    def failing_train(cfg, model=None, callbacks=(), extra_metrics=None):
        during.append({s: signal.getsignal(s) for s in signals})
        raise RuntimeError("training failed")

    def failing_load(cfg, launch_opts, launch_):
        raise OSError("no such model")

    monkeypatch.setattr(train, "train", failing_train)
    monkeypatch.setattr(launch, "load_model_for_launch", lambda cfg, launch_opts, launch_: None)
    with pytest.raises(RuntimeError, match="training failed"):
        launch.main(args)
    assert len(during) == 1 and all(during[0][s] != before[s] for s in signals)  # caught while training ran
    assert {s: signal.getsignal(s) for s in signals} == before
    monkeypatch.setattr(launch, "load_model_for_launch", failing_load)
    with pytest.raises(OSError, match="no such model"):
        launch.main(args)
    assert {s: signal.getsignal(s) for s in signals} == before and len(during) == 1


def test_launcher_guard_reads_accelerates_single_process_signature():
    launch.check_launcher({})  # plain python: fine
    launch.check_launcher({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "False"})  # torchrun
    with pytest.raises(SystemExit, match="cpu_2proc.yaml"):
        launch.check_launcher({"MASTER_ADDR": "127.0.0.1", "ACCELERATE_USE_CPU": "True"})


def test_accelerate_configs_parse_and_say_when_to_use_them():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {"cpu_2proc": "MULTI_GPU", "ddp_multi_gpu": "MULTI_GPU", "fsdp_qlora": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    for name, kind in expected.items():
        path = CONFIGS / "accelerate" / f"{name}.yaml"
        cfg = ClusterConfig.from_yaml_file(path)  # accelerate's own parser: unknown keys raise
        assert str(cfg.distributed_type).endswith(kind), (name, cfg.distributed_type)
        assert cfg.num_processes >= 2 and cfg.use_cpu is False
        assert "when to use" in path.read_text().lower(), f"{name}: say when to use it"
    fsdp = ClusterConfig.from_yaml_file(CONFIGS / "accelerate" / "fsdp_qlora.yaml").fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert ClusterConfig.from_yaml_file(CONFIGS / "accelerate" / "deepspeed_zero3.yaml").deepspeed_config["zero_stage"] == 3


def test_gpu_workflow_runs_make_test_gpu_on_a_self_hosted_gpu_runner():
    import yaml

    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu.yml").read_text())
    job = wf["jobs"]["test-gpu"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    assert any(step.get("run", "").strip() == "make test-gpu" for step in job["steps"])


# ------------------------------------------------------------------------------------------- slow, real runs


# Two processes (gloo) training exactly like one process, and a kill -9 after a checkpoint resuming to the same
# adapter, are notebook 06's smoke run (tests/test_notebooks.py): its Checks assert both, on this launcher and the
# same accelerate config, so they are not trained a second time here.


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resumes_to_the_same_adapter(tmp_path, task_file):
    """A polite interruption (what a scheduler or preemptible VM sends): checkpoint now, exit 143, resume later.

    Tiny Phi (code path only) with LoRA dropout 0.1, so the resumed run must also restore the RNG state.
    """
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    sets = (*TINY, f"data_file={task_file}")
    run(sft_cmd(*sets, f"output_dir={ref_out}"))
    proc = subprocess.Popen(sft_cmd(*sets, f"output_dir={out}"), cwd=ROOT, env=RUN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 300
        while not launch.checkpoint_complete(out / "checkpoints" / "checkpoint-5"):
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    assert "interrupted — SIGTERM at step" in stdout
    step = int(stdout.split("SIGTERM at step ")[1].split(":")[0])
    assert 5 <= step < 40
    assert launch.last_complete_checkpoint(out).name == f"checkpoint-{step}"  # saved at the step it was told to stop
    assert not (out / "adapter").exists()
    run(sft_cmd(*sets, f"output_dir={out}"))
    m, ref = metrics(out), metrics(ref_out)
    assert m["launch"]["resumed_from"].endswith(f"checkpoint-{step}") and m["steps"] == 40
    loss_diff = max(abs(a - b) for a, b in zip(m["loss_history"]["loss"], ref["loss_history"]["loss"], strict=True))
    weight_diff = max_weight_diff(adapter(out), adapter(ref_out))
    record("sigterm_resume", {"stopped_at_step": step, "max_loss_diff": loss_diff, "max_weight_diff": weight_diff})
    assert loss_diff <= LOSS_TOL and weight_diff <= WEIGHT_TOL, (loss_diff, weight_diff)


@pytest.mark.slow
def test_accelerate_cpu_flag_single_process_is_refused():
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); helpers.launch says so and stops."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "helpers.launch", "--config", RECIPE, "--print-config"]
    proc = subprocess.run(cmd, cwd=ROOT, env=RUN_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "started ONE" in proc.stderr and "cpu_2proc.yaml" in proc.stderr


# ------------------------------------------------------------------------------------------- GPU lane


def _gpu_run(tmp_path: Path, name: str, *sets: str) -> dict:
    from helpers import models

    model = models.resolve_model("auto", verbose=False)  # phi-2 with the hub, else the offline SmolLM2
    recipe = "sft_phi2_qlora_a100.yaml" if env.choose_device().dtype_name == "bfloat16" else "sft_phi2_qlora_t4.yaml"
    out = tmp_path / name
    cmd = [sys.executable, "-m", "helpers.launch", "--config", str(CONFIGS / recipe), "--set", f"model={model}",
           "max_steps=20", "logging_steps=2", "save_steps=10", "eval_samples=0", f"output_dir={out}", *sets]
    run(cmd, timeout=1800, environ=GPU_ENV)
    m = metrics(out)
    return {"model": model, "recipe": recipe, "quantization": m["config"]["quantization"], "dtype": m["dtype"],
            "seconds_per_step": m["seconds_per_step"], "tokens_per_second": m["tokens_per_second"],
            "peak_gib": round(m["peak_memory"]["peak_bytes"] / 2**30, 2), "first_loss": m["first_loss"],
            "final_loss": m["final_loss"], "device_name": env.choose_device().name}


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_gpu_qlora_nf4_vs_bf16_step_time_and_memory(tmp_path):
    nf4 = _gpu_run(tmp_path, "nf4")
    full = _gpu_run(tmp_path, "bf16", "quantization=null", "optimizer=adamw_torch")
    record("gpu_lane", {"nf4": nf4, "16bit": full})
    assert nf4["dtype"] == env.choose_device().dtype_name  # bf16 on Ampere+, fp16 on a T4
    for r in (nf4, full):
        assert r["final_loss"] < r["first_loss"] and r["seconds_per_step"] > 0 and r["peak_gib"] > 0
    assert nf4["peak_gib"] < full["peak_gib"], (nf4, full)  # 4-bit base weights must use less memory


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (DDP across GPUs); " + NO_CUDA)
def test_gpu_two_gpu_ddp_matches_one_gpu(tmp_path, task_file):
    sets = [*SMALL, "model=smollm2-135m", f"data_file={task_file}"]
    run(sft_cmd(*sets, "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'one'}"), environ=GPU_ENV)
    run(launch_cmd(str(CONFIGS / "accelerate" / "ddp_multi_gpu.yaml"), *sets, f"output_dir={tmp_path / 'two'}"),
        environ=GPU_ENV)
    r0, r1 = ranks(tmp_path / "two")
    assert r0["backend"] == "nccl" and r0["world_size"] == 2 and r0["adapter_sha256"] == r1["adapter_sha256"]
    a, b = metrics(tmp_path / "one")["loss_history"]["loss"], metrics(tmp_path / "two")["loss_history"]["loss"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-2  # bf16/TF32 kernels: not bit-exact on GPU
