"""`fedlora eval RUN_DIR --lm-eval TASK`: EleutherAI's lm-evaluation-harness on a run's exported adapter, offline.

The adapter and its base are verified first (as `fedlora eval` does), then lm-evaluation-harness loads them its
own way, `--model hf --model_args pretrained=<base folder>,peft=<adapter folder>`, so its numbers are its own,
computed as it computes them for any model. TASK is one of:
- `held-out`: fedlora writes the run's held-out split (or `--task-file`'s records) as a local JSON dataset and a
  task YAML that reads it (`dataset_path: json`, `dataset_kwargs.data_files`) under RUN_DIR/eval/lm-eval/, then
  runs it. Each prompt is the text fedlora scores (its tokens decoded, chat template and all), so the harness and
  `fedlora eval` see the same prompts: a closed set of answers (or a `choices` column) is a `multiple_choice`
  task (acc, acc_norm), free-form answers a `generate_until` task (exact_match, ignoring case and punctuation);
- a task YAML file (its folder is added to the task search path; its data local, `dataset_path: json`);
- the name of a task lm-evaluation-harness knows, whose data is already in the local Hugging Face cache.
Nothing is downloaded: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedlora.errors import UserError

MISSING = ("--lm-eval needs lm-evaluation-harness, which is not installed here: pip install 'fedlora[lm_eval]'")
HELD_OUT = "held-out"


def write_task(folder: Path, name: str, texts: list[str], answers: list[str], choices: list[list[str]] | None,
               max_new_tokens: int, stop: list[str]) -> Path:
    """Write `name`.jsonl (one record per example) and `name`.yaml (an lm-evaluation-harness task reading it
    offline) in `folder`; return the YAML's path. `texts` are the prompts exactly as the model reads them;
    `choices`: per-example options (multiple_choice), None for free-form answers (generate_until)."""
    import yaml  # PyYAML: a dependency of transformers and datasets

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    rows = []
    for k, (text, answer) in enumerate(zip(texts, answers)):
        row = {"text": text, "answer": answer}
        if choices is not None:
            if answer not in choices[k]:
                raise UserError(f"example {k}: the reference {answer!r} is not among its options {choices[k]}")
            row |= {"choices": choices[k], "gold": choices[k].index(answer)}
        rows.append(row)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "doc_to_text": "text",  # a column name: the text as it is, no template of the harness' own
        # The option follows the prompt directly (the prompt ends with the assistant header or a newline), as
        # fedlora's multiple-choice scorer appends it; the harness' default delimiter is a space.
        "target_delimiter": "",
    }
    if choices is not None:
        task |= {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                 "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                 {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    else:
        task |= {"output_type": "generate_until", "doc_to_target": "answer",
                 "generation_kwargs": {"until": stop, "max_gen_toks": max_new_tokens, "do_sample": False},
                 "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                  "ignore_case": True, "ignore_punctuation": True}]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return path


def held_out_task(run_dir: Path, task_file: str | None, scorer: str | None = None) -> Path:
    """The run's held-out split (or `task_file`'s records) written as an lm-evaluation-harness task: multiple
    choice when `scorer` (default: the run's eval.scorer) is multiple-choice or the file has a `choices` column,
    else generation scored by exact match."""
    from fedlora.config import load_config
    from fedlora.eval_run import causal_data
    from fedlora.models import load_tokenizer
    from fedlora.scoring import check_scorer
    from fedlora.tasks import get_task
    from fedlora.tasks.choice_scoring import closed_set

    cfg = load_config(run_dir / "config.toml")
    scorer = check_scorer(scorer or cfg.eval.scorer)
    meta = json.loads((run_dir / "adapter" / "fedlora.json").read_text())
    tokenizer = load_tokenizer(cfg.model.name)
    task = get_task(cfg.task)
    task.tokenizer = tokenizer
    data, choices = causal_data(cfg, task, tokenizer, meta["label_names"], task_file, 0)
    answers = list(data.answers)
    if choices is None and scorer == "multiple-choice":
        choices = [closed_set(answers)] * len(answers)
    texts = [tokenizer.decode(data.input_ids[i][: data.prompt_len[i]], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False) for i in range(len(answers))]
    stop = list(dict.fromkeys(s for s in ("<|im_end|>", tokenizer.eos_token, "\n") if s))
    name = f"fedlora_{Path(task_file).stem if task_file else 'held_out'}".replace("-", "_")
    return write_task(run_dir / "eval" / "lm-eval", name, texts, answers, choices, cfg.eval.max_new_tokens, stop)


def lm_eval_run(run_dir: Path, task: str, task_file: str | None = None, scorer: str | None = None,
                limit: int | None = None, batch_size: int = 8) -> str:
    """Run `task` on the run's exported model; write RUN_DIR/eval/lm-eval-<task>.json; return a short table."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(MISSING) from None
    from fedlora.models import resolve_model_path
    from fedlora.verify import check_base, verify_adapter

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "fedlora.json").is_file():
        raise UserError(f"no exported adapter in {run_dir} (adapter/fedlora.json): was output.save_adapter off?")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    meta = json.loads((adapter / "fedlora.json").read_text())
    if meta.get("task") != "causal-lm":
        raise UserError(f"--lm-eval needs a task=causal-lm run; {run_dir} is task={meta.get('task')}")
    if (task_file is not None or scorer is not None) and task != HELD_OUT:
        raise UserError(f"--task-file and --scorer go with --lm-eval {HELD_OUT} (a task YAML names its own data "
                        "and metrics)")
    base = resolve_model_path(meta["model"])
    check_base(verify_adapter(adapter), base)
    # Offline: no hub look-ups for the model, the tokenizer or the data.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yaml = held_out_task(run_dir, task_file, scorer) if task == HELD_OUT else Path(task)
    if yaml.suffix in (".yaml", ".yml"):
        if not yaml.is_file():
            raise UserError(f"--lm-eval: no such task YAML: {task}")
        manager, name = TaskManager(include_path=str(yaml.resolve().parent)), task_name(yaml)
    else:
        manager, name = TaskManager(), task
    if name not in manager.all_tasks:
        raise UserError(f"--lm-eval: lm-evaluation-harness knows no task {name!r}")
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": base, "peft": str(adapter), "dtype": "float32"},
            tasks=[name], task_manager=manager, device="cpu", batch_size=batch_size, limit=limit,
            log_samples=True)
    except (ConnectionError, OSError) as exc:  # data not local: one line, not a traceback
        raise UserError(f"--lm-eval {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                        "(offline: give a task YAML with dataset_path: json and local data_files)") from None
    out = run_dir / "eval" / f"lm-eval-{name}.json"
    out.parent.mkdir(exist_ok=True)
    kept = {k: results.get(k) for k in ("results", "n-shot", "configs", "versions", "n-samples")}
    # Per example: the harness' target and its filtered responses (multiple choice: each option's
    # (log-likelihood, is-greedy); generation: the text), to set beside `fedlora eval`'s per-example report.
    kept["samples"] = [{"doc_id": x.get("doc_id"), "target": x.get("target"), "resps": x.get("filtered_resps")}
                       for x in results.get("samples", {}).get(name, [])]
    out.write_text(json.dumps(kept, indent=1, default=str) + "\n")
    version = getattr(lm_eval, "__version__", "")
    lines = [f"lm-evaluation-harness {version} on pretrained={base},peft={adapter} "
             f"({results['n-shot'].get(name, 0)} shots; template: the task's doc_to_text"
             f"{', the prompts as fedlora renders them' if task == HELD_OUT else ''})"]
    for metric, value in sorted(results["results"][name].items()):
        if isinstance(value, (int, float)) and "," in metric and "stderr" not in metric:  # "acc,none": a metric
            lines.append(f"{name}  {metric}  {value:.4f}")
    return "\n".join(lines + [f"-> {out}"])


def task_name(yaml: Path) -> str:
    """The `task:` of a task YAML (read as text: lm-evaluation-harness' YAMLs carry `!function` tags)."""
    for line in yaml.read_text().splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise UserError(f"--lm-eval: {yaml} has no top-level `task:` name")
