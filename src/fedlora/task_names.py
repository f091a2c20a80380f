"""The registered tasks' names, as data: the config validates `task` against them without importing a task
(tasks sit above the config). `fedlora.tasks` checks at import that its registry holds exactly these."""

TASK_NAMES = ("classification", "causal-lm")
