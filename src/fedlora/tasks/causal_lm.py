"""Causal language modelling: federated instruction tuning of a decoder-only LM.

Examples are (prompt, response) records: a csv/jsonl file (`data.prompt_column`, `data.response_column`), a
Hugging Face dataset with those columns, or an embedded labelled set turned into instructions whose answer is
the label's name (rotten_tomatoes: "positive"/"negative", bbc_news: the topic); or records in TRL's formats
(messages, prompt-completion, text: chat_data.py reads and checks them, chat_encoding.py masks them per token,
and a key column can drive the partitions). The model's chat template is
applied when it has one (`data.system_prompt` as the system turn). The loss covers the response tokens only,
averaged per example, then over the batch (what DP-SGD's per-example clipping expects). The score is
`eval.scorer`'s (fedlora.scoring): by default generation-based, greedy decoding of `eval.max_new_tokens` from
each held-out prompt, batched with left padding, counted correct when the normalised output starts with the
normalised reference answer (label-match; for one-word answers this is exact match up to case, punctuation and
trailing text); or exact match, ROUGE-L, or multiple-choice log-likelihood (tasks/choice_scoring.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fedlora.devices import model_device, to_device
from fedlora.scoring import DEFAULT_SCORER, LIKELIHOOD_SCORERS, generation_scorer, label_match, normalise  # noqa: F401
from fedlora.tasks.base import Task

# What an embedded labelled set asks; the answer is the label's name.
INSTRUCTIONS = {
    "rotten_tomatoes": ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
                        "Review: {text}"),
    "bbc_news": ("What is the topic of this news article: business, entertainment, politics, sports or tech? "
                 "Answer with one word.\n\nArticle: {text}"),
}


def matches(generated: str, answer: str) -> bool:
    """label-match (fedlora.scoring), the default scorer."""
    return bool(label_match(generated, answer))


class CausalLM(Task):
    name = "causal-lm"

    # -- data ------------------------------------------------------------------------------------------------
    def _records(self, cfg, name: str | None = None, path: str | None = None):
        """(prompts, responses, answer classes, answer names, load summary) of a whole dataset."""
        from fedlora.data import load_text_dataset
        from fedlora.errors import UserError

        d = cfg.data
        name, path = name or d.name, path or d.path
        if name in INSTRUCTIONS:
            ds, report = load_text_dataset(name)
            prompts = [INSTRUCTIONS[name].format(text=t) for t in ds.texts]
        elif name in ("csv", "jsonl") or "/" in name:
            # The file loaders clean, de-duplicate and report; the response column stands in as the label.
            ds, report = load_text_dataset(name, path=path, text_column=d.prompt_column, label_column=d.response_column)
            prompts = list(ds.texts)
        else:
            raise UserError(f"data.name={name!r} has no instruction form for task=causal-lm: use "
                            f"{', '.join(INSTRUCTIONS)}, csv, jsonl or a Hugging Face dataset id")
        responses = [ds.label_names[y] for y in ds.labels]
        classes, names = np.asarray(ds.labels, dtype=np.int64), list(ds.label_names)
        # Few distinct answers (a classification in instruction form) are classes: label-skewed partitions and
        # a stratified held-out set apply. Free-form answers are one class: iid partitions only.
        if len(names) > 50:
            classes, names = np.zeros(len(responses), dtype=np.int64), ["any"]
        return prompts, responses, classes, names, report.summary()

    def _trl_records(self, cfg, name: str | None = None, path: str | None = None):
        """The source's records in a TRL format (messages, prompt-completion, text), or None for classic
        prompt/response records and the embedded sets."""
        from fedlora.errors import UserError
        from fedlora.tasks.chat_data import detect_format, read_rows, source_columns, to_records

        name, path = name or cfg.data.name, path or cfg.data.path
        if name in INSTRUCTIONS:
            return None
        fmt = detect_format(source_columns(name, path), cfg.data)
        if fmt is None and name == "parquet":
            raise UserError("parquet files take the TRL formats only: a messages, prompt+completion or text column")
        if fmt is None:
            return None
        rows, unparseable = read_rows(name, path)
        return to_records(rows, fmt, cfg.data, unparseable)

    def _trl_data(self, cfg, tokenizer):
        """(encoded records, key names, load summary, train, test, client parts) of TRL-format data."""
        from fedlora.data.text_groups import prompt_texts, record_groups
        from fedlora.tasks.chat_encoding import encode_records

        records = self._trl_records(cfg)
        if records is None:
            return None
        enc, names = encode_records(tokenizer, records, cfg.data.max_length)

        def groups():
            return record_groups(cfg, prompt_texts(tokenizer, enc), lambda: [len(x) for x in enc.input_ids])

        train, test, parts = self._partition(cfg, enc.labels, names, "records have no partition key", groups)
        return enc, names, records.summary(), train, test, parts

    def _partition(self, cfg, classes, names, why_one: str, groups=None):
        """The one split and partition, on the answer classes or partition keys (as classification on labels);
        partition=clusters|length: split stratified by, and Dirichlet over, the records' groups (`groups()`).
        Sets `self.skew`: (what the partition skews per record, its names, a line describing it)."""
        from fedlora.data import partition_indices, stratified_split_indices
        from fedlora.errors import UserError

        fed = cfg.federation
        self.skew = (classes, names, "")
        if fed.partition in GROUP_SCHEMES:
            ids, group_names = groups()
            self.skew = (ids, group_names, f"partition={fed.partition}: Dirichlet(alpha={fed.alpha}) over "
                                           f"{len(group_names)} groups: {', '.join(group_names)}")
            train, test = stratified_split_indices(ids, cfg.data.test_fraction, seed=cfg.seed)
            return train, test, partition_indices(ids[train], fed.num_clients, "dirichlet", alpha=fed.alpha,
                                                  seed=cfg.seed)
        if len(names) == 1 and fed.partition not in ("iid", "quantity"):  # quantity skew reads no classes
            raise UserError(f"{why_one} to skew: use federation.partition=iid, quantity, clusters or length, or "
                            "set data.partition_column")
        train, test = stratified_split_indices(classes, cfg.data.test_fraction, seed=cfg.seed)
        parts = partition_indices(classes[train], fed.num_clients, fed.partition, alpha=fed.alpha, seed=cfg.seed,
                                  label_fractions=fed.label_fractions)
        return train, test, parts

    def _split(self, cfg, tokenizer=None):
        """Classic prompt/response records: split and partition on the answer classes (or groups)."""
        from fedlora.data.text_groups import record_groups
        from fedlora.errors import UserError

        if cfg.data.partition_column:
            raise UserError("data.partition_column applies to messages, prompt-completion and text records only")
        prompts, responses, classes, names, summary = self._records(cfg)

        def groups():  # lengths as encoded for training
            return record_groups(cfg, prompts, lambda: [
                len(x) for x in self.encode(cfg, tokenizer, prompts, responses, classes).input_ids])

        train, test, parts = self._partition(cfg, classes, names, "free-form responses have no classes", groups)
        return prompts, responses, classes, names, summary, train, test, parts

    def encode(self, cfg, tokenizer, prompts: list[str], responses: list[str], classes: np.ndarray,
               shots: tuple = ()):
        """Chat-templated prompt + response + end of turn; the prompt's content is cut so the response fits.
        `shots` (evaluation): demonstrations before every prompt, on top of `data.max_length`."""
        from fedlora.encoding import EncodedData

        eos = tokenizer.eos_token or ""
        head = len(prompt_ids(tokenizer, "", cfg.data.system_prompt))
        max_len = cfg.data.max_length + len(prompt_ids(tokenizer, "", cfg.data.system_prompt, shots)) - head
        ids, prompt_len = [], []
        for prompt, response in zip(prompts, responses):
            answer = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
            budget = max(1, cfg.data.max_length - head - len(answer))
            content = tokenizer(prompt, add_special_tokens=False)["input_ids"][:budget]
            p = prompt_ids(tokenizer, tokenizer.decode(content), cfg.data.system_prompt, shots)
            seq = (p + answer)[:max_len]
            ids.append(np.asarray(seq, dtype=np.int64))
            prompt_len.append(min(len(p), len(seq) - 1))  # at least one response token carries loss
        return EncodedData(ids, np.asarray(classes, np.int64), np.asarray(prompt_len, np.int64), list(responses))

    def _encode_rows(self, cfg, tokenizer, prompts, responses, classes, rows: np.ndarray):
        return self.encode(cfg, tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows], classes[rows])

    def prepare_data(self, cfg, tokenizer):
        from fedlora.data import partition_stats
        from fedlora.encoding import FederatedData

        trl = self._trl_data(cfg, tokenizer)
        if trl is not None:
            enc, names, summary, train, test, parts = trl
            test = capped(cfg, test)
            return FederatedData(clients=[enc.subset(train[p]) for p in parts], test=enc.subset(test),
                                 label_names=names, partition_stats=partition_stats(self.skew[0][train], parts),
                                 load_summary=_with_skew(summary, self.skew[2]), partition_groups=self._groups(cfg))
        prompts, responses, classes, names, summary, train, test, parts = self._split(cfg, tokenizer)
        test = capped(cfg, test)
        train_enc = self._encode_rows(cfg, tokenizer, prompts, responses, classes, train)
        return FederatedData(
            clients=[train_enc.subset(p) for p in parts],
            test=self._encode_rows(cfg, tokenizer, prompts, responses, classes, test),
            label_names=names,
            partition_stats=partition_stats(self.skew[0][train], parts),
            load_summary=_with_skew(summary, self.skew[2]),
            partition_groups=self._groups(cfg),
        )

    def _groups(self, cfg) -> list[str] | None:
        """The names of the groups a partition=clusters|length report counts (None: it counts label_names)."""
        return list(self.skew[1]) if cfg.federation.partition in GROUP_SCHEMES else None

    def held_out(self, cfg, tokenizer):
        """The held-out set exactly as `prepare_data` builds it, without tokenizing the training split."""
        trl = self._trl_data(cfg, tokenizer)
        if trl is not None:
            return trl[0].subset(capped(cfg, trl[4]))
        prompts, responses, classes, _, _, _, test, _ = self._split(cfg, tokenizer)
        return self._encode_rows(cfg, tokenizer, prompts, responses, classes, capped(cfg, test))

    def client_data(self, cfg, tokenizer, client_id):
        from fedlora.errors import UserError

        if not 0 <= client_id < cfg.federation.num_clients:
            raise UserError(f"partition-id {client_id} outside 0..{cfg.federation.num_clients - 1}")
        trl = self._trl_data(cfg, tokenizer)
        if trl is not None:
            enc, names, _, train, _, parts = trl
            return enc.subset(train[np.asarray(parts[client_id])]), names
        prompts, responses, classes, names, _, train, _, parts = self._split(cfg, tokenizer)
        return self._encode_rows(cfg, tokenizer, prompts, responses, classes, train[np.asarray(parts[client_id])]), names

    def file_data(self, cfg, path, tokenizer, label_names):
        from fedlora.tasks.chat_encoding import encode_records

        kind = "jsonl" if str(path).lower().endswith((".jsonl", ".json")) else "csv"
        kind = "parquet" if str(path).lower().endswith(".parquet") else kind
        records = self._trl_records(cfg, kind, path)
        if records is not None:
            enc, names = encode_records(tokenizer, records, cfg.data.max_length)
            index = {a: i for i, a in enumerate(label_names)}
            enc.labels = np.array([index.get(names[k], -1) for k in enc.labels], dtype=np.int64)
            return enc
        prompts, responses, _, _, _ = self._records(cfg, kind, path)
        # Answers outside the federation's classes get -1 (none), never a real class: the class only drives
        # partitions and label statistics; training and scoring read the answer text.
        index = {a: i for i, a in enumerate(label_names)}
        classes = np.array([index.get(a, -1) for a in responses], dtype=np.int64)
        return self.encode(cfg, tokenizer, prompts, responses, classes)

    # -- training and scoring --------------------------------------------------------------------------------
    def collate(self, data, idx, pad_id):
        """Left-padded ids and mask (every response ends at the last position); `labels` holds the response
        tokens, -100 on the prompt and the padding. Left padding changes nothing a rotary-position model
        computes (attention depends on relative positions, pads are masked) and lets the loss read the LM
        head on the last few positions only: the head is a fifth of SmolLM2's forward at these lengths."""
        import torch

        seqs = [data.input_ids[i] for i in idx]
        width = max((len(s) for s in seqs), default=1)
        ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        labels = np.full((len(seqs), width), -100, dtype=np.int64)
        for row, (i, s) in enumerate(zip(idx, seqs)):
            start, p = width - len(s), int(data.prompt_len[i])
            ids[row, start:] = s
            mask[row, start:] = 1
            if data.loss_mask is None:
                labels[row, start + p:] = s[p:]
            else:  # multi-turn or plain text: the example's own per-token mask
                labels[row, start:] = np.where(data.loss_mask[i], s, -100)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}

    def loss_per_example(self, module, batch):
        """Each example's mean next-token loss on its response tokens (`loss` is their mean)."""
        import torch

        labels = batch["labels"]
        # The earliest loss token in the (left-padded) batch decides how many final positions need logits:
        # k positions predict the last k - 1 tokens (the final position predicts past the sequence). For
        # responses at the end this is the longest response.
        counted_any = (labels != -100).any(dim=0)
        answer = labels.shape[1] - int(counted_any.int().argmax()) if bool(counted_any.any()) else 0
        keep = answer + 1
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        logits_to_keep=keep).logits
        labels = labels.to(logits.device)
        targets = labels[:, labels.shape[1] - answer:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
            reduction="none").view(targets.shape)
        counted = (targets != -100).sum(dim=1).clamp(min=1)
        return token_loss.sum(dim=1) / counted

    def evaluate(self, model, data, batch_size, pad_id):
        """(mean response loss, the score of `eval.scorer`)."""
        report = self.evaluate_report(model, data, batch_size, pad_id)
        return report["loss"], report["score"]

    def evaluate_report(self, model, data, batch_size, pad_id, scorer: str | None = None,
                        choices: list[list[str]] | None = None) -> dict:
        """loss, score and the scorer's own figures (multiple-choice: acc, acc_norm) of the active model on
        `data`; `choices`: per-example options for multiple-choice (default: the data's distinct answers)."""
        import torch

        scorer = scorer or self.scorer
        score_one = None if scorer in LIKELIHOOD_SCORERS else generation_scorer(scorer)
        order = np.argsort([len(x) for x in data.input_ids], kind="stable")
        total, outputs, points = 0.0, [""] * len(order), np.zeros(len(order))
        with torch.inference_mode():
            device = model_device(model)
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                total += float(self.loss(model, to_device(self.collate(data, idx, pad_id), device))) * len(idx)
                if score_one is not None:
                    generated = self.generate(model, [data.input_ids[i][: data.prompt_len[i]] for i in idx], pad_id,
                                              self.max_new_tokens)
                    for o, i in zip(generated, idx):
                        outputs[i], points[i] = o, score_one(o, data.answers[i])
        n = max(len(order), 1)
        report = {"loss": total / n, "scorer": scorer, "examples": len(order)}
        if score_one is None:
            from fedlora.tasks.choice_scoring import score_choices

            figures = score_choices(model, self.tokenizer, data, batch_size, pad_id, choices)
            return report | figures | {"score": figures["acc"]}
        # Summed in the order the batches ran (as before per-example outputs were kept): the same float.
        return report | {"score": float(sum(points[i] for i in order)) / n, "outputs": outputs,
                         "points": points.tolist()}

    def eval_protocol(self, cfg, shots: int = 0) -> dict:
        """How the held-out score is computed: scorer, shots, prompt template (stated in every report)."""
        chat = getattr(self.tokenizer, "chat_template", None)
        template = (f"chat template sha256:{hashlib.sha256(str(chat).encode()).hexdigest()[:12]}" if chat
                    else "plain: prompt, newline")
        if cfg.data.name in INSTRUCTIONS:
            template += f"; instruction {cfg.data.name}"
        return {"scorer": self.scorer, "shots": shots, "template": template,
                "system_prompt": cfg.data.system_prompt,
                "max_new_tokens": None if self.scorer in LIKELIHOOD_SCORERS else self.max_new_tokens}

    max_new_tokens = 8  # set from cfg.eval.max_new_tokens when the run's model is built
    scorer = DEFAULT_SCORER  # set from cfg.eval.scorer when the run's model is built

    def generate(self, model, prompts: list[np.ndarray], pad_id: int, max_new_tokens: int) -> list[str]:
        """Greedy continuations of token-id prompts, batched with left padding; decoded, special tokens cut."""
        import torch

        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        device = model_device(model)
        out = model.generate(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]

    # -- model -----------------------------------------------------------------------------------------------
    def base_model(self, cfg, num_outputs):
        from fedlora.models import load_causal_lm, load_tokenizer, quantization_config

        self.max_new_tokens, self.scorer = cfg.eval.max_new_tokens, cfg.eval.scorer
        self.tokenizer = load_tokenizer(cfg.model.name)
        return load_causal_lm(cfg.model.name, cfg.seed, quantization_config(cfg), cfg.model.dtype)

    def lora_options(self, cfg, base) -> dict[str, Any]:
        # No head: the (tied) embeddings and the LM head stay frozen; only LoRA factors train and travel.
        return {"task_type": "CAUSAL_LM", "modules_to_save": None}

    def export_meta(self, cfg, label_names) -> dict[str, Any]:
        return {"task": self.name, "model": cfg.model.name, "seed": cfg.seed, "label_names": label_names,
                "system_prompt": cfg.data.system_prompt, "max_new_tokens": cfg.eval.max_new_tokens}

    def load_exported(self, meta):
        from fedlora.models import load_causal_lm

        return load_causal_lm(meta["model"], meta.get("seed", 0))


GROUP_SCHEMES = ("clusters", "length")


def _with_skew(summary: str, line: str) -> str:
    return f"{summary}\n{line}" if line else summary


def capped(cfg, test: np.ndarray) -> np.ndarray:
    """The held-out rows kept under `data.max_eval_examples`: a sorted draw seeded by the run's seed."""
    cap = cfg.data.max_eval_examples
    if cap is not None and len(test) > cap:
        return test[np.sort(np.random.default_rng(cfg.seed).choice(len(test), cap, replace=False))]
    return test


def prompt_ids(tokenizer, content: str, system_prompt: str | None, shots: tuple = ()) -> list[int]:
    """The prompt as the model sees it: its chat template (system turn, user turn, assistant opening) when it
    has one, else the plain text and a newline. `shots`: (prompt, answer) demonstrations, each a user turn and
    an assistant turn before the prompt (few-shot as multi-turn; plain text: prompt, newline, answer, blank line)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            turn for p, a in shots for turn in ({"role": "user", "content": p}, {"role": "assistant", "content": a})
        ] + [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    demos = "".join(f"{p}\n{a}\n\n" for p, a in shots)
    return tokenizer(demos + content + "\n", add_special_tokens=True)["input_ids"]
