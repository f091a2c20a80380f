"""`fedlora eval RUN_DIR`: score a run's exported adapter on the run's held-out split or a task file, and say how.

The adapter is loaded as `fedlora generate` loads it (verified against its manifest and its base model's files);
the held-out split is rebuilt from the run's config.toml exactly as the run built it, so with the run's scorer and
no shots the score is the run's last `eval_accuracy`. The report (printed, and written with every example's output
to RUN_DIR/eval/<data>-<scorer>-<shots>shot.json) states the scorer, the shots and the prompt template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedlora.config import load_config
from fedlora.errors import UserError
from fedlora.host import load_exported_model, load_tokenizer
from fedlora.scoring import check_scorer
from fedlora.tasks import get_task
from fedlora.tasks.causal_lm import CausalLM, capped

HELD_OUT = "the run's held-out split"


def eval_run(run_dir, task_file: str | None = None, scorer: str | None = None, shots: int = 0) -> dict:
    """The report of the run's exported global model on `task_file` (default: the run's held-out split)."""
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"not a run folder (no config.toml): {run_dir}")
    if not (adapter / "fedlora.json").is_file():
        raise UserError(f"no exported adapter in {run_dir} (adapter/fedlora.json): was output.save_adapter off?")
    if task_file is not None and not Path(task_file).is_file():
        raise UserError(f"--task-file: no such file: {task_file}")
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    cfg = load_config(run_dir / "config.toml")
    causal = cfg.task == CausalLM.name
    if not causal and (scorer or shots):
        raise UserError(f"--scorer and --shots apply to task=causal-lm runs; {run_dir} is task={cfg.task}")
    meta = json.loads((adapter / "fedlora.json").read_text())
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_exported_model(adapter, verify=True)
    pad = tokenizer.pad_token_id or 0
    if not causal:
        data = (task.file_data(cfg, task_file, tokenizer, meta["label_names"]) if task_file
                else _held_out(cfg, tokenizer))
        loss, score = task.evaluate(model, data, cfg.eval.batch_size, pad)
        report = {"loss": loss, "score": score, "scorer": "accuracy", "examples": len(data)}
    else:
        task.tokenizer, task.max_new_tokens = tokenizer, cfg.eval.max_new_tokens
        task.scorer = scorer = check_scorer(scorer or cfg.eval.scorer)
        data, choices = causal_data(cfg, task, tokenizer, meta["label_names"], task_file, shots)
        report = task.evaluate_report(model, data, cfg.eval.batch_size, pad, scorer, choices)
        report["answers"] = list(data.answers)
    report |= {"run": str(run_dir), "data": task_file or HELD_OUT, "eval_protocol": task.eval_protocol(cfg, shots)}
    out = run_dir / "eval" / f"{Path(task_file).stem if task_file else 'held-out'}-{report['scorer']}-{shots}shot.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    report["report_file"] = str(out)
    return report


def summary_line(report: dict) -> str:
    p = report["eval_protocol"]
    extra = f", acc_norm {report['acc_norm']:.4f}" if "acc_norm" in report else ""
    return (f"{report['scorer']} {report['score']:.4f}{extra}, loss {report['loss']:.4f} on {report['examples']} "
            f"examples of {report['data']} ({p['shots']} shots; template: {p['template']}) -> {report['report_file']}")


def _held_out(cfg, tokenizer):
    from fedlora.experiment import prepare_data

    return prepare_data(cfg, tokenizer).test


def causal_data(cfg, task: CausalLM, tokenizer, label_names, task_file, shots: int):
    """(EncodedData to score, per-example options or None)."""
    rows = choice_rows(cfg, task_file) if task_file else None
    if rows is None and shots == 0:  # exactly what the run scored, or a task file read as a run reads data
        data = task.file_data(cfg, task_file, tokenizer, label_names) if task_file else task.held_out(cfg, tokenizer)
        return data, None
    demos = _demonstrations(cfg, task, shots, tokenizer)
    if rows is not None:
        prompts, answers, choices = rows
    else:
        prompts, answers = _prompts_and_answers(cfg, task, task_file, tokenizer)
        choices = None
    data = task.encode(cfg, tokenizer, prompts, answers, np.full(len(prompts), -1, dtype=np.int64), shots=demos)
    return data, choices


def _prompts_and_answers(cfg, task: CausalLM, task_file, tokenizer) -> tuple[list[str], list[str]]:
    if task_file:
        if task._trl_records(cfg, _kind(task_file), task_file) is not None:
            raise UserError("--shots applies to prompt/response task files (score TRL-format files without shots)")
        prompts, answers, *_ = task._records(cfg, _kind(task_file), task_file)
        return prompts, answers
    prompts, answers, _, _, _, _, test, _ = task._split(cfg, tokenizer)
    test = capped(cfg, test)
    return [prompts[i] for i in test], [answers[i] for i in test]


def _demonstrations(cfg, task: CausalLM, shots: int, tokenizer) -> tuple:
    """`shots` (prompt, answer) pairs drawn (seeded by the run's seed and `shots`) from the run's training split:
    never from the held-out set."""
    if shots == 0:
        return ()
    if task._trl_records(cfg) is not None:
        raise UserError("--shots needs a run on prompt/response records (its training split gives the demonstrations)")
    prompts, answers, _, _, _, train, _, _ = task._split(cfg, tokenizer)
    if shots > len(train):
        raise UserError(f"--shots {shots} is more than the {len(train)} training examples")
    pick = np.random.default_rng([cfg.seed, shots]).choice(train, shots, replace=False)
    return tuple((prompts[i], answers[i]) for i in pick)


def _kind(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "csv")


def choice_rows(cfg, task_file: str):
    """(prompts, answers, options) of a task file with a `choices` column (a list, or a JSON list in CSV);
    None without one. The prompt is `data.prompt_column` or `prompt`, the answer `data.response_column` or
    `completion`."""
    from fedlora.tasks.chat_data import read_rows

    rows, bad = read_rows(_kind(task_file), task_file)
    if not rows or "choices" not in rows[0]:
        return None
    if bad:
        raise UserError(f"{task_file}: {bad} unreadable lines")
    d = cfg.data
    prompts, answers, choices = [], [], []
    for k, row in enumerate(rows, 1):
        prompt = row.get(d.prompt_column, row.get("prompt"))
        answer = row.get(d.response_column, row.get("completion"))
        options = row.get("choices")
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError:
                options = None
        if not (isinstance(prompt, str) and isinstance(answer, str) and isinstance(options, list)
                and all(isinstance(o, str) for o in options) and len(options) >= 2):
            raise UserError(f"{task_file} record {k}: needs a prompt, an answer and a `choices` list of 2+ strings")
        prompts.append(prompt)
        answers.append(answer)
        choices.append([str(o) for o in options])
    return prompts, answers, choices
