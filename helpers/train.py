"""SFT training: one config dataclass → TRL's `SFTConfig` + `SFTTrainer` (current API), end to end.

- :class:`TrainConfig` (a recipe file's fields; old argument names refused via `helpers.compat`) →
  :func:`lora_config` / :func:`sft_config` → :func:`build_trainer`.
- :func:`train` in named steps: load inputs, score before, build, train (peak memory measured), :func:`save_adapter`,
  score after, :func:`training_metrics` (`metrics.json`, `env.json`, `train_config.json`); the gradient check after
  the first step (:class:`GradientCheckCallback`).
- Adapters afterwards: :func:`find_adapter`, :func:`load_trained`, :func:`model_card`, :func:`push_adapter`.

Memory planning is `helpers.memory`; generation and task scoring are `helpers.evals`; the command-line launcher
is `helpers.launch`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers import bench, compat, data, env, evals, lora, models, quant

ADAPTER_DIR = "adapter"
# notebook 04's profiles: one YAML recipe each, the same files `python -m helpers.launch --config` reads
PROFILE_FILES = {"smoke": "configs/sft_smoke_tinyphi.yaml", "cpu": "configs/sft_cpu_smollm2.yaml",
                 "gpu": "configs/sft_phi2_qlora_t4.yaml"}
CHECKPOINT_DIR = "checkpoints"


# ------------------------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything one LoRA/QLoRA SFT run needs; `train(cfg)` runs it without a notebook (issue 8's CLI)."""

    model: str = "smollm2-135m"             # registry name, hub id or folder (helpers.models)
    data_file: str | None = None            # default: data/sft/train.jsonl (any format helpers.data accepts)
    eval_file: str | None = None            # held-out prompt/completion records (eval loss, task accuracy)
    quantization: str | None = None         # None | "nf4" | "fp4" | "int8" (bitsandbytes; "nf4" = QLoRA)
    dtype: str | None = None                # None: by hardware (bf16 / fp16 on a T4 / fp32 on CPU)
    double_quant: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "all-linear"
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05              # < 1: a fraction of max_steps (what warmup_ratio used to be)
    max_length: int = 192
    packing: bool = False
    completion_only_loss: bool = True
    activation_checkpointing: bool = False
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    output_dir: str = "build/sft"
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = 2
    eval_steps: int = 0                     # 0: no evaluation loop during training
    eval_samples: int = 0                   # held-out records generated + scored before and after training
    eval_batch_size: int = 16               # prompts per generation batch when scoring them
    max_new_tokens: int = 64
    gradient_check: bool = True
    resume_from_checkpoint: str | bool | None = None
    report_to: str = "none"                 # "none" | "tensorboard" | "trackio" | "wandb" (installed separately)

    def __post_init__(self) -> None:
        quant.QuantSpec(self.quantization)  # validates the name
        if self.lora_r <= 0 or self.max_steps <= 0 or self.per_device_train_batch_size <= 0:
            raise ValueError("lora_r, max_steps and per_device_train_batch_size must be positive")
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        check_report_to(self.report_to)

    @classmethod
    def from_dict(cls, values: Mapping) -> TrainConfig:
        """Build from a dict (a YAML file); old argument names are translated, unknown names rejected with hints."""
        names = [f.name for f in dataclasses.fields(cls)]
        aliases = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
                   "lr": "learning_rate", "schedule": "lr_scheduler_type", "optim": "optimizer",
                   "target_modules": "lora_targets", "r": "lora_r"}
        out = {}
        for key, value in compat.translate_legacy_args(values).items():
            key = aliases.get(key, key)
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                raise ValueError(f"unknown TrainConfig field {key!r}" + (f"; did you mean {close}?" if close else f"; fields: {names}"))
            out[key] = value
        return cls(**out)

    def to_dict(self) -> dict:
        """The config as a plain JSON-able dict."""
        return asdict(self)


REPORTERS = {"none": None, "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}  # name → module


def check_report_to(name: str) -> None:
    """Raise a clear error for an unknown experiment tracker or one whose package is not installed."""
    import importlib.util

    if name not in REPORTERS:
        raise ValueError(f"report_to={name!r} is not supported here; use one of {list(REPORTERS)}")
    module = REPORTERS[name]
    if module and importlib.util.find_spec(module) is None:
        raise ValueError(f"report_to={name!r} needs the {module!r} package, which is not installed: "
                         f"`pip install {module}` (it is not part of the pinned stack), or use report_to='none'")


def profile_file(profile: str) -> Path:
    """The recipe file of a notebook-04 profile ("smoke" | "cpu" | "gpu") or a path to your own YAML recipe."""
    if profile in PROFILE_FILES:
        return env.REPO_ROOT / PROFILE_FILES[profile]
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        raise ValueError(f"PROFILE={profile!r} is neither a profile ({', '.join(PROFILE_FILES)}) nor an existing "
                         f".yaml recipe file: use one of the profiles or a path to a file like {PROFILE_FILES['cpu']}")
    return path


def device_and_dtype(cfg: TrainConfig) -> tuple[env.DeviceChoice, str]:
    """The device and the training dtype of a run: cfg.dtype if set (checked against the hardware), else the hardware's."""
    device = env.choose_device()
    return device, env.training_dtype(cfg.dtype, device)


def lora_config(cfg: TrainConfig, model=None):
    """The peft `LoraConfig`; with `model`, the targets are validated first (stale names raise with hints)."""
    from peft import LoraConfig

    targets = cfg.lora_targets
    if model is not None:
        lora.validate_targets(model, targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def precision_flags(device: str, dtype: str) -> dict[str, bool]:
    """TrainingArguments' precision switches for a device and dtype: bf16/fp16 mixed precision on CUDA only."""
    return {"bf16": device == "cuda" and dtype == "bfloat16", "fp16": device == "cuda" and dtype == "float16",
            "use_cpu": device == "cpu"}


def sft_config(cfg: TrainConfig, device: str = "cpu", dtype: str = "float32", evaluate: bool = False):
    """TRL `SFTConfig` with every choice made explicitly (no reliance on TRL's changing defaults)."""
    from trl import SFTConfig

    out = Path(cfg.output_dir)
    return SFTConfig(
        output_dir=str(out / CHECKPOINT_DIR),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        optim=cfg.optimizer,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # data: prompt/completion strings already in the model's format, EOS appended (helpers.data)
        max_length=cfg.max_length,
        packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss,
        # memory/precision, explicit: TRL 1.16 would otherwise turn checkpointing and bf16 on by itself
        activation_checkpointing=cfg.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.activation_checkpointing else None,
        **precision_flags(device, dtype),
        # logging / checkpoints / evaluation
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps or None,
        report_to=cfg.report_to,  # "none" by default: no tracker is contacted unless asked for
        include_num_input_tokens_seen="non_padding",  # kept in the checkpoint: token counts survive a resume
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; skip DDP's extra graph walk
        disable_tqdm=False,  # tqdm.auto progress bars (text in a terminal, a widget in Jupyter)
    )


# ------------------------------------------------------------------------------------------- callbacks


def callback_base() -> type:
    """transformers' `TrainerCallback`, imported on first use (importing this module stays light)."""
    from transformers import TrainerCallback

    return TrainerCallback


class GradientCheckCallback(callback_base()):
    """After the first backward pass (before the optimizer step): every LoRA tensor must have a non-zero gradient.

    Uses `helpers.lora.check_lora_gradients`, which raises with the likely cause (stale targets, a frozen path
    under checkpointing, the bitsandbytes CPU repack bug). At the very first step lora_A's gradient is exactly zero
    because lora_B starts at zero; those are reported as "zero_expected", not as failures.
    """

    def __init__(self) -> None:
        self.report: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.report is None:
            self.report = {"step": state.global_step + 1, **lora.check_lora_gradients(model)}
        return control


# ------------------------------------------------------------------------------------------- trainer


def _is_4bit_on_cpu(model) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) and next(model.parameters()).device.type == "cpu"


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds=None, callbacks: Sequence = ()):
    """A TRL `SFTTrainer` for `cfg`: records formatted for the model, LoRA targets validated, gradient check added.

    `train_ds`/`eval_ds` are `helpers.data.load_records` datasets (any accepted format). With a 4-bit model on
    CPU, an evaluation loop is refused: bitsandbytes' CPU repack bug would silently stop LoRA gradients.
    """
    from trl import SFTTrainer

    device = next(model.parameters()).device.type
    dtype = env.training_dtype(cfg.dtype, env.choose_device("cpu" if device == "cpu" else "auto"))
    evaluate = bool(eval_ds is not None and cfg.eval_steps)
    if evaluate and _is_4bit_on_cpu(model):
        raise ValueError(
            "eval_steps > 0 with a 4-bit model on CPU: bitsandbytes 0.50.2 repacks 4-bit weights during an eval-mode "
            "forward and LoRA then gets no gradient (docs/sources.md#bnb-cpu-repack in the course repository). Set eval_steps=0 (evaluate after training) or use "
            "quantization=None on CPU."
        )
    peft_config = lora_config(cfg, model)  # validates the targets first: stale names fail here, not silently
    if tokenizer.pad_token is None:  # Phi-2: no pad token; pad = eos is safe because labels are padded with -100
        tokenizer = copy.deepcopy(tokenizer)  # the trainer's copy gets one; the caller's tokenizer is left as it was
        tokenizer.pad_token = tokenizer.eos_token
    if data.record_format(train_ds.column_names) == "text" and cfg.completion_only_loss:
        warnings.warn("text records have no prompt/completion split: the loss covers every token", stacklevel=2)
    train_fmt = data.format_dataset(train_ds, tokenizer)
    if cfg.max_length and not cfg.packing:
        long = sum(n > cfg.max_length for n in data.token_lengths(train_fmt, tokenizer))
        if long:
            warnings.warn(f"{long} of {len(train_fmt)} training examples are longer than max_length={cfg.max_length}: "
                          "their end, EOS included, is cut off (see helpers.data.suggest_max_length)", stacklevel=2)
    eval_fmt = data.format_dataset(eval_ds, tokenizer) if evaluate else None
    model.config.use_cache = False  # no KV cache while training (re-enabled for generation by train())
    grad_check = [GradientCheckCallback()] if cfg.gradient_check else []
    with _quiet_peft():
        trainer = SFTTrainer(
            model=model,
            args=sft_config(cfg, device, dtype, evaluate),
            train_dataset=train_fmt,
            eval_dataset=eval_fmt,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[*grad_check, *callbacks],
        )
    return trainer


@contextlib.contextmanager
def _quiet_peft():
    """Silence one upstream warning nobody can act on: peft 0.21 reads transformers' deprecated alias
    `is_gradient_checkpointing` while wrapping a model (a FutureWarning from transformers 5.24)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def gradient_report(trainer) -> dict | None:
    """The gradient check's report from a trainer built by `build_trainer` (None if it has not run)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, GradientCheckCallback):
            return cb.report
    return None


# ------------------------------------------------------------------------------------------- train()


@dataclass
class TrainResult:
    """What `train` returns: the trainer and model, the metrics written to disk, where the adapter is."""

    trainer: object
    model: object
    tokenizer: object
    metrics: dict
    adapter_dir: Path
    before: dict | None = None
    after: dict | None = None


def loss_history(trainer) -> dict[str, list]:
    """Training loss per logged step from the trainer's log (plus eval loss where evaluated)."""
    logs = trainer.state.log_history
    return {
        "step": [h["step"] for h in logs if "loss" in h],
        "loss": [h["loss"] for h in logs if "loss" in h],
        "eval_step": [h["step"] for h in logs if "eval_loss" in h],
        "eval_loss": [h["eval_loss"] for h in logs if "eval_loss" in h],
    }


def _default_file(name: str) -> str:
    return str(env.DATA_DIR / "sft" / name)


def _load_inputs(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, dtype: str):
    """The model, tokenizer and datasets of a run: those given, else loaded as `cfg` says."""
    if tokenizer is None:
        tokenizer = models.load_tokenizer(cfg.model)
    if model is None:
        model = models.load_model(cfg.model, quantization=cfg.quantization, dtype=dtype, double_quant=cfg.double_quant)
    if train_ds is None:
        train_ds = data.load_records(cfg.data_file or _default_file("train.jsonl"))
    if eval_ds is None and (cfg.eval_file or cfg.eval_samples or cfg.eval_steps):
        eval_ds = data.load_records(cfg.eval_file or _default_file("heldout.jsonl"))
    return model, tokenizer, train_ds, eval_ds


def heldout_records(cfg: TrainConfig, eval_ds) -> list | None:
    """The first `cfg.eval_samples` held-out records to generate and score (None when there are none)."""
    if eval_ds is None or not cfg.eval_samples:
        return None
    heldout = eval_ds.select(range(min(cfg.eval_samples, len(eval_ds))))
    if data.record_format(heldout.column_names) == "text":
        raise ValueError("eval_samples needs held-out records with an answer (prompt/completion or chat), not text")
    return list(heldout)


def set_aside(out: str | Path, names: Sequence[str], say=print) -> Path | None:
    """Move an earlier run's `names` (e.g. adapter/, checkpoints/) under out/previous/<time>/; never delete them.

    Returns the folder they went to (None when there was nothing to move) and says where.
    """
    out = Path(out)
    found = [n for n in names if (out / n).exists()]
    if not found:
        return None
    dest = out / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for name in found:
        shutil.move(str(out / name), str(dest / name))
    say(f"kept the earlier run's {', '.join(found)} in {dest}")
    return dest


def save_adapter(trainer, tokenizer, cfg: TrainConfig, out: Path) -> Path:
    """Write adapter (safetensors + adapter_config.json), tokenizer and train_config.json (the base model's name)."""
    adapter_dir = out / ADAPTER_DIR
    set_aside(out, [ADAPTER_DIR])  # a previous run's files (another model's chat template) must not mix in
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    env.write_json(adapter_dir / "train_config.json", cfg.to_dict())
    return adapter_dir


def training_metrics(trainer, cfg: TrainConfig, seconds: float, memory, device: str, dtype: str) -> dict:
    """What a finished run measured: loss history, time, tokens/s, peak memory, gradient check, LoRA summary."""
    hist = loss_history(trainer)
    logs = trainer.state.log_history
    tokens = trainer.state.num_input_tokens_seen or max((h.get("num_tokens", 0) for h in logs), default=0)
    session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)  # this run only (after a resume)
    evals = [h for h in logs if "eval_loss" in h]
    return {
        "config": cfg.to_dict(),
        "model": cfg.model,
        "device": device,
        "dtype": dtype,
        "steps": trainer.state.global_step,
        "loss_history": hist,
        "first_loss": hist["loss"][0] if hist["loss"] else None,
        "final_loss": hist["loss"][-1] if hist["loss"] else None,
        "train_seconds": round(seconds, 2),
        "train_tokens": tokens,
        "tokens_per_second": round(session_tokens / seconds, 1) if session_tokens and seconds else None,
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 3),
        "peak_memory": {**memory.as_dict(), "model_bytes": bench.model_footprint(trainer.model)},
        "gradient_check": gradient_report(trainer),
        "lora": lora.lora_summary(trainer.model),
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
    }


def train(cfg: TrainConfig, model=None, tokenizer=None, train_ds=None, eval_ds=None,
          callbacks: Sequence = (), extra_metrics: Mapping | None = None) -> TrainResult:
    """Load (unless given), evaluate before, train, save the adapter, evaluate after; write metrics/env JSON.

    Writes to cfg.output_dir: adapter/ (safetensors + train_config.json), checkpoints/, metrics.json, env.json.
    Resume an interrupted run with `cfg.resume_from_checkpoint=True` (the latest checkpoint) or a path.
    """
    env.set_seed(cfg.seed)
    device, dtype = device_and_dtype(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, train_ds, eval_ds = _load_inputs(cfg, model, tokenizer, train_ds, eval_ds, dtype)
    heldout = heldout_records(cfg, eval_ds)
    before = evals.evaluate_task(model, tokenizer, heldout, cfg.max_new_tokens, cfg.eval_batch_size) if heldout else None

    resume = cfg.resume_from_checkpoint
    if resume is True and not any((out / CHECKPOINT_DIR).glob("checkpoint-*")):
        resume = None  # nothing to resume from yet: start fresh
    if not resume:  # inputs are loaded and validated: only now make room, keeping an earlier run's files
        set_aside(out, [ADAPTER_DIR, CHECKPOINT_DIR])
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, callbacks)
    with bench.PeakMemory(device.device, measure="live") as mem:
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - t0
    main_process = trainer.args.should_save  # several ranks: only the main one writes files
    adapter_dir = save_adapter(trainer, trainer.processing_class, cfg, out) if main_process else out / ADAPTER_DIR

    model = trainer.model
    model.config.use_cache = True
    after = evals.evaluate_task(model, tokenizer, heldout, cfg.max_new_tokens, cfg.eval_batch_size) if heldout else None
    metrics = {**training_metrics(trainer, cfg, seconds, mem, device.device, dtype),
               "task_before": before["scores"] if before else None,
               "task_after": after["scores"] if after else None,
               "adapter_dir": str(adapter_dir), **dict(extra_metrics or {})}
    if main_process:
        env.write_json(out / "metrics.json", metrics)
        env.write_json(out / "env.json", env.env_report(device))
    return TrainResult(trainer, model, tokenizer, metrics, adapter_dir, before, after)


def load_trained(adapter_dir: str | Path, quantization: str | None = None, dtype: str | None = None,
                 model: str | None = None):
    """(model with the adapter attached, tokenizer) from `adapter_dir`; the base model is read from train_config.json."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "train_config.json"
    name = model or (json.loads(cfg_path.read_text())["model"] if cfg_path.exists() else None)
    if name is None:
        raise FileNotFoundError(f"{cfg_path} is missing: pass model= (the base model the adapter was trained on)")
    base = models.load_model(name, quantization=quantization, dtype=dtype)
    tok = models.load_tokenizer(str(adapter_dir))
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(adapter_dir)), tok


def find_adapter(adapter: str = "auto", smoke: bool = False) -> Path:
    """A LoRA adapter folder: "auto" (notebook 04's output; its smoke run's when `smoke`), a local folder, or a hub
    id (downloaded; needs the hub).

    Raises FileNotFoundError saying what to do when there is none.
    """
    path = env.build_dir("04_sft_training", smoke=smoke) / ADAPTER_DIR if adapter == "auto" else Path(adapter)
    if (path / "adapter_config.json").exists():
        return path
    if adapter != "auto" and models.is_hub_id(adapter) and not path.exists():
        if not env.hub_reachable():
            raise FileNotFoundError(f"ADAPTER_DIR={adapter!r} looks like a hub id, but the model hub is unreachable "
                                    "(offline or HF_HUB_OFFLINE=1): download it where you have internet, or pass a folder")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(adapter, token=env.hf_token()))
    raise FileNotFoundError(
        f"No LoRA adapter at {path} (no adapter_config.json). Run notebook 04 (04_sft_training.ipynb) first in this "
        "environment — on Colab, in the same runtime — it trains the adapter and saves it there "
        "(`make nb NB=04 PARAMS='-p SMOKE True'` takes a minute). Or set ADAPTER_DIR to an adapter folder or to a hub id "
        "such as 'your-name/phi-2-smart-home-lora' (papermill: -p ADAPTER_DIR ...).")


def model_card(base_model: str, recipe: Mapping, scores: Mapping | None = None, dataset: str = "slm-course smart-home task") -> str:
    """A model card (README.md) for a LoRA adapter: base model, how it was trained, what it scored, how to load it."""
    lines = ["---", "library_name: peft", f"base_model: {base_model}", "tags: [lora, sft, trl, slm-course]", "---", "",
             f"# LoRA adapter for {base_model}", "",
             f"Trained with TRL's `SFTTrainer` on the {dataset} (free-text request → one JSON record), following",
             "[slm-course](https://github.com/slm-course/slm-course) notebook 04.", "", "## Training", ""]
    keys = ("quantization", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "optimizer")
    lines += [f"- {k}: {recipe.get(k)}" for k in keys if k in recipe]
    if scores:
        lines += ["", "## Held-out results", ""] + [f"- {k}: {v}" for k, v in scores.items()]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
              "", f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
              'model = PeftModel.from_pretrained(base, "<this repository>")', "```", ""]
    return "\n".join(lines)


def push_adapter(adapter_dir: str | Path, repo_id: str, card: str) -> str:
    """Push an adapter folder (with `card` as README.md) to the Hub; returns what happened, or why it was skipped."""
    if not repo_id:
        return "skipped: PUSH_TO_HUB is empty (set it to 'your-name/repo' to publish the adapter)"
    token = env.hf_token()
    if token is None:
        return "skipped: no Hugging Face token (set HF_TOKEN, `hf auth login`, or Colab Secrets → HF_TOKEN)"
    if not env.hub_reachable():
        return "skipped: the model hub is unreachable (offline, or HF_HUB_OFFLINE=1)"
    from huggingface_hub import create_repo, upload_folder

    (Path(adapter_dir) / "README.md").write_text(card, encoding="utf-8")
    url = create_repo(repo_id, token=token, exist_ok=True, private=True)
    upload_folder(repo_id=repo_id, folder_path=str(adapter_dir), token=token,
                  ignore_patterns=["training_args.bin", "train_config.json"])
    return f"pushed to {url} (private; make it public on the Hub when you are ready)"


__all__ = [
    "TrainConfig", "build_trainer", "train", "GradientCheckCallback", "load_trained", "loss_history", "lora_config",
    "sft_config", "TrainResult", "find_adapter", "model_card", "push_adapter", "save_adapter", "training_metrics",
]
