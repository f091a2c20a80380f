"""`instruct-bench`: fedlora's generated instruction benchmark (data.name = "instruct-bench", task = causal-lm).

Four task families, each answer exact (one right string, compared after normalisation):
- arithmetic: short word problems in the spirit of GSM-8K, one or two operations on numbers up to 20;
- extraction: one field (name, age, city or job) of a person described in one sentence;
- reverse: a list of 3-5 words in reverse order (format following: the answer is the input, re-ordered);
- largest: the largest of 4-5 numbers.
Records are prompt-completion rows with a `task` column (the family), so `data.partition_column = "task"` with
`federation.partition = "key"` gives clients whole task families (non-IID by task).

Deterministic from the seed on every Python version: every draw is made from `random.Random.random()`, the one
method whose sequence Python guarantees for a given seed (`randrange`, `choice` and `shuffle` may change). The
word lists are written here for the benchmark: no third-party data, nothing to license.

    python -m fedlora.data.instruct_bench out.jsonl [--seed 0] [--per-task 500]   # the rows as JSONL
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAME = "instruct-bench"
SEED = 0  # the benchmark's version: every run of data.name=instruct-bench reads these rows
PER_TASK = 500
TASKS = ("arithmetic", "extraction", "reverse", "largest")
COLUMNS = ("prompt", "completion", "task")

FIRST = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Victor", "Wen", "Yusuf", "Zoe", "Omar")
LAST = ("Berg", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ito", "Jensen", "Kowalski", "Lopez",
        "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka", "Weber", "Young")
CITIES = ("Porto", "Lyon", "Oslo", "Quito", "Kyoto", "Dakar", "Perth", "Tartu", "Cusco", "Bergen", "Malmo", "Turin",
          "Leeds", "Ghent", "Split", "Cork", "Basel", "Graz", "Brno", "Pune")
JOBS = ("nurse", "baker", "pilot", "teacher", "plumber", "chemist", "farmer", "lawyer", "painter", "dentist",
        "librarian", "carpenter", "engineer", "cashier", "florist", "tailor")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "stamps", "books", "shells", "coins", "cards")
WORDS = ("river", "stone", "cloud", "apple", "tiger", "lamp", "green", "music", "candle", "window", "forest",
         "silver", "garden", "rocket", "pepper", "winter", "bridge", "orange", "planet", "pillow", "mirror", "ticket",
         "button", "castle", "meadow", "violin", "harbor", "lemon", "feather", "saddle")


def _int(rng: random.Random, lo: int, hi: int) -> int:
    """A uniform integer in [lo, hi] from `random()` alone (see the module docstring)."""
    return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _pick(rng: random.Random, seq):
    return seq[_int(rng, 0, len(seq) - 1)]


def _sample(rng: random.Random, seq, k: int) -> list:
    """k distinct elements of `seq`, in draw order."""
    pool = list(seq)
    return [pool.pop(_int(rng, 0, len(pool) - 1)) for _ in range(k)]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item = _pick(rng, FIRST), _pick(rng, ITEMS)
    kind = _int(rng, 0, 3)
    if kind == 0:
        a, b = _int(rng, 2, 20), _int(rng, 2, 20)
        q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a = _int(rng, 5, 20)
        b = _int(rng, 1, a - 1)
        q, ans = f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?", a - b
    elif kind == 2:
        a, b = _int(rng, 2, 9), _int(rng, 2, 9)
        q, ans = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b
    else:
        a, b = _int(rng, 2, 15), _int(rng, 2, 15)
        c = _int(rng, 1, a + b - 1)
        q = f"{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have now?"
        ans = a + b - c
    return f"Solve the problem. Answer with the number only.\n\n{q}", str(ans)


def extraction(rng: random.Random) -> tuple[str, str]:
    fields = {"name": f"{_pick(rng, FIRST)} {_pick(rng, LAST)}", "age": str(_int(rng, 19, 78)),
              "city": _pick(rng, CITIES), "job": _pick(rng, JOBS)}
    templates = ("{name} is a {age}-year-old {job} who lives in {city}.",
                 "{name}, {age}, works as a {job} in {city}.",
                 "In {city}, {name} has worked as a {job} since turning {age}.",
                 "The {job} {name} moved to {city} at the age of {age}.")
    sentence = _pick(rng, templates).format(**fields)
    field = _pick(rng, tuple(fields))
    what = {"name": "the person's full name", "age": "the person's age", "city": "the city",
            "job": "the person's job"}[field]
    return f"Extract {what} from the sentence. Answer with that only.\n\nSentence: {sentence}", fields[field]


def reverse(rng: random.Random) -> tuple[str, str]:
    words = _sample(rng, WORDS, _int(rng, 3, 5))
    return (f"Write these words in reverse order, separated by commas.\n\nWords: {', '.join(words)}",
            ", ".join(reversed(words)))


def largest(rng: random.Random) -> tuple[str, str]:
    numbers = _sample(rng, range(10, 100), _int(rng, 4, 5))
    return (f"Which number is the largest? Answer with the number only.\n\nNumbers: {', '.join(map(str, numbers))}",
            str(max(numbers)))


GENERATORS = {"arithmetic": arithmetic, "extraction": extraction, "reverse": reverse, "largest": largest}


def generate(seed: int = SEED, per_task: int = PER_TASK) -> list[dict]:
    """`per_task` distinct prompt-completion rows per family (rows of a family in draw order, families in TASKS
    order); each family draws from its own generator seeded by (seed, family), so one family's size does not
    change another's rows."""
    rows = []
    for index, task in enumerate(TASKS):
        rng = random.Random(seed * 1000 + index)
        seen: set[str] = set()
        attempts = 0
        while len(seen) < per_task:
            attempts += 1
            if attempts > 50 * per_task:
                raise ValueError(f"{task}: fewer than {per_task} distinct problems")
            prompt, answer = GENERATORS[task](rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "completion": answer, "task": task})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write fedlora's generated instruction benchmark as JSONL")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--per-task", type=int, default=PER_TASK)
    args = ap.parse_args(argv)
    rows = generate(args.seed, args.per_task)
    write_jsonl(Path(args.out), rows)
    print(f"{len(rows)} rows ({args.per_task} per task: {', '.join(TASKS)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
