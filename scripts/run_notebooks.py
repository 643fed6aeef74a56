"""Execute the course notebooks headless with papermill (`make run`, `make nb`, and the smoke tests).

Each notebook runs in the course's kernel and writes its executed copy to <out>/<stem>/<stem>.ipynb, next to
the figures and metrics.json it saves there (SLM_COURSE_BUILD=<out>, so OUTPUT_DIR="auto" resolves there).
Extra arguments are papermill's: -p NAME VALUE, -y YAML, e.g.  -p MAX_STEPS 200  or  -y "SMOKE: true".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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
    """Course notebooks in order, optionally only those whose name starts with `only` (e.g. '04')."""
    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    return [p for p in paths if p.name.startswith(only)]


def run_notebook(path: Path, out: Path, extra: list[str] = (), timeout: float | None = None,
                 env_extra: dict[str, str] | None = None) -> Result:
    """Run one notebook with papermill in a subprocess (killed after `timeout` s); return its Result."""
    stem = path.stem
    target = out / stem / f"{stem}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLM_COURSE_BUILD": str(out.resolve()), "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [sys.executable, "-m", "papermill", str(path), str(target), "-k", kernel_name(),
           "--cwd", str(path.parent), "--no-progress-bar", "--log-level", "WARNING", *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
        detail = "" if status == "ok" else (proc.stderr or proc.stdout)[-4000:]
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"killed after {timeout:.0f} s"
    return Result(path.name, status, time.perf_counter() - t0, target, detail)


def main(argv: list[str]) -> int:
    """CLI: run the selected notebooks, print a one-line summary per notebook, exit 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build", help="output folder (default: build)")
    ap.add_argument("--only", default="", help="run only notebooks whose name starts with this, e.g. 04")
    ap.add_argument("--smoke", action="store_true", help="pass SMOKE=True (the tests' profile)")
    args, extra = ap.parse_known_args(argv)
    if args.smoke:
        extra = ["-p", "SMOKE", "True", *extra]
    out = Path(args.out)
    selected = notebooks(args.only)
    if not selected:
        print(f"no notebook matches {args.only!r}")
        return 2
    results = []
    for path in selected:
        print(f"running {path.name} ...", flush=True)
        res = run_notebook(path, out, extra)
        results.append(res)
        print(f"  {res.status:7s} {res.seconds:7.1f} s  {path.name} → {res.output}", flush=True)
        if res.status != "ok":
            print(res.detail)
    summary = [{"notebook": r.notebook, "status": r.status, "seconds": round(r.seconds, 1), "output": str(r.output)}
               for r in results]
    (out / "run_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nexecuted notebooks and figures are under {out.resolve()}/<notebook>/ (summary: {out / 'run_summary.json'})")
    for r in results:
        print(f"{r.notebook:36s} {r.status:7s} {r.seconds:7.1f} s")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
