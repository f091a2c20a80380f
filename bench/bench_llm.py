"""Causal-LM client training: fedlora's trainer against a bare PEFT loop on the same batches, and what
padding-free packing would gain. One table, medians over repeats, measured side by side in one process.

    python bench/bench_llm.py                  # embedded SmolLM2-135M-Instruct, 4 steps of 8, 3 repeats
    python bench/bench_llm.py --steps 8 --repeats 5 --batch 16

Rows (tokens = non-padding tokens of the batches, the same for every row):
- fedlora client: `ClientTrainer.train` on one client (downlink into the adapter, the loop, factors read back).
- bare PEFT loop: get_peft_model + AdamW + `model(**batch).loss` (transformers' loss over every position's
  logits), right-padded batches with labels -100 on the prompt and the padding: what a user writes by hand.
- bare PEFT, packed: the same loop on DataCollatorWithFlattening batches (one row per batch, no padding,
  position_ids restart per example). On CPU attention is SDPA, which does not isolate the packed examples, so
  this row measures the compute packing saves, not a training recipe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    from fedlora.client import ClientTrainer, shuffled_batches
    from fedlora.config import load_config
    from fedlora.experiment import prepare_data
    from fedlora.federated_run import build_strategy
    from fedlora.lora import module_dims
    from fedlora.host import ModelHost, load_tokenizer, resolve_model_path
    from fedlora.server import Server

    cfg = load_config("configs/llm.toml", [f"federation.local_steps={args.steps}", f"federation.batch_size={args.batch}",
                                           f"data.max_length={args.max_length}", "data.max_eval_examples=8"])
    tok = load_tokenizer(cfg.model.name)
    data = prepare_data(cfg, tok)
    client = data.clients[0]
    host = ModelHost(cfg, len(data.label_names), {cfg.lora.rank})
    strategy = build_strategy(cfg, module_dims(host.model))
    trainer = ClientTrainer(cfg, host, strategy)
    server = Server(cfg, strategy, module_dims(host.model), {}, [len(c) for c in data.clients])
    pad = tok.pad_token_id or 0
    # The batches fedlora's trainer draws for client 0 in round 1 (its own seeded RNG), reused by every row.
    batches = shuffled_batches(len(client), cfg.federation.batch_size, cfg.federation.local_steps,
                               np.random.default_rng([cfg.seed, 1, 0]))
    tokens = sum(int(len(client.input_ids[i])) for idx in batches for i in idx)
    padded = sum(len(idx) * max(len(client.input_ids[i]) for i in idx) for idx in batches)

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name), dtype=torch.float32).eval()
    bare = get_peft_model(base, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.targets,
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=cfg.optim.lr)

    def right_padded(idx):
        seqs = [client.input_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for r, (i, s) in enumerate(zip(idx, seqs)):
            ids[r, : len(s)], mask[r, : len(s)] = torch.from_numpy(s), 1
            p = int(client.prompt_len[i])
            labels[r, p: len(s)] = torch.from_numpy(s[p:])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    flatten = DataCollatorWithFlattening()

    def packed(idx):
        feats = []
        for i in idx:
            s, p = client.input_ids[i], int(client.prompt_len[i])
            feats.append({"input_ids": s.tolist(), "labels": [-100] * p + s[p:].tolist()})
        return flatten(feats)

    def bare_loop(make) -> float:
        start = time.perf_counter()
        for idx in batches:
            loss = bare(**make(idx)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def fedlora_client() -> float:
        return trainer.train(0, server.downlink(0), client).train_s

    rows = {"fedlora client": [], "bare PEFT loop": [], "bare PEFT, packed": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every row alike
        rows["fedlora client"].append(fedlora_client())
        rows["bare PEFT loop"].append(bare_loop(right_padded))
        rows["bare PEFT, packed"].append(bare_loop(packed))
    ref = statistics.median(rows["bare PEFT loop"])
    print(f"{args.steps} steps of {args.batch} (length <= {args.max_length}), {tokens} tokens "
          f"({padded} with padding: {1 - tokens / padded:.0%} padding), {args.repeats} repeats, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'row':<20} {'median s':>9} {'tokens/s':>9} {'vs bare':>8}")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"{name:<20} {t:>9.2f} {tokens / t:>9.1f} {ref / t:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
