"""The docs that say what is built stay true to the registries."""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.strategies import available_strategies

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_registered_method_has_a_section_in_algorithms_md():
    text = (DOCS / "algorithms.md").read_text()
    sections = set(re.findall(r"^## `?([a-z-]+)`?$", text, flags=re.M))
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", text, flags=re.M))
    missing = set(available_strategies()) - sections
    assert not missing, f"docs/algorithms.md has no section for {sorted(missing)}"
    assert set(available_strategies()) <= rows, "the summary table lists every method"


def test_architecture_md_names_every_round_stage():
    from fedlora.config import load_config
    from fedlora.round import build_stages

    text = (DOCS / "architecture.md").read_text()
    names = set()
    for extra in ([], ["federation.aggregation=median"], ["privacy.mode=client", "privacy.epsilon=3"]):
        cfg = load_config(None, extra)
        for client_dp in (False, True):
            for secure in (False, True):
                names |= {s.name for s in build_stages(cfg, client_dp, secure)}
    assert all(name in text for name in names), sorted(n for n in names if n not in text)
