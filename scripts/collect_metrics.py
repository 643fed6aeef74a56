"""Collect build/*/metrics.json into README.md's *Measured* table and docs/results.md (`make results`).

Every figure in that table comes from a metrics file that a notebook wrote in a `make run` (or from
build/run_summary.json and build/ci_times.json, written by the runner and .ci/run), so no number is copied by hand.
A notebook that has not run shows "not run". The README section between the markers is replaced; nothing else
in the README changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import env

BEGIN, END = "<!-- measured:begin (scripts/collect_metrics.py writes this table) -->", "<!-- measured:end -->"
# the common keys of every metrics.json (helpers.env.COMMON_METRICS) but the versions dict, which fits no table cell
COMMON = tuple(k for k in env.COMMON_METRICS if k != "versions")


def load(build: Path) -> dict[str, dict]:
    """{notebook stem: metrics} for every build/<stem>/metrics.json, plus '_run' and '_ci' when present."""
    out = {p.parent.name: json.loads(p.read_text()) for p in sorted(build.glob("[0-9][0-9]_*/metrics.json"))}
    for key, name in (("_run", "run_summary.json"), ("_ci", "ci_times.json")):
        if (build / name).exists():
            out[key] = json.loads((build / name).read_text())
    return out


def pct(x: float) -> str:
    """0.853 → '85 %'."""
    return f"{100 * x:.0f} %"


def ci(d: dict) -> str:
    """{'rate': r, 'ci': [lo, hi]} → '0.85 [0.72, 0.93]'."""
    return f"{d['rate']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}]"


def row_run(m: dict) -> str:
    run = m["_run"]
    parts = " · ".join(f"{r['notebook'][:2]} {r['seconds']:.0f} s" for r in run["notebooks"])
    threads = sorted({v["threads"] for k, v in m.items() if not k.startswith("_") and "threads" in v})
    return (f"{run['total_seconds'] / 60:.1f} min ({'all passed' if run['all_ok'] else 'FAILED'}): {parts}; "
            f"torch threads {threads}")


def row_ci(m: dict) -> str:
    c = m["_ci"]
    return (f"{c['total_seconds'] / 60:.1f} min on {c['cores']} cores: make test {c['make_test_seconds'] / 60:.1f} min "
            f"+ make run {c['make_run_seconds'] / 60:.1f} min")


def row_01(m: dict) -> str:
    x = m["01_slm_background"]
    return (f"Phi-2 skeleton {x['params']['phi-2']:,} parameters (published name: 2.7B); "
            f"Phi-1.5 {x['params']['phi-1.5']:,}")


def row_02(m: dict) -> str:
    x = m["02_load_4bit"]
    fmt = {r["format"]: r for r in x["formats"]}
    nf4 = {r["format"]: r for r in x["bytes"]}["nf4"]
    foot = " / ".join(f"{fmt[f]['footprint_mib']:.0f}" for f in ("full", "int8", "nf4", "nf4-dq") if f in fmt)
    names = "/".join(f for f in ("full", "int8", "nf4", "nf4-dq") if f in fmt)
    return (f"footprint {names} {foot} MiB; NF4 bytes = formula × {nf4['measured/formula']:.4f}; perplexity "
            f"{fmt['full']['perplexity']:.1f} → {fmt['nf4']['perplexity']:.1f} (nf4)")


def row_03(m: dict) -> str:
    x = m["03_lora_target_modules"]
    runs = sorted(x["runs"], key=lambda r: r["heldout_loss"])
    sets = " · ".join(f"{r['set']} {r['heldout_loss']:.3f}" for r in runs)
    return f"held-out loss after {x['max_steps']} steps (r={x['lora_r']}): {sets} (before: {x['heldout_loss_before']:.3f})"


def row_04(m: dict) -> str:
    x = m["04_sft_training"]
    b, a = x["task_before"], x["task_after"]
    return (f"{x['profile']} profile, {x['steps']} steps: loss {x['first_loss']:.2f} → {x['final_loss']:.3f}; "
            f"held-out exact match {pct(b['exact_match'])} → {pct(a['exact_match'])}, schema-valid "
            f"{pct(b['schema_valid'])} → {pct(a['schema_valid'])} (n={a['n']}); {x['seconds_per_step']:.1f} s/step; "
            + memory_text(x)
            + probe_text(x.get("cpu_step_seconds")))


def memory_text(x: dict) -> str:
    """'peak 2.41 GiB live, planner 2.35 GiB (1.03)' from notebook 04's memory check (older runs: RSS vs plan)."""
    check = x.get("memory_check")
    if check:
        return (f"peak memory {check['measured_gib']:.2f} GiB {check['kind']}, planner {check['predicted_gib']:.2f} GiB "
                f"(measured/predicted {check['ratio']:.2f})")
    return f"peak RSS {x['memory_measured_gib']:.2f} GiB (planner: {x['memory_predicted']['total']:.2f} GiB)"


def probe_text(probe: dict | None) -> str:
    """'; NF4 QLoRA step 12.3 s vs full precision 3.9 s (3.2x)' from notebook 04's CPU precision probe."""
    if not probe or "nf4" not in probe:
        return ""
    nf4, full = probe["nf4"], probe["full precision"]
    return f"; a 4-bit (NF4) step {nf4:.1f} s vs full precision {full:.1f} s on the CPU ({nf4 / full:.1f}x)"


def row_05(m: dict) -> str:
    x = m["05_benchmarking"]
    t, loss = x["task"], x["loss"]
    mc = " · ".join(f"{k} {v['base']['acc']:.2f} → {v['tuned']['acc']:.2f} (p = {v['paired']['mcnemar']['p_value']:.2f})"
                    for k, v in x["mc"].items())
    lm = max(c["max_abs_diff"] for c in x["lm_eval_check"].values())
    return (f"suite {x['suite']}, n = {t['n']} requests: exact match {ci(t['base']['exact match'])} → "
            f"{ci(t['tuned']['exact match'])}, schema-valid {t['base']['schema valid']['rate']:.2f} → "
            f"{t['tuned']['schema valid']['rate']:.2f}, McNemar p = {t['paired_exact_match']['p_value']:.1e}; "
            f"general-text perplexity {loss['base']['general_text']['perplexity']:.1f} → "
            f"{loss['tuned']['general_text']['perplexity']:.1f}; MC acc ({x['resolution']['mc_items']} items, "
            f"±{x['resolution']['mc_points']:.0f} points): {mc}; our MC log-probs vs lm-eval max Δ {lm:.1e}")


def row_05_threads(m: dict) -> str:
    rows = m["05_benchmarking"]["threads_check"]
    if len(rows) < 2:
        return "one core only: nothing to compare"
    prefill = " vs ".join(f"{r['prefill tokens/s']:.0f}" for r in rows.values())
    decode = " vs ".join(f"{r['decode tokens/s']:.1f}" for r in rows.values())
    nll = [r["held-out NLL"] for r in rows.values()]
    return (f"threads {' vs '.join(rows)}: prefill tokens/s {prefill}, decode tokens/s {decode}; "
            f"held-out NLL differs by {max(nll) - min(nll):.1e} (same greedy text)")


def row_06(m: dict) -> str:
    x = m["06_scaling_out"]
    two, kr = x["two_processes"], x["kill_resume"]
    return (f"2-process gloo vs 1 process: max Δ loss {two['max_loss_diff']:.1e}, max Δ adapter weight "
            f"{two['max_weight_diff']:.1e}; kill -9 then resume vs uninterrupted: Δ loss {kr['max_loss_diff']:.1e}, "
            f"Δ weight {kr['max_weight_diff']:.1e}")


def row_07(m: dict) -> str:
    x = m["07_preference_tuning"]
    t, d, g = x["task"], x["dpo"], x["general_text_perplexity"]
    return (f"{x['profile']} profile, {x['pairs']['n']} pairs ({x['pairs']['by_kind'].get('model', 0)} the SFT model's own "
            f"failures), {d['steps']} steps, β {x['beta']}, lr {d['config']['learning_rate']:g}: training pairs after DPO "
            f"margin {d['train_pairs_after']['mean_margin']:+.2f}, preference accuracy "
            f"{d['train_pairs_after']['preference_accuracy']:.2f}; held-out n = {t['n']}: exact match "
            f"{ci(t['before']['exact_match'])} → {ci(t['after']['exact_match'])}, McNemar p = "
            f"{t['paired_exact_match']['p_value']:.2g}; schema-valid {t['before']['schema_valid']['rate']:.2f} → "
            f"{t['after']['schema_valid']['rate']:.2f}; general-text perplexity {g['before']:.1f} → {g['after']:.1f}; "
            f"verdict: {x['verdict']}; {d['train_seconds'] / d['steps']:.1f} s/step")


def row_08(m: dict) -> str:
    x = m["08_export_gguf"]
    forms = " · ".join(f"{n} {r['size MB']:.0f} MB {r['decode tok/s']:.1f} tok/s EM {r['exact match']:.2f}"
                       for n, r in x["side_by_side"].items())
    b, sp = x["bar"], x["speed_protocol"]
    return (f"n = {x['task_items']}; every runtime timed alike ({x['speed_new_tokens']} new tokens after one warm-up, median "
            f"of {sp['repeats']}, {b['threads']} threads; size = in memory): {forms}; Q4_K_M decode ×{b['q4_k_m_decode_speedup']:.1f} fp32 "
            f"(bar ≥{b['decode_bar']}: {b['decode_bar_met']}), EM in fp32's CI: {b['q4_k_m_em_in_fp32_ci']}; template "
            f"{x['template']['same_tokens']}/{x['template']['prompts']} token-identical")


ROWS: list[tuple[str, Callable[[dict], str]]] = [
    ("`make run`, default profile, every notebook", row_run),
    ("`bash .ci/run` (make test + make run)", row_ci),
    ("01: Phi parameter counts from configs", row_01),
    ("02: the formats on SmolLM2", row_02),
    ("03: LoRA target sets", row_03),
    ("04: SFT (default CPU profile)", row_04),
    ("05: base vs fine-tuned", row_05),
    ("05: threads change speed, not results", row_05_threads),
    ("06: scaling out", row_06),
    ("07: DPO after SFT (default CPU profile)", row_07),
    ("08: fine-tune as GGUF (llama.cpp) vs transformers", row_08),
]


def table(m: dict) -> str:
    """The Measured table as markdown; a row whose notebook has not run says so."""
    lines = ["| what | figure |", "|---|---|"]
    for what, fn in ROWS:
        try:
            fig = fn(m)
        except (KeyError, TypeError, IndexError, ValueError):
            fig = "not run (no metrics file)"
        lines.append(f"| {what} | {fig} |")
    return "\n".join(lines)


def machine(m: dict) -> str:
    """One line: where the figures come from (cores, device, versions), from the metrics' common keys."""
    first = next((v for k, v in m.items() if not k.startswith("_")), None)
    if first is None:
        return "no metrics found: run `make run` first"
    v = first.get("versions", {})
    return (f"device {first['device']} ({first['dtype']}), torch {v.get('torch')}, transformers {v.get('transformers')}, "
            f"peft {v.get('peft')}, trl {v.get('trl')}, bitsandbytes {v.get('bitsandbytes')}")


def update_readme(readme: Path, m: dict) -> bool:
    """Replace the README's marked section; return True if it changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN!r} … {END!r} section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\nGenerated from `build/*/metrics.json` by `make results`; {machine(m)}.\n\n{table(m)}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
        return True
    return False


def results_page(m: dict) -> str:
    """docs/results.md: the same table plus each notebook's common keys."""
    lines = ["# Results of the last `make run`", "",
             "Generated by `scripts/collect_metrics.py` (`make results`) from `build/*/metrics.json`; do not edit by hand.",
             "", machine(m), "", table(m), "", "## Per notebook (common keys of every metrics.json)", "",
             "| " + " | ".join(COMMON) + " |", "|" + "---|" * len(COMMON)]
    for k, v in m.items():
        if not k.startswith("_"):
            lines.append("| " + " | ".join(str(v.get(c, "")) for c in COMMON) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """CLI: read the build folder, rewrite the README section and the results page."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--page", default="docs/results.md")
    args = ap.parse_args(argv)
    m = load(Path(args.build))
    changed = update_readme(Path(args.readme), m)
    Path(args.page).write_text(results_page(m))
    print(table(m))
    print(f"\n{args.readme}: {'updated' if changed else 'unchanged'}; wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
