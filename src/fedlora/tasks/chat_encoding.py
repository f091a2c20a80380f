"""Token ids and per-token loss masks for conversations (the model's chat template) and plain texts.

A conversation is rendered once with the chat template; each assistant turn's characters (its content and the
template's end-of-turn marker, not the assistant header before it nor the whitespace after it) are found by
rendering the conversation up to that turn, and the tokens whose characters fall inside those spans carry the
loss (the tokenizer's offset mapping). Prefix rendering is how the turn boundaries are known for any template;
a template that does not render prefixes as prefixes is refused with one line.
"""

from __future__ import annotations

import numpy as np

from fedlora.errors import UserError


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        # No template: role-tagged lines, the assistant's text ending with the end-of-sequence token.
        eos = tokenizer.eos_token or ""
        text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
        return text + ("assistant: " if generation_prompt else "")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of every assistant turn)."""
    full = render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:k], generation_prompt=True)
        through = render(tokenizer, messages[: k + 1]).rstrip()
        if not (full.startswith(head) and full.startswith(through) and len(through) > len(head)):
            raise UserError("the model's chat template does not render a conversation's turns as prefixes of "
                            "the whole; assistant-only loss cannot be located (use prompt-completion data)")
        spans.append((len(head), len(through)))
    return full, spans


def encode_conversation(tokenizer, messages: list[dict], max_len: int):
    """(ids, loss mask, generation prompt length, last answer) or None when truncation leaves no assistant token.

    Long conversations keep their start (cut at `max_len` tokens). The held-out score generates from the tokens
    before the last assistant turn that starts before the cut and compares with that turn's whole content."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]])
    ends = np.asarray([e for _, e in enc["offset_mapping"]])
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (ends <= b) & (ends > starts)
    turn_starts = [int(np.searchsorted(starts, a)) for a, _ in spans]
    ids, mask = ids[:max_len], mask[:max_len]
    mask[0] = False  # the first token has nothing before it to predict it
    kept = [k for k, t in enumerate(turn_starts) if 0 < t < len(ids)]
    if not mask.any() or not kept:
        return None
    # Scored on the last assistant turn that starts before the cut (the last one unless the cut fell in it).
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return ids, mask, turn_starts[kept[-1]], answers[kept[-1]]


def encode_text(tokenizer, text: str, max_len: int):
    """(ids, loss mask on every token but the first, 1, the text): language modelling of a plain text."""
    ids = tokenizer(text + (tokenizer.eos_token or ""), add_special_tokens=True)["input_ids"][:max_len]
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        return None
    mask = np.ones(len(ids), dtype=bool)
    mask[0] = False
    return ids, mask, 1, text


def encode_records(tokenizer, records, max_len: int):
    """(EncodedData of the records that keep a loss token, the key names its labels index).

    A record that truncation would leave without any loss token is counted in `records.bad` (`too_long`), not
    trained on; labels are partition-key ids (all 0, key "any", without `data.partition_column`)."""
    from fedlora.encoding import EncodedData

    items = records.texts if records.fmt == "text" else records.conversations
    ids, masks, prompt_len, answers, keys = [], [], [], [], []
    for item, key in zip(items, records.keys):
        if records.fmt == "text":
            out = encode_text(tokenizer, item, max_len)
        else:
            out = encode_conversation(tokenizer, item, max_len)
        if out is None:
            records.bad["too_long" if records.fmt != "text" else "too_short"] += 1
            continue
        if records.fmt == "text":
            out = (out[0], out[1], out[2], tokenizer.decode(out[0][1:], skip_special_tokens=True))
        ids.append(out[0])
        masks.append(out[1])
        prompt_len.append(out[2])
        answers.append(out[3])
        keys.append(key)
    names = sorted(set(keys)) if keys and any(keys) else ["any"]
    index = {k: i for i, k in enumerate(names)}
    labels = np.asarray([index.get(k, 0) for k in keys], dtype=np.int64)
    return EncodedData(ids, labels, np.asarray(prompt_len, np.int64), answers, masks), names
