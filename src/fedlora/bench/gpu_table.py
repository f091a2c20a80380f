"""The GPU check's results as Markdown, and the docs section made from them (stdlib only: it runs anywhere).

`render(results)` turns the JSON `fedlora.bench.gpu_check` writes into one table per section; `splice(text, md)`
puts that Markdown between the GPU markers of a docs page, so the day the check runs on a device its numbers go
into docs/benchmarks.md with one command (`python bench/gpu_check.py --render results.json --into FILE`).
"""

from __future__ import annotations

import math

START = "<!-- gpu-check:start (made by `python bench/gpu_check.py --render`; do not edit by hand) -->"
END = "<!-- gpu-check:end -->"


def cell(value) -> str:
    """One table cell: 3 significant decimals for floats, thousands separators for large numbers."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|")


def table(rows: list[dict]) -> str:
    """A Markdown table; the columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict) -> str:
    """The Markdown of one GPU check: the machine, then each section's status, note and table."""
    env = results.get("environment", {})
    out = [f"GPU check of {results.get('started', '?')} ({results.get('mode', '?')} mode): "
           f"{env.get('device_name', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
           f"peft {env.get('peft', '?')}; {results.get('total_s', 0.0):.0f} s in all; load before: "
           f"{env.get('loadavg', '?')}."]
    for section in results.get("sections", []):
        status = section.get("status", "?")
        out.append(f"\n**{section.get('title', section.get('name'))}** ({status}, {section.get('seconds', 0.0):.0f} s)")
        if section.get("note"):
            out.append(f"\n{section['note']}")
        if section.get("error"):
            out.append(f"\n{status}: `{section['error']}`")
        if section.get("rows"):
            out.append("\n" + table(section["rows"]))
    return "\n".join(out) + "\n"


def splice(text: str, markdown: str) -> str:
    """`text` with what lies between START and END replaced by `markdown`; ValueError without both markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError("the page has no GPU check markers (START ... END of fedlora.bench.gpu_table)")
    return text[: start + len(START)] + "\n" + markdown + text[end:]
