"""Regenerate the course's SFT task data (seeded, deterministic): python data/sft/make_dataset.py [--check].

Writes data/sft/train.jsonl, data/sft/heldout.jsonl (chat records as JSON lines) and
data/seed_sft_example.json (the same task in the seed blog's {"text": ...} format, Phi-2's Instruct/Output style).
--check regenerates in memory and fails if the committed files differ (used by tests/test_data.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from helpers.data import format_prompt, make_task_records, split_record

HERE = Path(__file__).resolve().parent
SEED, N_TRAIN, N_HELDOUT, HELDOUT_FRACTION, N_SEED_EXAMPLE = 0, 1500, 200, 0.2, 24


def render() -> dict[Path, str]:
    """File path → exact file contents."""
    splits = make_task_records(SEED, N_TRAIN, N_HELDOUT, HELDOUT_FRACTION)
    jsonl = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in splits.items()}
    # the seed's format: one "text" field; another seed so it is not a copy of the training rows
    example = make_task_records(SEED + 1, N_SEED_EXAMPLE, 1, HELDOUT_FRACTION)["train"]
    text_rows = []
    for rec in example:
        prompt, answer = split_record(rec)
        text_rows.append({"text": format_prompt(prompt, None, style="instruct") + " " + answer})
    return {
        HERE / "train.jsonl": jsonl["train"],
        HERE / "heldout.jsonl": jsonl["heldout"],
        HERE.parent / "seed_sft_example.json": json.dumps(text_rows, indent=1, ensure_ascii=False) + "\n",
    }


def main(argv: list[str]) -> int:
    """Write the files, or with --check compare them with what is committed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh render")
    args = ap.parse_args(argv)
    files = render()
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        print("up to date" if not stale else f"differs from the generator: {stale}")
        return 1 if stale else 0
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
