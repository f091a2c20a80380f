"""Tasks: everything that depends on what is being learned, behind one interface (`base.Task`), one registry.

A task decides how examples are loaded, split and partitioned over clients, how they are tokenized and
batched, which model class carries the LoRA adapters (and which head, if any, is trained beside them), how a
model is scored, and what an exported adapter needs to be rebuilt. The round loop, the strategies, privacy and
the engines never look inside: adding a task (for example causal language modelling) is one new file here,
one line in `_TASKS` and its name in `fedlora.task_names`. `cfg.task` picks it.
"""

from __future__ import annotations

from fedlora.tasks.base import Task
from fedlora.tasks.causal_lm import CausalLM
from fedlora.tasks.classification import SequenceClassification
from fedlora.task_names import TASK_NAMES

_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SequenceClassification, CausalLM)}
assert tuple(sorted(_TASKS)) == tuple(sorted(TASK_NAMES)), "fedlora.task_names must list the registered tasks"


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name]()


__all__ = ["Task", "available_tasks", "get_task"]
