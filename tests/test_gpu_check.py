"""The GPU check in its tiny CPU mode (so it cannot rot before a device runs it), its time boxes, its table and
the docs splice the GPU section is made with, and the FLOP count its MFU rests on."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fedlora.bench import gpu_check, gpu_sections
from fedlora.bench.gpu_llm import SHAPES, build_base, linear_params, train_flops_per_token
from fedlora.bench.gpu_table import END, START, render, splice


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0 and x == x


def test_the_tiny_check_runs_every_section_and_writes_the_table_the_docs_read(tmp_path):
    results = gpu_check.check(tmp_path, list(gpu_sections.SECTIONS), budget_s=600, tiny=True, isolated=False)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["schema"] == gpu_check.SCHEMA and on_disk["mode"] == "tiny (CPU)"
    sections = {s["name"]: s for s in on_disk["sections"]}
    assert list(sections) == list(gpu_sections.SECTIONS)
    assert all(s["status"] == "ok" and s["error"] is None and s["seconds"] > 0 for s in sections.values()), \
        [(s["name"], s["error"]) for s in on_disk["sections"]]

    env = on_disk["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["bf16_peak_TFLOPs"] is None

    (default,) = sections["default"]["rows"]
    assert default["rounds"] == 1 and len(default["accuracy_per_round"]) == 1
    assert 0.0 <= default["final_accuracy"] <= 1.0
    assert _positive(default["train_samples_per_s"]) and _positive(default["wall_s"])
    assert default["cpu_final_accuracy"] is None  # the CPU reference belongs to the full default run only

    batched = sections["batched"]["rows"]
    assert [r["clients"] for r in batched] == [2, 3]
    for r in batched:
        assert _positive(r["one_by_one_samples_per_s"]) and _positive(r["batched_samples_per_s"])
        assert r["speedup"] == pytest.approx(r["batched_samples_per_s"] / r["one_by_one_samples_per_s"])
        assert 0.0 <= r["max_change_diff"] < 1e-3  # the two ways train the same round (float32 rounding)

    plain, dp = sections["dp"]["rows"]
    assert plain["privacy"] == "none" and plain["epsilon"] is None and plain["vs_non_private"] == 1.0
    assert dp["privacy"] == "DP-SGD" and _positive(dp["epsilon"]) and _positive(dp["round_samples_per_s"])
    assert dp["vs_non_private"] == pytest.approx(dp["round_samples_per_s"] / plain["round_samples_per_s"])

    bare, ours = sections["llm"]["rows"]
    assert (bare["loop"], ours["loop"]) == ("bare PEFT", "fedlora client")
    for r in (bare, ours):
        assert r["model"] == "tiny" and r["params"] == sum(p.numel() for p in build_base("tiny", torch.float32,
                                                                                           torch.device("cpu")).parameters())
        assert _positive(r["tokens_per_s"]) and r["MFU"] is None and r["peak_mem_GiB"] is None  # no GPU, no peak
    assert ours["vs_bare"] == pytest.approx(ours["tokens_per_s"] / bare["tokens_per_s"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown == render(results)
    for s in on_disk["sections"]:
        assert s["title"] in markdown
    assert "| clients | local_steps | one_by_one_samples_per_s | batched_samples_per_s | speedup |" in markdown


def test_a_section_past_its_time_box_is_stopped_and_recorded(tmp_path):
    # The llm section needs torch, transformers and peft imported before its first row: never within 1.5 s.
    start = time.perf_counter()
    record = gpu_check.run_isolated("llm", 1.5, tmp_path, tiny=True, assets=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert record["status"] == "timed out" and "time box of 2 s" in record["error"] and record["rows"] == []


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    def broken(sizes):
        yield {"partial": 1.0}
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setitem(gpu_sections.SECTIONS, "broken", ("Broken", broken, 10))
    results = gpu_check.check(tmp_path, ["broken", "environment"], budget_s=60, tiny=True, isolated=False)
    broken_rec, env = results["sections"]
    assert broken_rec["status"] == "failed" and broken_rec["error"] == "RuntimeError: out of memory"
    assert broken_rec["rows"] == [{"partial": 1.0}]  # what it measured before failing is kept
    assert env["status"] == "ok" and env["rows"][0]["device"] == "cpu"
    assert "failed: `RuntimeError: out of memory`" in (tmp_path / "gpu_check.md").read_text()
    # A child that fails writes its error for the parent: here, a section that does not exist.
    assert gpu_check.run_child("nope", tmp_path / "part.json", tiny=False, assets=None) == 1
    assert json.loads((tmp_path / "part.json").read_text()) == {"rows": [], "error": "KeyError: 'nope'"}


def test_the_docs_section_is_replaced_between_its_markers_only(tmp_path):
    results = {"mode": "device", "started": "2027-01-01 00:00 UTC", "total_s": 300.0,
               "environment": {"device_name": "NVIDIA H200", "torch": "2.11.0"},
               "sections": [{"name": "batched", "title": "Batched", "status": "ok", "seconds": 12.0, "error": None,
                             "rows": [{"clients": 50, "speedup": 4.25, "max_change_diff": 3e-6}]}]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n{START}\nno GPU numbers yet\n{END}\nafter\n")
    assert gpu_check.main(["--render", str(tmp_path / "r.json"), "--into", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n" + START + "\n") and text.endswith(END + "\nafter\n")
    assert "no GPU numbers yet" not in text and "| 50 | 4.250 | 3.00e-06 |" in text and "NVIDIA H200" in text
    with pytest.raises(ValueError, match="markers"):
        splice("a page without markers", "x")


def test_the_flop_count_covers_every_matrix_product_of_the_model():
    model = build_base("tiny", torch.float32, torch.device("cpu"))
    in_linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear_params(model.config) == in_linears
    c = model.config
    assert train_flops_per_token(c, 16) == 4 * in_linears + 12 * c.num_hidden_layers * 16 * c.hidden_size
    # The named device shapes are the sizes the check claims (about 135M, 1B and 7B parameters).
    from transformers import LlamaConfig

    def total(shape):
        cfg = LlamaConfig(**SHAPES[shape])
        emb = cfg.vocab_size * cfg.hidden_size
        norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
        return linear_params(cfg) + emb * (0 if cfg.tie_word_embeddings else 1) + norms

    assert 0.13e9 < total("llama-135m") < 0.14e9 and 1.2e9 < total("llama-1b") < 1.3e9
    assert 6.6e9 < total("llama-7b") < 6.8e9
