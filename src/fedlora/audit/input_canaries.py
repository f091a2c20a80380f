"""Black-box input canaries for the sample-level (DP-SGD) audit, each inserted on a fair coin into the audited
client's real training data and scored by how much the released global model's loss on it dropped (loss under
the initial global model minus loss under the final one, as the task computes a training example's loss). They
go through DP-SGD exactly as real examples do (Poisson sampling, per-example clipping, noise); the adversary
sees only the two models. This is a weak audit by design: a canary's gradient is far from the worst case, and
the final model averages away most of what one client's steps did.

Classification: held-out sentences the run does not evaluate on, with a wrong label (`mislabelled`).
Causal LM: random-token sequences (`random_token_canaries`), a prompt and a response of tokens drawn uniformly
from the vocabulary, the loss on the response: training on real text moves every canary's loss alike, inserted
or not, so only training on a canary itself sets it apart. Canaries that lose the coin are generated the same
way but never inserted.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.encoding import EncodedData

PROMPT_TOKENS, RESPONSE_TOKENS = 8, 16  # a random-token canary's length, cut to data.max_length


def unused_held_out(full_test: EncodedData, evaluated: EncodedData) -> EncodedData:
    """The held-out sentences the run does not evaluate on (`full_test` is the held-out split before
    data.max_eval_examples cut it), in their split order."""
    seen = {tuple(x.tolist()) for x in evaluated.input_ids}
    return full_test.subset(np.array([i for i, x in enumerate(full_test.input_ids) if tuple(x.tolist()) not in seen],
                                     np.int64))


def mislabelled(pool: EncodedData, count: int, num_labels: int, seed: int) -> EncodedData:
    """`count` sentences of `pool` (drawn at random), each with a label other than its own, drawn at random."""
    rng = np.random.default_rng([seed, 0x1AB])
    picked = pool.subset(np.sort(rng.choice(len(pool), count, replace=False)))
    shift = rng.integers(1, num_labels, size=count)
    return EncodedData(picked.input_ids, (picked.labels + shift) % num_labels)


def random_token_canaries(tokenizer, count: int, seed: int, max_length: int) -> EncodedData:
    """`count` random-token records for the causal LM: PROMPT_TOKENS then RESPONSE_TOKENS ids drawn uniformly
    from the tokenizer's non-special ids (cut so the whole fits `max_length`), the response carrying the loss.
    Deterministic in `seed`. Raw token ids, no chat template: the template's fixed tokens would be the same in
    every canary and tell none apart. Labels (answer classes) are -1: none of the run's classes."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special], np.int64)
    prompt = min(PROMPT_TOKENS, max(1, max_length // 3))
    response = min(RESPONSE_TOKENS, max_length - prompt)
    if response < 1:
        raise ValueError(f"data.max_length={max_length} leaves no room for a random-token canary")
    rng = np.random.default_rng([seed, 0x70C])
    ids = vocab[rng.integers(0, len(vocab), size=(count, prompt + response))]
    return EncodedData(list(ids), np.full(count, -1, np.int64), np.full(count, prompt, np.int64),
                       [tokenizer.decode(row[prompt:]) for row in ids])


def with_examples(data: EncodedData, extra: EncodedData) -> EncodedData:
    """A client's data with `extra` appended (its own order kept: the canaries come last). Causal-LM data keeps
    its prompt lengths and answers; when its records carry per-token loss masks (TRL formats), `extra`'s masks
    are its response tokens (everything after the prompt)."""
    if (data.prompt_len is None) != (extra.prompt_len is None):
        raise ValueError("input canaries must be of the client's task: prompt/response records or classification")
    ids, labels = list(data.input_ids) + list(extra.input_ids), np.concatenate([data.labels, extra.labels])
    if data.prompt_len is None:
        return EncodedData(ids, labels)
    masks = None
    if data.loss_mask is not None:
        masks = list(data.loss_mask) + (list(extra.loss_mask) if extra.loss_mask is not None else
                                        [np.arange(len(x)) >= p for x, p in zip(extra.input_ids, extra.prompt_len)])
    return EncodedData(ids, labels, np.concatenate([data.prompt_len, extra.prompt_len]),
                       list(data.answers) + list(extra.answers), masks)


def losses(task, model, data: EncodedData, batch_size: int, pad_id: int, device) -> np.ndarray:
    """Each example's loss under `model`, as `task` computes a training example's loss (the causal LM: mean
    next-token loss over the response tokens)."""
    from fedlora.devices import to_device

    out = []
    with torch.inference_mode():
        for s in range(0, len(data), batch_size):
            idx = np.arange(s, min(s + batch_size, len(data)))
            out.append(task.loss_per_example(model, to_device(task.collate(data, idx, pad_id), device))
                       .float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def global_losses(run, data: EncodedData) -> np.ndarray:
    """Each example's loss under the server's current global model."""
    from fedlora.experiment import load_global

    host = run.host
    host.model.set_adapter(load_global(run.cfg, host, run.server))
    return losses(host.task, host.model, data, run.cfg.eval.batch_size, host.tokenizer.pad_token_id or 0,
                  host.device)
