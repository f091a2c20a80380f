"""Multiple-choice scoring by log-likelihood, the lm-evaluation-harness way: no generation; each option's tokens
are scored as the completion of the prompt (the sum of their log-probabilities), the highest wins.

acc: the option of highest summed log-probability is the reference. acc_norm: the same after dividing each
option's log-probability by its length in characters (lm-evaluation-harness' acc_norm), so long options are not
penalised for having more tokens. An option's tokens are the tokenizer's encoding of its text alone, appended to
the prompt's tokens: how the task encodes a response for training (the end-of-turn token is not scored).
"""

from __future__ import annotations

import numpy as np

from fedlora.devices import model_device
from fedlora.errors import UserError

MAX_OPTIONS = 20


def closed_set(answers: list[str]) -> list[str]:
    """The options of a task whose answers are a few classes: its distinct reference answers."""
    options = sorted(set(answers))
    if not 2 <= len(options) <= MAX_OPTIONS:
        raise UserError(f"scorer multiple-choice needs 2..{MAX_OPTIONS} options: the held-out answers have "
                        f"{len(options)} distinct values (give a task file with a `choices` column)")
    return options


def option_logprobs(model, prompts: list[np.ndarray], options: list[list[np.ndarray]], pad_id: int,
                    batch_size: int) -> list[np.ndarray]:
    """Per prompt, the summed log-probability of each of its options' token ids following it."""
    import torch

    pairs = [(i, j) for i, opts in enumerate(options) for j in range(len(opts))]
    # Longest first, so each batch holds sequences of about one length (little padding); results go back by
    # (prompt, option), so the order changes nothing but the time.
    pairs.sort(key=lambda p: -(len(prompts[p[0]]) + len(options[p[0]][p[1]])))
    out = [np.zeros(len(opts)) for opts in options]
    device = model_device(model)
    with torch.inference_mode():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s: s + batch_size]
            seqs = [np.concatenate([prompts[i], options[i][j]]) for i, j in chunk]
            lens = [len(options[i][j]) for i, j in chunk]
            width, keep = max(len(q) for q in seqs), max(lens) + 1
            # Left padding: every option ends at the last position, so only the last `keep` positions need the
            # LM head (as the task's loss does).
            ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for row, q in enumerate(seqs):
                ids[row, width - len(q):] = q
                mask[row, width - len(q):] = 1
            ids_t = torch.from_numpy(ids).to(device)
            logits = model(input_ids=ids_t, attention_mask=torch.from_numpy(mask).to(device),
                           logits_to_keep=keep).logits[:, :-1]
            if logits.dtype in (torch.float16, torch.bfloat16):  # half precision: soft-max in float32
                logits = logits.float()
            targets = ids_t[:, width - (keep - 1):]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0].cpu().numpy()
            for row, ((i, j), n) in enumerate(zip(chunk, lens)):
                out[i][j] = float(logp[row, logp.shape[1] - n:].sum())
    return out


def choice_metrics(logprobs: list[np.ndarray], options: list[list[str]], answers: list[str]) -> dict:
    """acc and acc_norm over examples whose reference is one of its options (refused otherwise)."""
    picks, picks_norm, gold = [], [], []
    for lp, opts, answer in zip(logprobs, options, answers):
        if answer not in opts:
            raise UserError(f"scorer multiple-choice: the reference {answer!r} is not among its options {opts}")
        gold.append(opts.index(answer))
        picks.append(int(np.argmax(lp)))
        picks_norm.append(int(np.argmax(lp / np.asarray([max(len(o), 1) for o in opts], dtype=np.float64))))
    n = max(len(answers), 1)
    return {"acc": sum(p == g for p, g in zip(picks, gold)) / n,
            "acc_norm": sum(p == g for p, g in zip(picks_norm, gold)) / n,
            "outputs": [opts[p] for opts, p in zip(options, picks)]}


def score_choices(model, tokenizer, data, batch_size: int, pad_id: int,
                  choices: list[list[str]] | None = None) -> dict:
    """acc and acc_norm of `data` (EncodedData: prompts are `input_ids[:prompt_len]`, references `answers`);
    the options are `choices` per example, else the data's distinct answers for every example."""
    answers = list(data.answers)
    if choices is None:
        choices = [closed_set(answers)] * len(answers)
    encoded: dict[str, np.ndarray] = {}
    for opts in choices:
        for o in opts:
            if o not in encoded:
                encoded[o] = np.asarray(tokenizer(o, add_special_tokens=False)["input_ids"], dtype=np.int64)
                if len(encoded[o]) == 0:
                    raise UserError(f"scorer multiple-choice: option {o!r} has no tokens")
    prompts = [np.asarray(data.input_ids[i][: data.prompt_len[i]]) for i in range(len(answers))]
    logprobs = option_logprobs(model, prompts, [[encoded[o] for o in opts] for opts in choices], pad_id, batch_size)
    return choice_metrics(logprobs, choices, answers) | {"logprobs": [lp.tolist() for lp in logprobs]}
