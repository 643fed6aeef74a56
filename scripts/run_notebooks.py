"""Execute the course notebooks headless with papermill (`make run`, `make nb`, and the smoke tests).

Each notebook runs in the course's kernel and writes its executed copy to <out>/<stem>/<stem>.ipynb, next to
the figures and metrics.json it saves there (SLM_COURSE_BUILD=<out>, so OUTPUT_DIR="auto" resolves there).
Extra arguments are papermill's: -p NAME VALUE, -y YAML, e.g.  -p MAX_STEPS 200  or  -y "SMOKE: true".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "slm-course"


@dataclass
class Result:
    """What happened to one notebook."""

    notebook: str
    status: str  # "ok", "failed", "timeout"
    seconds: float
    output: Path
    detail: str = ""


def kernel_name() -> str:
    """The course kernel if it is installed (make install does it), else the default python3."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


def notebooks(only: str = "") -> list[Path]:
    """Course notebooks in order, optionally only those whose name starts with `only` ('04', or '00,01,04')."""
    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    prefixes = tuple(x.strip() for x in only.split(",")) if only else ("",)
    return [p for p in paths if p.name.startswith(prefixes)]


PARAM_FLAGS = ("-p", "--parameters", "-y", "--parameters_yaml", "-r", "--parameters_raw", "-f", "--parameters_file",
               "-b", "--parameters_base64")
CELL_RE = re.compile(r"Executing Cell (\d+)-")
HEARTBEAT_S = 60.0


def cell_labels(path: Path, parameterized: bool) -> list[str]:
    """One label per cell as papermill numbers them (its injected-parameters cell included): the first code line."""
    nb = json.loads(path.read_text())
    labels = []
    for cell in nb["cells"]:
        lines = [ln.strip() for ln in "".join(cell["source"]).splitlines()]
        code = [ln for ln in lines if ln and not ln.startswith("#")]
        labels.append("" if cell["cell_type"] != "code" else (code[0] if code else "(comments only)")[:90])
        if parameterized and "parameters" in cell.get("metadata", {}).get("tags", []):
            labels.append("(papermill's injected parameters)")
    return labels


def clock(seconds: float) -> str:
    """1m23s-style elapsed time."""
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def is_smoke(extra: list[str]) -> bool:
    """Do papermill's arguments set SMOKE to true (-p SMOKE True, or -y "SMOKE: true")?"""
    pairs = zip(extra, extra[1:], extra[2:], strict=False)
    by_p = any(a in ("-p", "--parameters") and b == "SMOKE" and c.lower() in ("true", "1") for a, b, c in pairs)
    by_y = any(a in ("-y", "--parameters_yaml") and re.search(r"SMOKE:\s*(true|True|1)\b", b)
               for a, b in zip(extra, extra[1:], strict=False))
    return by_p or by_y


def run_notebook(path: Path, out: Path, extra: list[str] = (), timeout: float | None = None,
                 env_extra: dict[str, str] | None = None, progress: Callable[[str], None] | None = None,
                 cell_timeout: int | None = None, cpus: set[int] | None = None) -> Result:
    """Run one notebook with papermill in a subprocess (killed after `timeout` s); return its Result.

    `cell_timeout`: papermill's own --execution-timeout, seconds any one cell may run (a stalled download stops
    there, with the notebook saved up to that cell). `cpus`: the cores it may use (its kernel counts them as the
    machine's: one thread per core). With `progress`, each code cell is announced as it starts
    ("[04_sft_training +1m05s] cell 12/40 · trainer.train()"), from papermill's own cell log.
    """
    stem = path.stem
    if is_smoke(extra) and out.name != "smoke":  # a smoke run and its executed copy never land on a full run's
        out = out / "smoke"
    target = out / stem / f"{stem}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLM_COURSE_BUILD": str(out.resolve()), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "papermill", str(path), str(target), "-k", kernel_name(),
           "--cwd", str(path.parent), "--no-progress-bar", "--log-output", "--log-level", "INFO",
           # progress comes from the cell log; saving the whole notebook after every cell cost ~0.1 s a cell
           # (long cells are still saved every 30 s by papermill's autosave)
           "--no-request-save-on-cell-execute", *(["--execution-timeout", str(cell_timeout)] if cell_timeout else []),
           *extra]
    labels = cell_labels(path, any(a in PARAM_FLAGS for a in extra))
    tail: deque[str] = deque(maxlen=300)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    if cpus:  # set before papermill starts the kernel (its startup takes longer): the kernel inherits it
        os.sched_setaffinity(proc.pid, cpus)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL)) if timeout else None
    if timer:
        timer.start()
    current = {"cell": 0, "since": t0, "said": t0}
    done = threading.Event()

    def heartbeat() -> None:  # a long cell (training, scoring) is announced again every HEARTBEAT_S seconds
        while not done.wait(5.0):
            now = time.perf_counter()
            if progress and current["cell"] and now - current["said"] >= HEARTBEAT_S:
                current["said"] = now
                progress(f"  [{stem} +{clock(now - t0)}] still in cell {current['cell']}/{len(labels)} "
                         f"(for {clock(now - current['since'])})")

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            m = CELL_RE.search(line)
            if m:
                i = int(m.group(1)) - 1
                label = labels[i] if i < len(labels) else ""
                if label:
                    current.update(cell=i + 1, since=time.perf_counter(), said=time.perf_counter())
                    if progress:
                        progress(f"  [{stem} +{clock(time.perf_counter() - t0)}] cell {i + 1}/{len(labels)} · {label}")
        rc = proc.wait()
    finally:
        done.set()
        if timer:
            timer.cancel()
    seconds = time.perf_counter() - t0
    where = f"cell {current['cell']}/{len(labels)} · {labels[current['cell'] - 1]}" if current["cell"] else "startup"
    if timeout and seconds >= timeout and rc != 0:
        return Result(path.name, "timeout", seconds, target,
                      f"killed after {timeout:.0f} s, in {where}\n" + "\n".join(list(tail)[-40:]))
    if cell_timeout and rc != 0 and any("CellTimeoutError" in line for line in tail):
        return Result(path.name, "timeout", seconds, target,
                      f"{where} ran past {cell_timeout} s, the limit for one cell\n" + "\n".join(list(tail)[-20:]))
    status = "ok" if rc == 0 else "failed"
    detail = "" if status == "ok" else "\n".join(list(tail)[-80:])[-6000:]
    return Result(path.name, status, seconds, target, detail)


def notebook_seconds(res: Result) -> float | None:
    """The run time the notebook itself recorded in its metrics.json ("seconds"), if it wrote one."""
    f = res.output.parent / "metrics.json"
    try:
        return float(json.loads(f.read_text())["seconds"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def hub_or_offline(wait: float = 3.0) -> str:
    """Set HF_HUB_OFFLINE=1 for the notebooks unless the model hub answers within `wait` s; say which.

    The check runs in a thread that is abandoned after `wait` s: a socket timeout does not bound the DNS lookup
    before it, and a stalled lookup is what would otherwise hang a notebook's first hub call.
    """
    if os.environ.get("HF_HUB_OFFLINE"):
        return f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} (set by you): the notebooks use the offline models only"
    from helpers import env

    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(env.hub_reachable(timeout=wait)), daemon=True)
    probe.start()
    probe.join(wait + 0.5)
    if answer and answer[0]:
        return "the model hub answers: MODEL=\"auto\" may pick a hub model and download it"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return (f"the model hub did not answer within {wait:.0f} s: running with HF_HUB_OFFLINE=1, so no notebook waits "
            "on a DNS lookup or a download (the offline models from `make prepare` are used)")


def cell_limit(path: Path, factor: float) -> int | None:
    """Seconds one cell may run in a `make run`: `factor` × the notebook's smoke budget (slm_course.timeout)."""
    budget = json.loads(path.read_text())["metadata"].get("slm_course", {}).get("timeout")
    return int(factor * budget) if factor and budget else None


def main(argv: list[str]) -> int:
    """CLI: run the selected notebooks with per-cell progress, print a summary with the total, exit 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build", help="output folder (default: build)")
    ap.add_argument("--only", default="", help="run only notebooks whose name starts with this, e.g. 04 or 00,01,04")
    ap.add_argument("--smoke", action="store_true", help="pass SMOKE=True (the tests' profile)")
    ap.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    ap.add_argument("--timeout", type=float, default=0, help="seconds allowed per notebook (0: no limit)")
    ap.add_argument("--cell-timeout-factor", type=float, default=0,
                    help="one cell may run this many times the notebook's slm_course.timeout (its smoke budget) "
                         "before papermill stops it (0: no limit; make run uses 3)")
    args, extra = ap.parse_known_args(argv)
    if args.smoke:
        extra = ["-p", "SMOKE", "True", *extra]
    out = Path(args.out)
    if is_smoke(extra) and out.name != "smoke":  # smoke runs, their executed copies and summary: <out>/smoke/
        out = out / "smoke"
    selected = notebooks(args.only)
    if not selected:
        print(f"no notebook matches {args.only!r}")
        return 2
    print(hub_or_offline(), flush=True)
    results = []
    t_all = time.perf_counter()
    for k, path in enumerate(selected, 1):
        print(f"[{k}/{len(selected)}] running {path.name} (total so far {clock(time.perf_counter() - t_all)}) ...", flush=True)
        limit = cell_limit(path, args.cell_timeout_factor)
        res = run_notebook(path, out, extra, timeout=args.timeout or None, cell_timeout=limit,
                           progress=None if args.quiet else (lambda msg: print(msg, flush=True)))
        results.append(res)
        print(f"  {res.status:7s} {res.seconds:7.1f} s  {path.name} → {res.output}", flush=True)
        if res.status != "ok":
            print(res.detail, flush=True)
        if res.status == "timeout" and limit:
            print(f"  TIMEOUT: {path.name}: {res.detail.splitlines()[0]} ({args.cell_timeout_factor:g} × its "
                  f"slm_course.timeout). A stalled download, or a much slower machine: allow more with "
                  f"make run TIMEOUT_FACTOR=6, or none with TIMEOUT_FACTOR=0.", flush=True)
    total = time.perf_counter() - t_all
    summary = {"total_seconds": round(total, 1), "all_ok": all(r.status == "ok" for r in results),
               "notebooks": [{"notebook": r.notebook, "status": r.status, "seconds": round(r.seconds, 1),
                              "notebook_seconds": notebook_seconds(r), "output": str(r.output)} for r in results]}
    (out / "run_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nexecuted notebooks and figures are under {out.resolve()}/<notebook>/ (summary: {out / 'run_summary.json'})")
    print(f"{'notebook':36s} {'status':7s} {'wall s':>8s} {'own s':>8s}")
    for r in summary["notebooks"]:
        own = f"{r['notebook_seconds']:8.1f}" if r["notebook_seconds"] is not None else f"{'-':>8s}"
        print(f"{r['notebook']:36s} {r['status']:7s} {r['seconds']:8.1f} {own}")
    print(f"{'total':36s} {'ok' if summary['all_ok'] else 'FAILED':7s} {total:8.1f}   ({clock(total)})")
    n_ok = sum(r.status == "ok" for r in results)
    print(f"notebooks: {n_ok} passed, {len(results) - n_ok} failed")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
