"""Your own model, any architecture: default LoRA targets (PEFT's table, fedlora's, the module tree), fedlora's
mean-pooling head and the model's own head on every encoder, batched clients on multi-layer heads, export.

Every model is a small random-weight folder built from a transformers config (tests/tiny_models.py) with the
embedded MiniLM's tokenizer: nothing is downloaded and each run takes about a second.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedlora import lora
from fedlora.architectures import default_targets, known_targets, peft_lora_targets
from fedlora.config import load_config
from fedlora.engines import execute
from fedlora.errors import UserError
from tiny_models import MAX_PARAMS, minilm_tokenizer, save_tiny_model, tiny_size, write_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODERS = ["roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2", "mpnet"]
# The head each model's own classifier has (model.pooling=cls): every module of it must train and travel.
NATIVE_HEADS = {"roberta": ["classifier.dense", "classifier.out_proj"],
                "xlm-roberta": ["classifier.dense", "classifier.out_proj"],
                "distilbert": ["pre_classifier", "classifier"],
                "electra": ["classifier.dense", "classifier.out_proj"],
                "deberta-v2": ["pooler.dense", "classifier"],
                "mpnet": ["classifier.dense", "classifier.out_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Model folders built on first use, one per (model type, causal)."""
    root, built = tmp_path_factory.mktemp("models"), {}

    def get(model_type: str, causal: bool = False) -> str:
        key = (model_type, causal)
        if key not in built:
            built[key] = save_tiny_model(root / f"{model_type}-{int(causal)}", model_type, tokenizer, causal=causal)
        return built[key]

    return get


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"classification": write_csv(root / "labels.csv"), "causal-lm": write_csv(root / "qa.csv", 32, True)}


def run_config(folder: str, data: str, *extra: str):
    """The default config on a model folder and a small CSV: one round, two clients, two steps each."""
    return load_config(None, [f"model.name={folder}", "data.name=csv", f"data.path={data}",
                              "federation.num_clients=2", "federation.rounds=1", "federation.local_steps=2",
                              "federation.batch_size=4", "output.progress=false", *extra])


def one_line_refusal(exc: Exception) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"not a one-line refusal: {message!r}"
    return message


# -- default LoRA targets ----------------------------------------------------------------------------------------

def test_peft_table_read_from_source_is_peft_own_mapping():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as imported

    assert peft_lora_targets() == imported and len(imported) > 30


def test_config_resolves_peft_known_targets_without_importing_torch(folders):
    """Falcon is in PEFT's table only; the config resolves it while validating, and validating stays torch-free."""
    code = ("import sys; from fedlora.config import load_config; "
            f"c = load_config(None, ['model.name={folders('falcon')}']); "
            "print(c.lora.targets, 'torch' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['query_key_value']", "False", "False"]


def test_targets_come_from_peft_then_fedlora_then_the_module_tree(folders):
    from transformers import AutoModel

    assert known_targets(folders("bloom")) == ["query_key_value"]  # PEFT's table
    assert known_targets(folders("mpnet")) == ["q", "v"]  # fedlora's additions (PEFT has no mpnet)
    for kind in ("granite", "olmo2"):  # neither table: found in the loaded model's module tree
        folder = folders(kind)
        assert known_targets(folder) is None
        assert default_targets(folder, AutoModel.from_pretrained(folder)) == ["q_proj", "v_proj"]
        with pytest.raises(UserError, match="set lora.targets"):  # without the model: asked for, one line
            default_targets(folder)


class _Config:
    model_type, hidden_size = "homemade", 8


class _Homemade(torch.nn.Module):
    """No known names: `proj_in`, `mix`, `out`; and a `q_proj` that does not read the hidden state."""

    def __init__(self, with_q_v: bool):
        super().__init__()
        self.config = _Config()
        self.proj_in, self.mix, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        self.q_proj, self.v_proj = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
        if with_q_v:
            self.attn = torch.nn.ModuleDict({"query": torch.nn.Linear(8, 8), "value": torch.nn.Linear(8, 8)})


def test_module_tree_search_wants_the_names_and_the_shapes(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "homemade"}')
    assert default_targets(str(tmp_path), _Homemade(with_q_v=True)) == ["query", "value"]  # not the 4-wide q_proj
    with pytest.raises(UserError) as err:
        default_targets(str(tmp_path), _Homemade(with_q_v=False))
    message = one_line_refusal(err.value)
    assert "homemade" in message and "mix, out, proj_in, q_proj, v_proj" in message


# -- every model type of PEFT's table, and the families the issue names ------------------------------------------

# What the default config (task=classification, model.pooling=mean) refuses, and the words of the reason.
# (Architectures without a transformers classification model, e.g. CodeGen, RWKV, Granite, are loaded bare.)
REFUSED = {"t5": "encoder-decoder", "mt5": "encoder-decoder", "bart": "encoder-decoder"}
MATRIX = sorted(set(peft_lora_targets()) | {"distilbert", "mpnet", "granite", "olmo2", "phi3"})


def _buildable(model_type: str, causal: bool = False) -> None:
    """Skip what transformers cannot build small: not a transformers model type (chatglm, btlm, RefinedWeb),
    no such model class, or sub-models (a vision tower) that keep their full size."""
    try:
        size = tiny_size(model_type, causal)
    except Exception as exc:
        pytest.skip(f"transformers cannot build a {model_type} model: {type(exc).__name__}")
    if size > MAX_PARAMS:
        pytest.skip(f"a {model_type} model keeps {size / 1e6:.0f}M parameters at the small sizes")


@pytest.mark.parametrize("model_type", MATRIX)
def test_default_config_trains_a_round_or_refuses_in_one_line(model_type, folders, data_files, tmp_path):
    from fedlora.federated_run import Run

    _buildable(model_type)
    cfg = run_config(folders(model_type), data_files["classification"], "output.save_adapter=false")
    try:
        summary = execute(Run(cfg, tmp_path))
    except UserError as exc:
        assert model_type in REFUSED, f"{model_type} refused: {exc}"
        assert REFUSED[model_type] in one_line_refusal(exc)
        return
    assert model_type not in REFUSED, f"{model_type} trained, expected a refusal"
    assert np.isfinite(summary["final_accuracy"])


# Decoders train as causal LMs too: those without a classification model, and the families the issue names.
CAUSAL = ["codegen", "falcon", "bloom", "stablelm", "granite", "olmo2", "llama", "gpt2"]


@pytest.mark.parametrize("model_type", CAUSAL)
def test_decoders_train_a_causal_lm_round(model_type, folders, data_files, tmp_path):
    from fedlora.federated_run import Run

    _buildable(model_type, causal=True)
    cfg = run_config(folders(model_type, causal=True), data_files["causal-lm"], "task=causal-lm",
                     "output.save_adapter=false", "eval.max_new_tokens=2")
    summary = execute(Run(cfg, tmp_path))
    assert np.isfinite(summary["final_accuracy"])


# -- every encoder: the default head and the model's own, batched clients exact, export ------------------------

def _head_modules(head: dict) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in head}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_batched_equals_one_by_one_in_float64(model_type, pooling, folders, monkeypatch):
    """The default config (and model.pooling=cls, the model's own head of one or several layers): the clients of
    a round trained together change their factors and every head tensor as one by one, to 1e-6 in float64."""
    from test_batched import TINY, both_ways, change_gap

    cfg = load_config(None, [*TINY, "model.dtype=float64", "model.device=cpu", f"model.name={folders(model_type)}",
                             f"model.pooling={pooling}"])
    expected = {"classifier"} if pooling == "mean" else set(NATIVE_HEADS[model_type])
    for jobs, one, together in both_ways(cfg, 3):
        for update in one + together:
            assert _head_modules(update.head) == expected
            for name, h in update.head.items():  # every head tensor trained (and sent)
                assert not np.array_equal(h, jobs[0][1].head[name]), name
        # DeBERTa-v2's own head computes its loss in float32 (`logits.float()`), which one-by-one training uses;
        # batched training takes per-example losses in float64: the two then agree to float32 rounding only.
        assert change_gap(jobs, one, together) < (1e-4 if (model_type, pooling) == ("deberta-v2", "cls") else 1e-6)


@pytest.mark.parametrize("model_type, pooling", [("roberta", "mean"), ("distilbert", "cls")])
def test_export_reloads_with_peft_and_reproduces_the_logged_score(model_type, pooling, folders, data_files, tmp_path):
    """A non-BERT encoder's run folder: the adapter (LoRA + every head module) reloads with PEFT onto a base
    built with another head init, and scores the held-out set as the run logged it."""
    from peft import PeftModel

    from fedlora.checkpoint import load_checkpoint
    from fedlora.tasks.classification import evaluate_classifier
    from fedlora.experiment import prepare_data
    from fedlora.metrics import read_metrics
    from fedlora.host import load_base_model, load_exported_model, load_tokenizer
    from fedlora.runner import run_experiment

    cfg = run_config(folders(model_type), data_files["classification"], f"model.pooling={pooling}",
                     "federation.rounds=2")
    run_dir = run_experiment(cfg, out=tmp_path / "run", quiet=True)
    logged = read_metrics(run_dir)[-1]
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    base = load_base_model(cfg.model.name, 2, seed=cfg.seed + 99, pooling=pooling)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    loss, accuracy = evaluate_classifier(reloaded, data.test, 64, 0)
    assert accuracy == logged["eval_accuracy"] and loss == pytest.approx(logged["eval_loss"], rel=1e-5)
    assert evaluate_classifier(load_exported_model(run_dir / "adapter"), data.test, 64, 0) == (loss, accuracy)
    # Every head module is in the checkpoint and the adapter, as the server aggregated it.
    head = load_checkpoint(run_dir / "checkpoint")["server"]["head"]
    expected = {"classifier"} if pooling == "mean" else set(NATIVE_HEADS[model_type])
    assert _head_modules(head) == expected
    saved = {n for n, _ in reloaded.named_parameters() if ".modules_to_save." in n}
    assert {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in saved} == expected


def test_paper_ffa_roberta_config_trains_a_dp_round_on_a_roberta_folder(folders, data_files, tmp_path):
    """configs/paper-ffa-roberta.toml on a (tiny) RoBERTa folder: the paper's clients and DP-SGD, RoBERTa's own
    two-layer head trained under per-example clipping, every head tensor sent and aggregated; eps 3 by override."""
    from pathlib import Path

    from fedlora.federated_run import Run

    path = Path(__file__).parent.parent / "configs" / "paper-ffa-roberta.toml"
    cfg = load_config(path)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.federation.num_clients, cfg.privacy.delta) == (8, 8.0, 3, 1e-5)
    assert (cfg.optim.name, cfg.privacy.optim.name, cfg.privacy.epsilon) == ("sgd", "sgd", 6.0)
    cfg = load_config(path, [f"model.name={folders('roberta')}", "data.name=csv",
                             f"data.path={data_files['classification']}", "privacy.epsilon=3", "federation.rounds=1",
                             "privacy.local_steps=1", "privacy.batch_size=8", "output.save_adapter=false"])
    run = Run(cfg, tmp_path)
    start = {k: v.copy() for k, v in run.server.head.items()}
    summary = execute(run)
    assert _head_modules(start) == {"classifier.dense", "classifier.out_proj"}
    assert all(not np.array_equal(run.server.head[k], v) for k, v in start.items())
    assert 0 < summary["final_epsilon"] <= 3.0 + 1e-6
