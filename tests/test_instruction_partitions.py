"""Non-IID partitions of free-form instruction data without labels or keys: Dirichlet over k-means clusters of
the prompts' MiniLM embeddings, and over length buckets; the partition report shows the skew."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlora.config import load_config
from fedlora.data.text_groups import length_buckets

TOPICS = {
    "cooking": ["How long should I bake {x} bread in the oven?", "What spices go well with roasted {x}?",
                "Give me a quick recipe for {x} soup.", "How do I keep {x} pasta from sticking to the pan?"],
    "code": ["Write a Python function that sorts a list of {x} integers.", "Why does my {x} JavaScript loop never end?",
             "Explain recursion in {x} programming languages.", "How do I read a CSV file of {x} rows with pandas?"],
    "space": ["How far is the {x} planet Mars from the Sun?", "Why do {x} stars twinkle at night?",
              "What is a black hole made of, in {x} words?", "How do astronauts sleep on the {x} space station?"],
}
FILLERS = ["small", "large", "fresh", "old", "simple"]


def _free_form(tmp_path):
    # Answers of 5 to about 60 tokens: lengths to skew.
    rows = [{"prompt": t.format(x=x), "completion": f"An answer about {topic}: {x}." + " More detail." * (4 * j)}
            for topic, templates in TOPICS.items() for t in templates for j, x in enumerate(FILLERS)]
    path = tmp_path / "free.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, np.array([k for k, templates in enumerate(TOPICS.values()) for _ in templates for _ in FILLERS])


def test_length_buckets_cut_at_quantiles():
    ids, names = length_buckets(np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10]), 2)
    assert ids.tolist() == [0, 0, 1, 0, 1, 0, 1, 0, 1, 1] and names == ["len 1-5", "len 6-10"]
    ids, names = length_buckets(np.array([3, 3, 3, 3, 9]), 4)  # ties stay together: fewer buckets
    assert sorted(set(ids.tolist())) == [0, 1] and names == ["len 3-3", "len 9-9"]


def test_free_form_instructions_partition_by_embedding_clusters(tmp_path):
    from fedlora.experiment import prepare_data
    from fedlora.host import load_tokenizer

    path, topic = _free_form(tmp_path)
    base = ["task=causal-lm", "data.name=jsonl", f"data.path={path}", "data.test_fraction=0.2",
            "federation.num_clients=3", "federation.groups=3", "federation.alpha=0.1"]
    tok = load_tokenizer("embedded:SmolLM2-135M-Instruct")
    with pytest.raises(Exception, match="no partition key"):  # free-form: no classes to skew without groups
        prepare_data(load_config(None, base + ["federation.partition=dirichlet"]), tok)
    data = prepare_data(load_config(None, base + ["federation.partition=clusters"]), tok)
    stats = data.partition_stats
    # The report: each client's histogram over the 3 clusters, and how far it is from the global mix.
    assert [len(s["label_counts"]) for s in stats] == [3, 3, 3] and sum(s["size"] for s in stats) == 48
    assert "partition=clusters: Dirichlet(alpha=0.1) over 3 groups" in data.load_summary
    assert data.partition_groups == ["cluster 0", "cluster 1", "cluster 2"]  # what label_counts count
    assert np.mean([s["tv_from_global"] for s in stats]) > 0.3, stats  # skewed: iid would be near 0
    iid = prepare_data(load_config(None, base + ["federation.partition=iid"]), tok).partition_stats
    assert np.mean([s["tv_from_global"] for s in iid]) < 0.15
    # The clusters are the topics (MiniLM separates cooking, code and space questions).
    from fedlora.data.text_groups import embedding_clusters

    ids, _ = embedding_clusters([r["prompt"] for r in map(json.loads, path.read_text().splitlines())], 3, 0)
    purity = sum(np.bincount(topic[ids == k]).max() for k in range(3)) / len(ids)
    assert purity >= 0.9, purity


def test_length_partition_of_free_form_instructions(tmp_path):
    from fedlora.experiment import prepare_data
    from fedlora.host import load_tokenizer

    path, _ = _free_form(tmp_path)
    cfg = load_config(None, ["task=causal-lm", "data.name=jsonl", f"data.path={path}", "federation.num_clients=3",
                             "data.max_length=128",
                             "federation.partition=length", "federation.groups=3", "federation.alpha=0.1"])
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    assert "partition=length" in data.load_summary and "len " in data.load_summary
    lengths = [np.mean([len(x) for x in c.input_ids]) for c in data.clients]
    assert max(lengths) - min(lengths) > 10, lengths  # clients differ in typical length
    assert np.mean([s["tv_from_global"] for s in data.partition_stats]) > 0.3
    assert [g.startswith("len ") for g in data.partition_groups] == [True] * 3


def test_text_groups_are_for_instruction_records():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="task=causal-lm"):
        load_config(None, ["federation.partition=clusters"])  # the classifier's partitions skew labels
