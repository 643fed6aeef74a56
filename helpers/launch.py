"""The notebook-04 recipe as a command, on one process or many, and resumable after an interruption.

    python -m helpers.launch --config configs/sft_cpu_smollm2.yaml [--set max_steps=20 output_dir=build/x]
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m helpers.launch --config configs/sft_cpu_smollm2.yaml

Training itself is `helpers.train.train` — the function notebook 04 calls — so the notebook and the command run
the same code. This module only adds what a launched job needs around it:

- a YAML recipe → `TrainConfig` (unknown keys rejected with suggestions), plus `--set key=value` overrides;
- resume: by default from the last *complete* checkpoint under `<output_dir>/checkpoints/` (a checkpoint that a
  kill cut short is skipped, where the Trainer's own `resume_from_checkpoint=True` would pick it and fail);
- preemption: SIGTERM/SIGINT save a checkpoint at the end of the current step, on every rank at the same step,
  then exit with 128+signal; rerunning the same command continues from there;
- rank awareness: refuses to run when the launcher started N processes but the trainer sees fewer (accelerate's
  `--cpu` launcher silently starts one), records per rank what it trained on (`<output_dir>/ranks/rank<i>.json`),
  and loads a 4-bit model onto each rank's own GPU.

What each rank holds and sends (DDP / FSDP / ZeRO-3) is planned by `helpers.memory` (notebook 06).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers import env

CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
LAUNCH_KEYS = {"quant_storage"}  # recipe keys for the launcher, not TrainConfig fields (under `launch:`)


class TrainingInterrupted(RuntimeError):
    """Raised after the checkpoint that a SIGTERM/SIGINT asked for has been written; the run can resume from it."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved to {checkpoint}; "
                         "run the same command again to resume")


# ------------------------------------------------------------------------------------------- recipes


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' → (key, YAML-parsed value): 'max_steps=20' → 20, 'lora_targets=[q_proj,v_proj]' → a list."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()):
    """Read a YAML recipe (TrainConfig fields + an optional `launch:` section) → (TrainConfig, launch options)."""
    import yaml

    from helpers.train import TrainConfig

    path = Path(path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of TrainConfig fields, got {type(values).__name__}")
    launch = dict(values.pop("launch", None) or {})
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("launch."):
            launch[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    unknown = set(launch) - LAUNCH_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown launch option(s) {sorted(unknown)}; known: {sorted(LAUNCH_KEYS)}")
    try:
        return TrainConfig.from_dict(values), launch
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


# Notebook 04's parameters cell: the recipe values that differ between profiles, by the TrainConfig field each sets.
# The cell holds the cpu profile's values as literals; `follow_profile` moves the unchanged ones to another profile.
RECIPE_PARAMETERS = {
    "QUANTIZATION": "quantization", "DOUBLE_QUANT": "double_quant", "LORA_R": "lora_r", "LORA_ALPHA": "lora_alpha",
    "LORA_DROPOUT": "lora_dropout", "LEARNING_RATE": "learning_rate", "LR_SCHEDULER": "lr_scheduler_type",
    "WARMUP_STEPS": "warmup_steps", "MAX_STEPS": "max_steps", "BATCH_SIZE": "per_device_train_batch_size",
    "GRAD_ACCUM": "gradient_accumulation_steps", "MAX_LENGTH": "max_length", "OPTIMIZER": "optimizer",
    "MAX_GRAD_NORM": "max_grad_norm", "ACTIVATION_CHECKPOINTING": "activation_checkpointing",
    "LOGGING_STEPS": "logging_steps", "SAVE_STEPS": "save_steps", "N_HELDOUT": "eval_samples",
    "EVAL_BATCH": "eval_batch_size", "MAX_NEW_TOKENS": "max_new_tokens",
}


def profile_parameters(cfg) -> dict:
    """`cfg` as notebook 04's parameters (QUANTIZATION "none" for no quantization)."""
    values = cfg.to_dict()
    return {name: ("none" if values[key] is None and key == "quantization" else values[key])
            for name, key in RECIPE_PARAMETERS.items()}


def follow_profile(values: Mapping, cfg) -> dict:
    """Notebook 04's parameters for a run of `cfg`'s profile: each value still equal to the cpu profile's (the
    parameters cell's literal) takes `cfg`'s; a value the reader changed is kept."""
    from helpers import train

    cpu = profile_parameters(load_recipe(env.REPO_ROOT / train.PROFILE_FILES["cpu"])[0])
    target = profile_parameters(cfg)
    unknown = set(values) - set(RECIPE_PARAMETERS)
    if unknown:
        raise ValueError(f"not recipe parameters: {sorted(unknown)}; known: {sorted(RECIPE_PARAMETERS)}")
    return {name: target[name] if value == cpu[name] else value for name, value in values.items()}


def recipe_config(values: Mapping, cfg, **fields):
    """`cfg` with notebook 04's parameter values (and any other TrainConfig `fields`) put in."""
    update = {RECIPE_PARAMETERS[name]: (None if name == "QUANTIZATION" and v == "none" else v) for name, v in values.items()}
    from helpers import train

    return train.TrainConfig.from_dict({**cfg.to_dict(), **update, **fields})


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_complete(folder: str | Path) -> bool:
    """True if a Trainer checkpoint folder has every file a resume needs and its trainer_state.json parses."""
    folder = Path(folder)
    if not all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except ValueError:
        return False
    return any(folder.glob("rng_state*.pth"))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint under <output_dir>/checkpoints/ (incomplete ones are skipped), or None."""
    from helpers.train import CHECKPOINT_DIR

    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    for path in root.glob("checkpoint-*"):
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and checkpoint_complete(path):
            found.append((int(step), path))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------- distributed context


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched job, from the launcher's environment (torchrun/accelerate set these)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Launch:
        """Read RANK / LOCAL_RANK / WORLD_SIZE (1 process when unset)."""
        get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
        return cls(get("RANK", 0), get("LOCAL_RANK", 0), get("WORLD_SIZE", 1))

    @property
    def main(self) -> bool:
        """True on the process that prints and writes shared files."""
        return self.rank == 0


def check_launcher(environ: Mapping[str, str] | None = None) -> None:
    """Refuse the silent single-process run: `accelerate launch --cpu --num_processes N` (N > 1) starts ONE process.

    accelerate's simple launcher (used for --cpu / MULTI_CPU without an MPI hostfile) sets MASTER_ADDR when more
    than one process was asked for but starts a single process without WORLD_SIZE (measured with accelerate 1.15).
    """
    environ = os.environ if environ is None else environ
    if "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ and "ACCELERATE_USE_CPU" in environ:
        raise SystemExit(
            "helpers.launch: accelerate was asked for several processes but started ONE (its simple launcher, used for "
            "--cpu or with fewer GPUs than processes, runs several only through mpirun). For N processes on one CPU "
            "machine use\n"
            "  accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m helpers.launch --config ...\n"
            "(torchrun-based launch; the recipe picks the CPU and accelerate the gloo backend)."
        )


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool) -> bool:
    """True if `flag` is True on any rank (an all-reduce; just `flag` in a single process)."""
    if not _dist_ready():
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def adapter_digest(model) -> str:
    """sha256 over the trainable (LoRA) tensors, by name: equal on every DDP rank, equal across exact reruns."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- callbacks


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class GracefulStop(_callback_base()):
    """SIGTERM/SIGINT → checkpoint at the end of the current step (all ranks agree on the step) → TrainingInterrupted.

    The signal handler only sets a flag; the Trainer saves in its normal place, with optimizer, scheduler and
    RNG state, so the resumed run continues exactly where this one stopped.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signum, self.signals = 0, tuple(signals)
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> None:
        """Catch the signals (call inside the `try` whose `finally` calls `restore`)."""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(bool(self.signum)):
            self.signum = self.signum or signal.SIGTERM  # another rank got it
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.signum:
            raise TrainingInterrupted(self.signum, state.global_step,
                                      str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))
        return control


class RankRecorder(_callback_base()):
    """Per rank: world size and backend as the trainer sees them, what this rank's forward passes saw, the adapter.

    Also the guard against a silent single-process run: if the launcher's WORLD_SIZE disagrees with the
    trainer's world size, training stops before the first step with an explanation.
    """

    def __init__(self, launch: Launch, folder: Path, max_digests: int = 1000):
        self.launch, self.folder, self.max_digests = launch, folder, max_digests
        self.record: dict = {"forward_calls": 0, "sequences": 0, "tokens": 0, "batch_digests": []}
        self._handle = None

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None or not module.training:
            return
        r = self.record
        r["forward_calls"] += 1
        r["sequences"] += int(ids.shape[0])
        r["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        if len(r["batch_digests"]) < self.max_digests:
            r["batch_digests"].append(hashlib.sha1(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size != self.launch.world_size:
            raise RuntimeError(
                f"the launcher started WORLD_SIZE={self.launch.world_size} processes but the trainer sees a world size "
                f"of {args.world_size}: every process would train alone on the full data. On CPU use "
                "configs/accelerate/cpu_2proc.yaml (accelerate's --cpu launcher starts a single process)."
            )
        from accelerate import PartialState

        st = PartialState()
        self.record.update(rank=args.process_index, world_size=args.world_size, backend=str(st.backend),
                           distributed_type=str(st.distributed_type).rsplit(".", 1)[-1], device=str(args.device),
                           start_step=state.global_step)
        if model is not None:
            self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._handle is not None:
            self._handle.remove()
        self.record.update(end_step=state.global_step, adapter_sha256=adapter_digest(model) if model is not None else None)
        self.folder.mkdir(parents=True, exist_ok=True)
        env.write_json(self.folder / f"rank{args.process_index}.json", self.record)
        return control


# ------------------------------------------------------------------------------------------- model per rank


def load_model_for_launch(cfg, launch_opts: Mapping, launch: Launch):
    """The model for this rank, or None to let `train()` load it as notebook 04 does (one process, or CPU).

    Several GPUs: each rank's model goes onto its own GPU (models.load_model defaults to GPU 0 for 4-bit).
    `quant_storage` (FSDP / ZeRO-3 with QLoRA): 4-bit weights stored in a float dtype the sharding can flatten,
    loaded without a device_map. Not exercised on a GPU in this repository's CI (no GPU there).
    """
    import torch

    from helpers import models, train

    storage = launch_opts.get("quant_storage")
    if not torch.cuda.is_available() or (launch.world_size == 1 and not storage):
        return None
    torch.cuda.set_device(launch.local_rank)
    _, dtype = train.device_and_dtype(cfg)
    if storage:  # sharded 4-bit weights: a float storage dtype and no device_map (the launcher places shards)
        return models.load_model(cfg.model, quantization=cfg.quantization, dtype=dtype, double_quant=cfg.double_quant,
                                 quant_storage=storage, device_map=None)
    return models.load_model(cfg.model, quantization=cfg.quantization, dtype=dtype, double_quant=cfg.double_quant,
                             device_map={"": launch.local_rank})


# ------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (`python -m helpers.launch --help`)."""
    ap = argparse.ArgumentParser(prog="python -m helpers.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe (configs/sft_*.yaml): TrainConfig fields")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override recipe fields, e.g. --set max_steps=20 output_dir=build/run1")
    ap.add_argument("--resume", default="auto",
                    help="'auto' (default: the last complete checkpoint, if any), 'never', or a checkpoint folder")
    ap.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig and exit")
    return ap


def resolve_resume(cfg, resume: str) -> str | None:
    """The checkpoint to resume from for --resume auto|never|PATH (a PATH must be a complete checkpoint)."""
    if resume == "never":
        return None
    if resume == "auto":
        ck = last_complete_checkpoint(cfg.output_dir)
        return str(ck) if ck else None
    if not checkpoint_complete(resume):
        raise FileNotFoundError(f"{resume} is not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)})")
    return resume


def main(argv: Sequence[str] | None = None) -> int:
    """Run one recipe: resolve config and resume point, train with notebook 04's `train()`, print a summary."""
    args = build_parser().parse_args(argv)
    check_launcher()
    cfg, launch_opts = load_recipe(args.config, args.set)
    launch = Launch.from_env()
    say = print if launch.main else (lambda *a, **k: None)
    if args.print_config:
        say(json.dumps({"train_config": cfg.to_dict(), "launch": launch_opts}, indent=1))
        return 0

    from helpers import train as train_mod

    cfg.resume_from_checkpoint = resolve_resume(cfg, args.resume)
    say(f"helpers.launch: {args.config} → {cfg.output_dir} | {launch.world_size} process(es) | "
        + (f"resuming from {cfg.resume_from_checkpoint}" if cfg.resume_from_checkpoint else "fresh start"), flush=True)
    stop = GracefulStop()
    try:  # from here on, whatever fails, the previous signal handlers come back (finally)
        stop.install()
        recorder = RankRecorder(launch, Path(cfg.output_dir) / "ranks")
        model = load_model_for_launch(cfg, launch_opts, launch)
        t0 = time.perf_counter()
        result = train_mod.train(cfg, model=model, callbacks=[stop, recorder], extra_metrics={"launch": {
            "world_size": launch.world_size, "resumed_from": cfg.resume_from_checkpoint,
            "config_file": str(args.config), "overrides": list(args.set), **launch_opts}})
    except TrainingInterrupted as err:
        say(f"helpers.launch: interrupted — {err}", flush=True)
        return 128 + err.signum
    finally:
        stop.restore()
    m = result.metrics
    say(f"helpers.launch: done in {time.perf_counter() - t0:.1f} s — {m['steps']} steps, loss {m['first_loss']:.4f} → "
        f"{m['final_loss']:.4f}, adapter {result.adapter_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
