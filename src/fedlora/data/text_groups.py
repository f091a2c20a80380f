"""Groups of unlabelled instruction records that non-IID partitions can skew: clusters of the prompts' sentence
embeddings, and quantile buckets of length. Each record gets a group id; a Dirichlet partition over the group ids
(partition.py) then gives each client its own mix of topics or lengths (docs/configuration.md defines both).
"""

from __future__ import annotations

import numpy as np

from fedlora.errors import UserError


def length_buckets(lengths: np.ndarray, groups: int) -> tuple[np.ndarray, list[str]]:
    """(bucket id per record, bucket names): `groups` buckets cut at the length quantiles 1/groups, 2/groups, ...
    (the observed length at or below each quantile closes a bucket: bucket b holds lengths in (edge[b-1], edge[b]]).
    Ties keep equal lengths in one bucket, so heavy ties give fewer, unequal buckets. Names read `len 12-30`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise UserError("no records to bucket by length")
    edges = np.unique(np.quantile(lengths, np.arange(1, groups) / groups, method="lower"))
    # Bucket ids renumbered over the buckets in use (an edge at the longest length leaves the last one empty).
    _, ids = np.unique(np.searchsorted(edges, lengths, side="left"), return_inverse=True)
    names = [f"len {lengths[ids == b].min()}-{lengths[ids == b].max()}" for b in range(int(ids.max()) + 1)]
    return ids.astype(np.int64), names


def embedding_clusters(texts: list[str], groups: int, seed: int, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """(cluster id per text, cluster names): k-means (scikit-learn, `groups` clusters, seeded) of the texts'
    sentence embeddings from the embedded all-MiniLM-L6-v2 (attention-masked mean of its last hidden states,
    L2-normalised: the embedding it was trained to give), computed offline on the CPU."""
    if len(texts) < groups:
        raise UserError(f"{len(texts)} records cannot form {groups} embedding clusters: lower federation.groups")
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise UserError("partition=clusters needs scikit-learn: pip install 'fedlora[instruct]'") from None
    vectors = sentence_embeddings(texts, batch_size)
    ids = KMeans(n_clusters=groups, n_init=4, random_state=seed).fit_predict(vectors)
    return ids.astype(np.int64), [f"cluster {k}" for k in range(groups)]


def sentence_embeddings(texts: list[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    import torch
    from transformers import AutoModel

    from fedlora.architectures import EMBEDDED_MODEL
    from fedlora.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = AutoModel.from_pretrained(resolve_model_path(EMBEDDED_MODEL), local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[s: s + batch_size]), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
    return np.concatenate(out).astype(np.float64)


def record_groups(cfg, prompts: list[str], lengths) -> tuple[np.ndarray, list[str]]:
    """(group id per record, group names) for partition=clusters (of the prompts' embeddings) or length
    (`lengths()`: each record's length in tokens as encoded for training; called only for this one)."""
    if cfg.federation.partition == "clusters":
        return embedding_clusters(prompts, cfg.federation.groups, cfg.seed)
    return length_buckets(np.asarray(lengths()), cfg.federation.groups)


def prompt_texts(tokenizer, enc) -> list[str]:
    """What each encoded record asks, to embed: its prompt tokens without what every record shares (the chat
    template's system turn and assistant header); a plain text (no prompt) is its own text."""
    prompts = [enc.input_ids[i][: enc.prompt_len[i]] for i in range(len(enc))]
    head = _common_prefix(prompts)
    tail = _common_prefix([p[head:][::-1] for p in prompts])
    texts = [tokenizer.decode(p[head: len(p) - tail], skip_special_tokens=True).strip() for p in prompts]
    return [t or a for t, a in zip(texts, enc.answers)]


def _common_prefix(seqs) -> int:
    n = min((len(q) for q in seqs), default=0)
    for k in range(n):
        if any(q[k] != seqs[0][k] for q in seqs):
            return k
    return n
