"""Black-box input canaries for the sample-level (DP-SGD) audit: mislabelled sentences, each inserted on a fair
coin into the audited client's real training data, scored by how much the released global model's loss on them
dropped (loss under the initial global model minus loss under the final one). They go through DP-SGD exactly
as real examples do (Poisson sampling, per-example clipping, noise); the adversary sees only the two models.
This is a weak audit by design: a mislabelled sentence's gradient is far from the worst case, and the final
model averages away most of what one client's steps did.

Classification only: the sentences are held-out sentences the run does not evaluate on, with a wrong label.
Random-token canaries for the causal LM are not built (the sample-level audit there runs the white-box
canaries alone and says so in its report).
"""

from __future__ import annotations

import numpy as np
import torch

from fedlora.encoding import EncodedData

NOT_BUILT_CAUSAL = ("black-box input canaries are built for classification only (random-token canaries for the "
                    "causal LM are not built): only the white-box canaries ran")


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


def with_examples(data: EncodedData, extra: EncodedData) -> EncodedData:
    """A classification client's data with `extra` appended (its own order kept: the canaries come last)."""
    if data.prompt_len is not None or data.answers is not None or data.loss_mask is not None:
        raise ValueError("input canaries are appended to classification data only")
    return EncodedData(list(data.input_ids) + list(extra.input_ids), np.concatenate([data.labels, extra.labels]))


def global_losses(run, data: EncodedData) -> np.ndarray:
    """Each example's loss under the server's current global model, as the run's task computes it."""
    from fedlora.devices import to_device
    from fedlora.experiment import load_global

    host, task = run.host, run.host.task
    host.model.set_adapter(load_global(run.cfg, host, run.server))
    pad = host.tokenizer.pad_token_id or 0
    out = []
    with torch.inference_mode():
        for s in range(0, len(data), run.cfg.eval.batch_size):
            idx = np.arange(s, min(s + run.cfg.eval.batch_size, len(data)))
            out.append(task.loss_per_example(host.model, to_device(task.collate(data, idx, pad), host.device))
                       .float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
