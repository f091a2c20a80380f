"""`fedlora bench [SUITE] [--out DIR] [--quick]`: reproduce the papers' claims and measure speed.

    from fedlora.bench import run_suite
    report = run_suite("paper-ffa", Path("bench-out/paper-ffa"), quick=True)   # -> .../report.md

Suites (one module each): `paper-ffa`, `paper-rbla`, `paper-rbla-digits`,
`paper-rbla-scaling`, `speed`. Sizes: `full` (the README numbers), `quick`
(`--quick`, a CI smoke run of a few minutes) and `smoke` (tests only). The output folder gets report.md,
plots/*.png, results.json (raw numbers and a run log saying which runs were trained, resumed or cached) and
runs/<config hash>/ (one run folder per config and seed, reused on the next call).

Suite modules are imported on demand, so importing this package stays light (the bench scripts import
`fedlora.bench.aggregation` before numpy and must be able to pin BLAS threads first).
"""

from __future__ import annotations


import importlib
import json
import time
from pathlib import Path
from fedlora.errors import UserError

SUITES: dict[str, str] = {
    "paper-ffa": "fedlora.bench.paper_ffa",
    "paper-rbla": "fedlora.bench.paper_rbla",
    "paper-rbla-digits": "fedlora.bench.paper_rbla_digits",  # needs the `bench` extra (scikit-learn)
    "paper-rbla-scaling": "fedlora.bench.paper_rbla_scaling",
    "speed": "fedlora.bench.speed",
    "comm": "fedlora.bench.comm",  # compressed uploads: accuracy and bytes per round (issue 19)
    "flaas": "fedlora.bench.flaas",  # planned ranks on a simulated device population (issue 32)
}
SIZES = ("full", "quick", "smoke")


def available_suites() -> list[str]:
    return sorted(SUITES)


def run_suite(suite: str, out: Path, quick: bool = False, size: str | None = None, jobs: int = 1) -> Path:
    """Run (or reuse) every run of `suite`, write `out/report.md`, `out/results.json`, `out/plots/`; return report.md.

    `size` overrides `quick` ("full", "quick" or "smoke"); `jobs` trains that many runs at once (the speed
    suite always measures alone); a bad suite, size or jobs raises ValueError.
    """
    from rich.console import Console

    if suite not in SUITES:
        raise UserError(f"unknown bench suite {suite!r}; available: {', '.join(available_suites())}")
    size = size or ("quick" if quick else "full")
    module = importlib.import_module(SUITES[suite])
    sizes = list(getattr(module, "SIZES", SIZES))  # a suite may offer sizes beyond full/quick/smoke
    if size not in sizes:
        raise UserError(f"unknown bench size {size!r} for {suite}; available: {', '.join(sizes)}")
    if jobs < 1:
        raise UserError(f"bench jobs must be >= 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, soft_wrap=True)  # progress on stderr: stdout carries only the report path
    console.print(f"[bold]fedlora bench {suite}[/bold] (size {size}) -> {out}")
    t0 = time.perf_counter()
    result = module.run(out, size, console, jobs)
    elapsed = time.perf_counter() - t0

    report = out / "report.md"
    report.write_text(result.markdown.rstrip() + f"\n\n_Written by `fedlora bench {suite}` (size {size}) in "
                      f"{elapsed:.0f} s; raw numbers in results.json._\n")
    payload = {"suite": suite, "size": size, "seconds": elapsed, "run_log": result.run_log, **result.results}
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    trained = sum(e["status"] != "cached" for e in result.run_log)
    console.print(f"[bold]{suite}[/bold]: {len(result.run_log)} items, {trained} trained/measured now, "
                  f"{len(result.run_log) - trained} cached; {elapsed:.0f} s -> {report}")
    return report


def _jsonable(obj):
    """Tuples to lists, numpy scalars to Python; JSON has no inf/nan, so a non-finite float is an error (raised)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj
