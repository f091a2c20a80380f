"""`fedlora run | resume | bench | report | generate | eval | verify | export-metrics`: parse, validate, call the library.

User errors (bad config, bad value, missing file: `fedlora.errors.UserError`, and OSError) print one line on
stderr and exit 2, never a traceback. Anything else is a bug: its traceback, a line saying so, exit 1.
"""

from __future__ import annotations


import argparse
import os
import sys
import traceback
from pathlib import Path
from fedlora.errors import UserError

EXIT_USAGE = 2
EXIT_BUG = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the whole usage)
        print(f"fedlora: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora", description="Federated LoRA fine-tuning with FFA-LoRA, RBLA and DP.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an experiment (config file optional, dotted key=value overrides)")
    run.add_argument("items", nargs="*", help="[CONFIG.toml] key=value ...")
    run.add_argument("--out", help="run folder (default: output.dir/<strategy>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved (TOML), exit")

    resume = sub.add_parser("resume", help="continue a run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--quiet", action="store_true")

    bench = sub.add_parser("bench", help="run a benchmark suite and write report.md with plots")
    bench.add_argument("suite", nargs="?", default="paper-ffa")
    bench.add_argument("--out", default=None)
    bench.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 CPU cores)")
    bench.add_argument("--size", default=None, help="a suite's named size (full, quick, smoke; paper-ffa: methods)")
    bench.add_argument("--jobs", type=int, default=1, help="training runs at once (each gets cores/jobs threads)")

    gen = sub.add_parser("generate", help="a causal-lm run's fine-tuned model answers a prompt")
    gen.add_argument("run_dir")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")

    ev = sub.add_parser("eval", help="score a run's exported adapter (held-out split or a task file), stating how")
    ev.add_argument("run_dir")
    ev.add_argument("--task-file", default=None,
                    help="jsonl/csv/parquet to score on (default: the run's held-out split)")
    ev.add_argument("--scorer", default=None, help="label-match | exact-match | rouge-l | multiple-choice "
                    "(default: the run's eval.scorer)")
    ev.add_argument("--shots", type=int, default=0, help="demonstrations from the run's training split (default 0)")
    ev.add_argument("--lm-eval", default=None, metavar="held-out|TASK_YAML|NAME",
                    help="run lm-evaluation-harness on the adapter instead (the lm_eval extra); held-out: the "
                    "run's held-out split (or --task-file) written as a local task")
    ev.add_argument("--limit", type=int, default=None, help="--lm-eval: at most this many examples per task")

    verify = sub.add_parser("verify", help="check a run's or an adapter's files against its manifest and metrics")
    verify.add_argument("path", help="a run folder or an adapter folder")

    export = sub.add_parser("export-metrics", help="replay a run's metrics.jsonl into experiment trackers")
    export.add_argument("run_dir")
    export.add_argument("--to", required=True, help="tracker(s), comma separated: tensorboard, mlflow, trackio, wandb")
    export.add_argument("--per-client", action=argparse.BooleanOptionalAction, default=None,
                        help="send per-client fields under DP too (default: the run's output.report_per_client)")

    aud = sub.add_parser("audit", help="one audited DP run (client or sample level) with canaries: an empirical "
                                       "lower bound on epsilon")
    aud.add_argument("items", nargs="*", help="[CONFIG.toml] key=value ...")
    aud.add_argument("--canaries", type=int, default=500, help="canaries, each inserted on a fair coin (default 500)")
    aud.add_argument("--out", help="run folder of the audited run (default: output.dir/<strategy>-<time>)")
    aud.add_argument("--confidence", type=float, default=0.95, help="of the lower bound (default 0.95)")
    aud.add_argument("--quiet", action="store_true", help="no progress output")
    report = sub.add_parser("report", help="compare run folders: report.md and plots")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", default=None, help="folder for report.md (default: the first run folder)")
    return p


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument {item!r}: give one config file and key=value overrides")
    return config, overrides


def cmd_run(args) -> int:
    from fedlora.config import load_config

    config_path, overrides = _split_items(args.items)
    cfg = load_config(config_path, overrides)
    if args.dry_run:
        print(cfg.to_toml(), end="")
        return 0
    from fedlora.runner import run_experiment  # torch and transformers: only when training

    run_experiment(cfg, out=args.out, quiet=args.quiet)
    return 0


def cmd_audit(args) -> int:
    from fedlora.config import load_config

    config_path, overrides = _split_items(args.items)
    cfg = load_config(config_path, overrides)
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}")
    from fedlora.audit import audit  # torch and transformers: only when training

    result = audit(cfg, canaries=args.canaries, out=args.out, confidence=args.confidence, progress=not args.quiet)
    print(result.audit_dir / "report.md")
    return 0


def cmd_resume(args) -> int:
    run_dir = Path(args.run_dir)
    # Checked here, before the model and data are loaded for nothing.
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run folder (no config.toml): {run_dir}")
    if not (run_dir / "checkpoint" / "state.npz").is_file():
        raise UserError(f"no checkpoint in {run_dir}: the run stopped before its first round ended; start it again")
    from fedlora.runner import resume_experiment

    resume_experiment(run_dir, quiet=args.quiet)
    return 0


def cmd_report(args) -> int:
    from fedlora.report import compare_runs

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not (d / "metrics.jsonl").exists():
            raise UserError(f"not a run folder (no metrics.jsonl): {d}")
    out = compare_runs(dirs, Path(args.out) if args.out else dirs[0])
    print(out)
    return 0


def cmd_bench(args) -> int:
    from fedlora.bench import run_suite

    out = run_suite(args.suite, Path(args.out) if args.out else Path("bench-out") / args.suite, quick=args.quick,
                    size=args.size, jobs=args.jobs)
    print(out)
    return 0


def cmd_generate(args) -> int:
    from fedlora.generate import generate_from_run

    print(generate_from_run(Path(args.run_dir), args.prompt, args.max_new_tokens))
    return 0


def cmd_eval(args) -> int:
    if args.lm_eval:
        from fedlora.lm_eval_run import lm_eval_run

        if args.shots:
            raise UserError("--shots does not apply to --lm-eval (a task YAML sets num_fewshot)")
        print(lm_eval_run(Path(args.run_dir), args.lm_eval, args.task_file, args.scorer, limit=args.limit))
        return 0
    if args.limit is not None:
        raise UserError("--limit applies to --lm-eval")
    from fedlora.eval_run import eval_run, summary_line

    print(summary_line(eval_run(Path(args.run_dir), args.task_file, args.scorer, args.shots)))
    return 0


def cmd_verify(args) -> int:
    from fedlora.verify_run import verify_path

    print(verify_path(args.path))  # a failure is a UserError: one line, exit 2
    return 0


def cmd_export_metrics(args) -> int:
    from fedlora.tracker_replay import export_metrics

    to = [t.strip() for t in args.to.split(",") if t.strip()]
    n = export_metrics(Path(args.run_dir), to, per_client=args.per_client)
    print(f"{n} rounds of {args.run_dir} sent to {', '.join(to)}")
    return 0


COMMANDS = {"run": cmd_run, "audit": cmd_audit, "resume": cmd_resume, "report": cmd_report, "bench": cmd_bench,
            "generate": cmd_generate, "eval": cmd_eval, "verify": cmd_verify, "export-metrics": cmd_export_metrics}


BUG_LINE = ("fedlora: internal error (a bug, not a mistake in your config): please report it with the "
            "traceback above and your config.toml")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, OSError) as exc:
        if os.environ.get("FEDLORA_DEBUG"):
            raise
        # A mistake in the config, the command line, a file or the data (ConfigError, RoundFailed and the
        # Flower engine's FlowerRunError are UserErrors), or a file the system refused: one line, exit 2.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fedlora: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is fedlora's fault: the whole traceback, then say so
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
