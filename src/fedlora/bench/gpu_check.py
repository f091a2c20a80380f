"""The GPU check: every section of fedlora.bench.gpu_sections in one run, each in a child process with its own
time box, so a section that fails, runs out of memory or hangs is recorded as such and the rest still run.

    python bench/gpu_check.py --out DIR                 # on the device (bench/gpu_prepare.sh prints the call)
    python bench/gpu_check.py --tiny --out DIR          # seconds on a CPU: tiny random models (the suite's test)
    python bench/gpu_check.py --render DIR/gpu_check.json --into docs/benchmarks.md   # numbers into the docs

Writes DIR/gpu_check.json (machine-readable: environment, per section status, seconds, rows) and
DIR/gpu_check.md (the same as Markdown tables, what --render makes). A child writes its rows as it makes them, so
a section stopped at its time box keeps the rows it finished (the 135M and 1B models when the 7B runs out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from fedlora.bench.gpu_table import render, splice

SCHEMA = 1


def _sections():
    from fedlora.bench.gpu_sections import SECTIONS  # torch and transformers: only where a section runs

    return SECTIONS


def _sizes(tiny: bool, assets: str | None):
    from fedlora.bench.gpu_sections import DEVICE, tiny_sizes

    return tiny_sizes(Path(assets)) if tiny else DEVICE


def _write_part(path: Path, rows: list[dict], error: str | None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "error": error}, default=float))
    tmp.replace(path)


def run_child(name: str, part: Path, tiny: bool, assets: str | None) -> int:
    """One section in this process, its rows written to `part` after each one; 1 with the error when it fails."""
    rows: list[dict] = []
    _write_part(part, rows, None)
    try:
        _, fn, _ = _sections()[name]
        for row in fn(_sizes(tiny, assets)):
            rows.append(row)
            _write_part(part, rows, None)
    except BaseException as exc:  # recorded for the table; the traceback goes to the parent's log
        _write_part(part, rows, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        traceback.print_exc()
        return 1
    return 0


def run_isolated(name: str, seconds: float, work: Path, tiny: bool, assets: str | None) -> dict:
    """A section in a child process, killed after `seconds`: its record (status ok | failed | timed out)."""
    part = work / f"{name}.json"
    cmd = [sys.executable, "-m", "fedlora.bench.gpu_check", "--child", name, "--part", str(part)]
    cmd += ["--tiny", "--assets", str(assets)] if tiny else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 1.0))
        status = "ok" if proc.returncode == 0 else "failed"
        log = (proc.stdout + proc.stderr).strip().splitlines()
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed the child
        status = "timed out"
        log = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")).splitlines()
    record = {"name": name, "status": status, "seconds": time.perf_counter() - t0, "rows": [], "error": None}
    try:
        part_data = json.loads(part.read_text())
        record["rows"], record["error"] = part_data["rows"], part_data["error"]
    except (OSError, ValueError, KeyError):
        pass
    if status == "timed out":
        record["error"] = f"stopped at its time box of {seconds:.0f} s"
    elif status == "failed" and not record["error"]:
        record["error"] = log[-1] if log else f"exit code {proc.returncode}"
    if status != "ok":
        record["log_tail"] = log[-15:]
    return record


def run_in_process(name: str, seconds: float, tiny: bool, assets: str | None) -> dict:
    """A section in this process (no hard time box: it is checked between rows)."""
    t0 = time.perf_counter()
    record = {"name": name, "status": "ok", "seconds": 0.0, "rows": [], "error": None}
    try:
        _, fn, _ = _sections()[name]
        for row in fn(_sizes(tiny, assets)):
            record["rows"].append(row)
            if time.perf_counter() - t0 > seconds:
                record["status"], record["error"] = "timed out", f"stopped after its time box of {seconds:.0f} s"
                break
    except Exception as exc:
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    record["seconds"] = time.perf_counter() - t0
    return record


def check(out: Path, names: list[str], budget_s: float, tiny: bool = False, isolated: bool = True) -> dict:
    """Run the sections `names` within `budget_s` seconds in all; write gpu_check.json and .md under `out`."""
    sections = _sections()
    unknown = [n for n in names if n not in sections]
    if unknown:
        raise SystemExit(f"gpu_check: unknown section(s) {unknown}; known: {', '.join(sections)}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"schema": SCHEMA, "mode": "tiny (CPU)" if tiny else "device",
               "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "environment": {},
               "sections": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        assets = None
        if tiny:
            from fedlora.bench.gpu_sections import tiny_assets

            assets = str(tiny_assets(Path(work)))
        for name in names:
            title, _, box = sections[name]
            left = budget_s - (time.perf_counter() - t0)
            if left < 5:
                record = {"name": name, "status": "skipped", "seconds": 0.0, "rows": [],
                          "error": f"the check's budget of {budget_s:.0f} s was spent"}
            elif isolated:
                record = run_isolated(name, min(box, left), Path(work), tiny, assets)
            else:
                record = run_in_process(name, min(box, left), tiny, assets)
            record["title"] = title
            results["sections"].append(record)
            if name == "environment" and record["rows"]:
                results["environment"] = record["rows"][0]
            print(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s"
                  + (f" ({record['error']})" if record["error"] else ""), flush=True)
            results["total_s"] = time.perf_counter() - t0
            _save(out, results)  # after every section: a killed check keeps what it measured
    return results


def _save(out: Path, results: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "gpu_check.md").write_text(render(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fedlora's GPU check (one prepared run, or its tiny CPU mode)")
    ap.add_argument("--out", default="bench-out/gpu-check", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU, seconds")
    ap.add_argument("--sections", nargs="+", default=None, help="a subset, in this order (default: all)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole check")
    ap.add_argument("--in-process", action="store_true", help="run the sections in this process (no hard time box)")
    ap.add_argument("--render", metavar="JSON", help="print the Markdown of a gpu_check.json (or splice it, --into)")
    ap.add_argument("--into", metavar="FILE", help="with --render: replace the GPU section between its markers")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--assets", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.part), args.tiny, args.assets)
    if args.render:
        markdown = render(json.loads(Path(args.render).read_text()))
        if args.into:
            page = Path(args.into)
            page.write_text(splice(page.read_text(), markdown))
            print(f"gpu_check: {args.into} updated from {args.render}")
        else:
            print(markdown, end="")
        return 0
    names = args.sections or list(_sections())
    results = check(Path(args.out), names, args.budget_s, tiny=args.tiny, isolated=not args.in_process)
    print(render(results))
    print(f"gpu_check: wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md", flush=True)
    return 0 if all(s["status"] == "ok" for s in results["sections"]) else 1


if __name__ == "__main__":
    sys.exit(main())
