"""task=causal-lm on the real embedded SmolLM2-135M-Instruct at tiny sizes: the prompt format (chat template),
the response-only loss, generation-based scoring, FFA's frozen shared A, a mixed-rank method, DP-SGD with
Opacus, the exported adapter outside fedlora, and the Flower engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedlora
from fedlora import lora
from fedlora.config import load_config
from fedlora.tasks.causal_lm import matches, normalise

# Flower messages need a sender identity (conftest.server_task_identity).
pytestmark = pytest.mark.usefixtures("one_torch_thread", "server_task_identity")

TINY = ["task=causal-lm", "data.max_length=80", "data.max_eval_examples=24", "data.system_prompt=Answer with one word.",
        "federation.num_clients=2", "federation.rounds=1", "federation.local_steps=2", "federation.batch_size=4",
        "federation.partition=iid", "optim.lr=2e-3", "eval.batch_size=12", "eval.max_new_tokens=3",
        "output.progress=false"]


def test_answers_are_compared_normalised():
    assert normalise(" Positive.\n") == "positive"
    assert matches("Positive.", "positive") and matches("negative review", "Negative")
    assert not matches("not positive", "positive") and not matches("", "positive") and not matches("pos", "positive")


@pytest.fixture(scope="module")
def llm():
    from fedlora.experiment import prepare_data
    from fedlora.host import ModelHost, load_tokenizer

    cfg = load_config(None, TINY)
    tokenizer = load_tokenizer(cfg.model.name)
    data = prepare_data(cfg, tokenizer)
    return cfg, tokenizer, data, ModelHost(cfg, len(data.label_names), {8})


@pytest.mark.slow
def test_defaults_and_the_chat_template(llm):
    cfg, tok, data, _ = llm
    assert cfg.model.name == "embedded:SmolLM2-135M-Instruct" and cfg.lora.targets == ["q_proj", "v_proj"]
    text = tok.decode(data.test.input_ids[0])
    p = int(data.test.prompt_len[0])
    assert text.startswith("<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(data.test.input_ids[0][:p]).endswith("<|im_start|>assistant\n")
    assert tok.decode(data.test.input_ids[0][p:]) == data.test.answers[0] + tok.eos_token
    assert set(data.test.answers) <= {"negative", "positive"} and data.label_names == ["negative", "positive"]


@pytest.mark.slow
def test_loss_covers_response_tokens_only(llm):
    cfg, tok, data, host = llm
    task, idx = host.task, np.arange(6)
    batch = task.collate(data.test, idx, tok.pad_token_id)
    for row, i in enumerate(idx):
        n, p = len(data.test.input_ids[i]), int(data.test.prompt_len[i])
        labels = batch["labels"][row].numpy()
        response = labels[labels != -100]
        assert np.array_equal(response, data.test.input_ids[i][p:]) and len(response) == n - p
        assert batch["attention_mask"][row].sum() == n
    host.model.set_adapter("r8")
    with torch.inference_mode():
        got = float(task.loss(host.model, batch))
        # Reference: each example alone, unpadded, full logits; the mean over its response tokens.
        ref = []
        for i in idx:
            s = torch.tensor(data.test.input_ids[i])[None]
            p = int(data.test.prompt_len[i])
            target = s[0, 1:].clone()
            target[: p - 1] = -100
            ref.append(float(torch.nn.functional.cross_entropy(host.model(input_ids=s).logits[0, :-1], target,
                                                              ignore_index=-100)))
    assert got == pytest.approx(np.mean(ref), rel=1e-4)


@pytest.mark.slow
def test_generation_scoring_and_ffa_keeps_A(llm):
    from fedlora.client import ClientTrainer, evaluate
    from fedlora.federated_run import build_strategy
    from fedlora.server import Server

    cfg, tok, data, host = llm
    loss, acc = evaluate(host, "r8", data.test, 12)
    outs = host.task.generate(host.model, [data.test.input_ids[i][: data.test.prompt_len[i]] for i in range(12)],
                              tok.pad_token_id, 3)
    manual = [matches(o, a) for o, a in zip(outs, data.test.answers[:12])]
    _, acc12 = host.task.evaluate(host.model, data.test.subset(np.arange(12)), 12, tok.pad_token_id)
    assert acc12 == pytest.approx(np.mean(manual)) and 0 <= acc <= 1 and np.isfinite(loss)
    dims = lora.module_dims(host.model)
    assert len(dims) == 60  # 30 layers x (q_proj, v_proj); embeddings and the tied LM head are not adapted
    strategy = build_strategy(cfg, dims)
    server = Server(cfg, strategy, dims, lora.get_head(host.model, "r8"), [len(c) for c in data.clients])
    assert server.head == {}
    trainer = ClientTrainer(cfg, host, strategy)
    updates = [trainer.train(c, server.downlink(c), data.clients[c]) for c in range(2)]
    init = lora.initial_factors(cfg.seed, dims, 8, cfg.lora.scale(8))
    for u in updates:
        assert all(np.array_equal(f.A, init[m].A) for m, f in u.factors.items())  # A frozen and shared
        assert any(np.abs(f.B).max() > 0 for f in u.factors.values()) and u.head == {}
    trainable = [n for n, p in host.model.named_parameters() if p.requires_grad]
    assert trainable == []  # nothing left trainable after the round (embeddings never were)


@pytest.mark.slow
def test_run_learns_exports_and_reloads_outside_fedlora(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.models import load_tokenizer, resolve_model_path
    from fedlora.tasks.causal_lm import CausalLM

    result = fedlora.run(None, overrides=TINY + ["federation.local_steps=3"], out=tmp_path / "llm")
    summary = result.summary
    assert summary["final_accuracy"] > summary["accuracy_before"] + 0.2, summary
    row = result.metrics[-1]
    assert row["bytes_up"] == 2 * 30 * (576 + 192) * 8 * 4  # 2 clients x 30 layers x B of q_proj and v_proj
    # Outside fedlora: transformers + PEFT on the converted folder, then the same generation scoring.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:SmolLM2-135M-Instruct"))
    model = PeftModel.from_pretrained(base.eval(), str(result.adapter_path)).eval()
    from fedlora.experiment import prepare_data

    cfg = load_config(result.run_dir / "config.toml")
    tok = load_tokenizer(cfg.model.name)
    test = prepare_data(cfg, tok).test
    task = CausalLM()
    task.tokenizer, task.max_new_tokens = tok, cfg.eval.max_new_tokens
    _, acc = task.evaluate(model, test, 12, tok.pad_token_id)
    assert abs(acc - summary["final_accuracy"]) <= 0.01
    # And `fedlora generate` answers with the fine-tuned model.
    from fedlora.cli import main

    assert main(["generate", str(result.run_dir), "Is the sentiment of this movie review positive or negative? "
                 "Answer with one word.\n\nReview: a wonderful, moving film."]) == 0


@pytest.mark.slow
def test_mixed_ranks_and_dp_sgd_on_the_llm(tmp_path):
    from opacus.accountants import RDPAccountant

    rbla = fedlora.run(None, overrides=TINY + ["strategy.name=rbla", "federation.ranks=[2, 4]",
                                               "output.save_adapter=false"], out=tmp_path / "rbla")
    assert rbla.metrics[-1]["ranks"] == {"0": 2, "1": 4} and np.isfinite(rbla.metrics[-1]["eval_loss"])
    dp = fedlora.run(None, overrides=TINY + ["privacy.mode=sample", "privacy.epsilon=3", "privacy.batch_size=4",
                                             "privacy.local_steps=2", "privacy.optim.lr=0.05",
                                             "output.save_adapter=false"], out=tmp_path / "dp")
    row = dp.metrics[-1]
    acc = RDPAccountant()
    acc.history = [(row["noise_multiplier"], row["sample_rate"], row["dp_steps"])]
    assert 0 < row["epsilon"] <= 3 and acc.get_epsilon(delta=row["delta"]) == pytest.approx(row["epsilon"], rel=1e-3)


@pytest.mark.slow
def test_the_flower_engine_runs_the_llm_task(tmp_path):
    from test_flower_loop import InProcessGrid, _nodes  # the in-process Grid double (and its fixture below)

    from fedlora.engines.flower import FlowerOptions
    from fedlora.engines.flower_client import make_client_app
    from fedlora.engines.flower_server import run_on_grid
    from fedlora.experiment import make_run_dir
    from fedlora.federated_run import Run
    from fedlora.metrics import read_metrics

    cfg = load_config(None, TINY + ["output.save_adapter=false"])
    run_on_grid(Run(cfg, make_run_dir(cfg, str(tmp_path / "fl"))), InProcessGrid(make_client_app(), _nodes(2)),
                FlowerOptions(node_wait_s=0.0))
    rows = read_metrics(tmp_path / "fl")
    assert rows[0]["clients"] == [0, 1] and rows[0]["bytes_up"] > 0
    assert json.loads((tmp_path / "fl" / "summary.json").read_text())["rounds"] == 1


def test_device_and_precision_choices_are_checked_in_one_line():
    from fedlora.config import ConfigError
    from fedlora.errors import UserError
    from fedlora.models import quantization_config, resolve_device

    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            quantization_config(load_config(None, TINY + ["model.quantize=4bit"]))
    with pytest.raises(ConfigError, match="gradient_checkpointing does not work with privacy.mode=sample"):
        load_config(None, TINY + ["model.gradient_checkpointing=true", "privacy.mode=sample", "privacy.epsilon=3"])
    with pytest.raises(ConfigError, match="model.quantize is for task=causal-lm"):
        load_config(None, ["model.quantize=8bit"])
    with pytest.raises(ConfigError, match="quantized base"):
        load_config(None, TINY + ["model.quantize=4bit", "strategy.name=flora"])


@pytest.mark.slow
def test_a_bfloat16_base_with_gradient_checkpointing_trains_float32_lora(tmp_path):
    """dtype and checkpointing on the CPU: the base runs in bfloat16, the LoRA factors stay float32."""
    result = fedlora.run(None, overrides=TINY + ["model.dtype=bfloat16", "model.gradient_checkpointing=true",
                                                 "output.save_adapter=false", "data.max_eval_examples=12"],
                         out=tmp_path / "bf16")
    row = result.metrics[-1]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["eval_loss"]) and row["bytes_up"] > 0
    from fedlora.host import ModelHost

    host = ModelHost(load_config(None, TINY + ["model.dtype=bfloat16"]), 2, {8})
    dtypes = {p.dtype for n, p in host.model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in host.model.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.float32} and base == {torch.bfloat16}


@pytest.mark.slow
def test_every_strategy_and_client_level_dp_aggregate_llm_updates(llm):
    """One round of every registered method on the LLM's real LoRA updates (2 clients, 1 step each; mixed
    ranks where the method takes them), and a client-level DP round: the next global adapter is finite, and
    FFA sends exactly half of FedIT's LoRA bytes (no head on a causal LM)."""
    from fedlora.client import ClientTrainer
    from fedlora.federated_run import build_strategy
    from fedlora.server import Server
    from fedlora.strategies import available_strategies, strategy_class

    cfg0, tok, data, host = llm
    dims = lora.module_dims(host.model)
    uplink = {}
    cases = [(name, []) for name in available_strategies()] + [("ffa", ["privacy.mode=client",
                                                                         "privacy.noise_multiplier=1.0"])]
    for name, extra in cases:
        ranks = "[4, 8]" if strategy_class(name).supports_mixed_ranks else "[8]"
        cfg = load_config(None, TINY + [f"strategy.name={name}", f"federation.ranks={ranks}",
                                        "federation.local_steps=1", *extra])
        for r in set(cfg.client_ranks()):
            host.ensure_rank(r)
        strategy = build_strategy(cfg, dims)
        server = Server(cfg, strategy, dims, {}, [len(c) for c in data.clients])
        trainer = ClientTrainer(cfg, host, strategy)
        sampled = [0, 1] if not extra else server.sample_clients() or [0]
        updates = [trainer.train(c, server.downlink(c), data.clients[c]) for c in sampled]
        outcome = server.finish_round(updates, sampled)
        assert outcome.trained == sampled and not outcome.rejected, (name, outcome.rejected)
        rank, glob = server.global_eval_factors()
        assert all(np.isfinite(f.A).all() and np.isfinite(f.B).all() for f in glob.values()), name
        if not extra:
            uplink[name] = outcome.bytes_up / len(sampled)
    # Per client: FFA at ranks 4/8 sends B only; FedIT at rank 8 sends A and B (square q_proj, 576x192 v_proj).
    per_layer_ffa = ((576 + 192) * 4 + (576 + 192) * 8) / 2 * 4  # mean over the two clients' ranks
    assert uplink["ffa"] == 30 * per_layer_ffa
    assert uplink["fedit"] == 30 * ((576 + 576) + (192 + 576)) * 8 * 4
