"""Collect build/*/metrics.json into README.md's *Measured* table and docs/results.md (`make results`).

Every figure in that table comes from a metrics file that a notebook wrote in a `make run` (or from
build/run_summary.json and build/ci_times.json, written by the runner and .ci/run), so no number is copied by hand.
A notebook that has not run shows "not run". The README section between the markers is replaced; nothing else
in the README changes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

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
    t, d, g, p = x["task"], x["dpo"], x["general_text_perplexity"], x["pairs"]
    text = (f"{x['profile']} profile, {p['n']} on-policy pairs from {p['prompts']} training prompts ({p['right_samples']} of "
            f"{p['samples']} samples right; {p['near_identical_dropped']} near-identical pairs dropped), {d['steps']} steps, "
            f"β {x['beta']}, lr {d['config']['learning_rate']:g}, loss sigmoid + sft; held-out n = {t['n']}: exact match "
            f"{ci(t['before']['exact_match'])} → {ci(t['after']['exact_match'])}, McNemar p = "
            f"{t['paired_exact_match']['p_value']:.2g}; schema-valid {t['before']['schema_valid']['rate']:.2f} → "
            f"{t['after']['schema_valid']['rate']:.2f}; general-text perplexity {g['before']:.1f} → {g['after']:.1f}; "
            f"verdict: {x['verdict']}; gate keeps the {'DPO' if x['gate']['kept'] == 'tuned' else 'SFT'} adapter; "
            f"{d['train_seconds'] / d['steps']:.1f} s/step")
    c = x.get("contrast")
    if c:
        text += (f"; contrast, the first version's settings (lr {c['learning_rate']:g}, off-policy, sigmoid only, "
                 f"{c['steps']} steps): exact match {c['exact_match']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}], McNemar p = "
                 f"{c['mcnemar_vs_sft']['p_value']:.2g}, chosen reward {c['late_chosen_reward']:+.3f} "
                 f"(this recipe {x['late_chosen_reward']:+.3f})")
    return text


def row_08(m: dict) -> str:
    x = m["08_grpo"]
    c, g, st = x["comparison"], x["grpo"], x["settings"]
    methods = " · ".join(f"{name} {ci(r['exact_match'])} (schema-valid {r['schema_valid']['rate']:.2f}, perplexity "
                         f"{r['general_text_perplexity']:.1f}, "
                         + ("training time unknown)" if r["train_seconds"] is None else f"{r['train_seconds']:.0f} s)")
                         for name, r in c["methods"].items() if r)
    pairs = "; ".join(f"{p['a']} vs {p['b']}: p = {p['p_value']:.2g} ({p['verdict']})" for p in c["pairwise_exact_match"])
    return (f"{x['profile']} profile, GRPO {g['steps']} steps ({st['num_generations']} answers per prompt, β {st['beta']}, "
            f"lr {st['learning_rate']:g}, reward = parses + schema + fields + only JSON); held-out exact match on the same "
            f"{c['methods']['SFT']['exact_match']['n']} requests: {methods}; McNemar {pairs}; GRPO verdict: {x['verdict']}")


def row_09(m: dict) -> str:
    x = m["09_export_gguf"]
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
    ("08: SFT vs SFT + DPO vs SFT + GRPO, same held-out items", row_08),
    ("09: fine-tune as GGUF (llama.cpp) vs transformers", row_09),
]


def table(m: dict, skip_missing: bool = False) -> str:
    """The Measured table as markdown; a row whose notebook has not run says so (or, `skip_missing`, is left out)."""
    lines = ["| what | figure |", "|---|---|"]
    for what, fn in ROWS:
        try:
            fig = fn(m)
        except (KeyError, TypeError, IndexError, ValueError):
            if skip_missing:
                continue
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


# ---- reference results: docs/results.json (committed) and the block at the top of every numbered notebook ----
RESULTS_MARK = "<!-- results:begin"
RESULTS_BEGIN = f"{RESULTS_MARK} (make results writes this cell from docs/results.json) -->"
RESULTS_END = "<!-- results:end -->"
RESULTS_CELL_ID = "reference-results"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
Headline = Callable[[dict], list[tuple[str, str]]]


def headline_setup(x: dict) -> list[tuple[str, str]]:
    """00: the model chosen offline and whether its cache is intact."""
    return [("model chosen offline", f"`{x['model']}` on {x['device']} ({x['dtype']})"),
            ("offline model cache intact", "yes" if x["offline_models_ok"] else "NO")]


def headline_background(x: dict) -> list[tuple[str, str]]:
    """01: Phi-2 and Phi-1.5 parameter counts from their configs."""
    p = x["params"]
    return [("Phi-2 parameters, counted from its config", f"{p['phi-2']:,} (published as 2.7B)"),
            ("Phi-1.5 parameters", f"{p['phi-1.5']:,}")]


def headline_load_4bit(x: dict) -> list[tuple[str, str]]:
    """02: weight memory fp32 → NF4 (+ double quant) and what it costs in perplexity."""
    fmt = {r["format"]: r for r in x["formats"]}
    small = fmt.get("nf4-dq", fmt["nf4"])
    return [(f"weights in memory, fp32 → {small['format']}",
             f"{fmt['full']['footprint_mib']:.0f} MiB → {small['footprint_mib']:.0f} MiB"),
            ("perplexity, fp32 → nf4", f"{fmt['full']['perplexity']:.1f} → {fmt['nf4']['perplexity']:.1f}")]


def headline_lora_targets(x: dict) -> list[tuple[str, str]]:
    """03: the best and the worst LoRA target set by held-out loss."""
    runs = sorted(x["runs"], key=lambda r: r["heldout_loss"])
    best, worst = runs[0], runs[-1]
    return [(f"held-out loss after {x['max_steps']} steps, best target set",
             f"{best['set']} {best['heldout_loss']:.3f} (before training: {x['heldout_loss_before']:.3f})"),
            ("worst target set", f"{worst['set']} {worst['heldout_loss']:.3f}")]


def headline_sft(x: dict) -> list[tuple[str, str]]:
    """04: held-out exact match and schema validity before → after SFT, the loss curve's ends."""
    b, a = x["task_before"], x["task_after"]
    return [("held-out exact match", f"{pct(b['exact_match'])} → {pct(a['exact_match'])} (n = {a['n']})"),
            ("schema-valid answers", f"{pct(b['schema_valid'])} → {pct(a['schema_valid'])}"),
            ("training loss", f"{x['first_loss']:.2f} → {x['final_loss']:.3f} in {x['steps']} steps "
                              f"({x['seconds_per_step']:.1f} s/step)")]


def headline_benchmarking(x: dict) -> list[tuple[str, str]]:
    """05: base vs fine-tuned exact match with intervals, and the forgetting check."""
    t, loss = x["task"], x["loss"]
    return [("task exact match, base → fine-tuned", f"{ci(t['base']['exact match'])} → {ci(t['tuned']['exact match'])} "
                                                    f"(n = {t['n']}, McNemar p = {t['paired_exact_match']['p_value']:.1e})"),
            ("general-text perplexity (forgetting)", f"{loss['base']['general_text']['perplexity']:.1f} → "
                                                     f"{loss['tuned']['general_text']['perplexity']:.1f}")]


def headline_scaling(x: dict) -> list[tuple[str, str]]:
    """06: two processes and a kill-and-resume reproduce the single uninterrupted run."""
    two, kr = x["two_processes"], x["kill_resume"]
    return [("2 processes vs 1: max Δ loss", f"{two['max_loss_diff']:.1e}"),
            ("kill -9 then resume vs uninterrupted: max Δ loss", f"{kr['max_loss_diff']:.1e}")]


def headline_dpo(x: dict) -> list[tuple[str, str]]:
    """07: exact match SFT → DPO, perplexity, the computed verdict and the gate's decision."""
    t, g = x["task"], x["general_text_perplexity"]
    return [("held-out exact match, SFT → DPO", f"{ci(t['before']['exact_match'])} → {ci(t['after']['exact_match'])} "
                                                f"(n = {t['n']}, McNemar p = {t['paired_exact_match']['p_value']:.2g})"),
            ("general-text perplexity", f"{g['before']:.1f} → {g['after']:.1f}"),
            ("verdict, acceptance gate", f"{x['verdict']}; the gate keeps the "
                                         f"{'DPO' if x['gate']['kept'] == 'tuned' else 'SFT'} adapter")]


def headline_grpo(x: dict) -> list[tuple[str, str]]:
    """08: exact match of SFT, SFT + DPO and SFT + GRPO on the same items, and the computed verdict."""
    ms = x["comparison"]["methods"]
    return [("held-out exact match, SFT · +DPO · +GRPO", " · ".join(ci(r["exact_match"]) if r else "not run"
                                                                    for r in ms.values()) + f" (n = {ms['SFT']['exact_match']['n']})"),
            ("GRPO verdict", str(x["verdict"]))]


def headline_gguf(x: dict) -> list[tuple[str, str]]:
    """The GGUF export: Q4_K_M vs transformers fp32 (size, decode speed, exact match)."""
    rows = x["side_by_side"]
    q4 = next(r for n, r in rows.items() if "Q4_K_M" in n)
    fp32 = next(r for n, r in rows.items() if "transformers" in n and "fp32" in n)
    form = lambda r: f"{r['size MB']:.0f} MB, {r['decode tok/s']:.1f} tok/s decode, exact match {r['exact match']:.2f}"  # noqa: E731
    return [("GGUF Q4_K_M (llama.cpp)", form(q4)), ("transformers fp32", form(fp32)),
            ("Q4_K_M decode speed-up over fp32", f"×{x['bar']['q4_k_m_decode_speedup']:.1f}")]


# by topic, the stem without its number, so renumbering a notebook keeps its headline
HEADLINES: dict[str, Headline] = {
    "setup": headline_setup, "slm_background": headline_background, "load_4bit": headline_load_4bit,
    "lora_target_modules": headline_lora_targets, "sft_training": headline_sft, "benchmarking": headline_benchmarking,
    "scaling_out": headline_scaling, "preference_tuning": headline_dpo, "grpo": headline_grpo,
    "export_gguf": headline_gguf,
}


def headline(stem: str, x: dict) -> dict[str, str]:
    """A notebook's 2–3 headline figures from its metrics (HEADLINES, by topic), then its run time."""
    try:
        figures = HEADLINES[stem[3:]](x) if stem[3:] in HEADLINES else []
    except (KeyError, TypeError, IndexError, ValueError, StopIteration):
        figures = []
    return {**dict(figures), "run time": f"{x['seconds']:.0f} s ({x['threads']} torch threads)"}


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU that ran (and collects) the figures: 'AMD EPYC, AVX-512 BF16, 2 cores' (no AVX-512 BF16: said too)."""
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or platform.machine() or "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    bf16 = ("AVX-512 BF16" if "avx512_bf16" in flags else "no AVX-512 BF16") if flags else ""
    return ", ".join(p for p in (name, bf16, f"{env.cpu_cores()} cores") if p)


def git_commit(root: Path) -> str:
    """The short commit of `root` (HEAD), or 'unknown' outside a git checkout."""
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def snapshot(m: dict, build: Path, commit: str, machine: str) -> dict:
    """docs/results.json: per notebook its headline figures; the commit, machine and date (of the newest metrics)."""
    files = sorted(build.glob("[0-9][0-9]_*/metrics.json"))
    newest = max((p.stat().st_mtime for p in files), default=0.0)
    date = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).strftime("%Y-%m-%d") if files else "never"
    notebooks = {k: {"model": v["model"], "device": v["device"], "dtype": v["dtype"], "headline": headline(k, v)}
                 for k, v in m.items() if not k.startswith("_")}
    return {"generated_by": "scripts/collect_metrics.py (make results) from build/*/metrics.json of a `make run`",
            "commit": commit, "machine": machine, "date": date, "notebooks": notebooks}


def render_block(snap: dict, stem: str) -> str:
    """The markdown cell of reference results for notebook `stem`, exactly as the notebook gate expects it."""
    x = snap["notebooks"].get(stem)
    if x is None:
        body = (f"**Reference results:** none yet: this notebook was not in the `make run` that `docs/results.json` "
                f"records (commit `{snap['commit']}`, {snap['date']}). `make run` then `make results` fills this cell.")
    else:
        where = "a CPU" if x["device"] == "cpu" else x["device"]
        figures = "\n".join(f"- {what}: **{value}**" for what, value in x["headline"].items())
        body = (f"**Reference results** of the default profile (`make run` on {where}: {snap['machine']}; commit "
                f"`{snap['commit']}`, {snap['date']}; model `{x['model']}`, {x['dtype']}):\n\n{figures}\n\n"
                f"Speeds depend on the CPU; the quality figures should come out the same on yours "
                f"(`build/{stem}/metrics.json` after `make nb NB={stem[:2]}`).")
    return f"{RESULTS_BEGIN}\n{body}\n{RESULTS_END}"


def is_results_cell(cell: dict) -> bool:
    """Is this the reference-results cell (a markdown cell opening with the begin marker)?"""
    return cell.get("cell_type") == "markdown" and "".join(cell.get("source", "")).startswith(RESULTS_MARK)


def put_results_block(path: Path, snap: dict) -> bool:
    """Make the notebook's 2nd cell (after the title) its reference-results block; return True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    source = render_block(snap, path.stem)
    keep = [c for c in nb.cells if not is_results_cell(c)]
    old = [c for c in nb.cells if is_results_cell(c)]
    cell = old[0] if old else nbformat.v4.new_markdown_cell(id=RESULTS_CELL_ID)
    cell.source = source
    nb.cells = keep[:1] + [cell] + keep[1:]
    text = nbformat.writes(nb)
    if text == before:
        return False
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return True


def write_reference_results(m: dict, build: Path, snapshot_path: Path, notebooks: Path | None) -> list[Path]:
    """Write docs/results.json from `m`, then each numbered notebook's block from it; return the notebooks changed."""
    snap = snapshot(m, build, git_commit(Path(__file__).resolve().parent.parent), cpu_kind())
    env.write_json(snapshot_path, snap)
    paths = sorted(notebooks.glob(NOTEBOOK_GLOB)) if notebooks else []
    return [p for p in paths if put_results_block(p, snap)]


def main(argv: list[str]) -> int:
    """CLI: read the build folder, rewrite the README section and the results page."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--page", default="docs/results.md")
    ap.add_argument("--snapshot", help="also write this reference-results snapshot (make results: docs/results.json)")
    ap.add_argument("--notebooks", help="and put its block in the numbered notebooks of this folder (2nd cell)")
    args = ap.parse_args(argv)
    m = load(Path(args.build))
    changed = update_readme(Path(args.readme), m)
    Path(args.page).write_text(results_page(m))
    print(table(m))
    print(f"\n{args.readme}: {'updated' if changed else 'unchanged'}; wrote {args.page}")
    if args.snapshot:
        nbs = write_reference_results(m, Path(args.build), Path(args.snapshot), Path(args.notebooks) if args.notebooks else None)
        print(f"wrote {args.snapshot}; reference-results block updated in {len(nbs)} notebooks"
              + (": " + ", ".join(p.name for p in nbs) if nbs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
