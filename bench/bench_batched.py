"""Batched clients vs one by one, and sorted vs unsorted evaluation, side by side in one process.

    python bench/bench_batched.py                          # FFA, 5 and 10 clients, embedded model and data
    python bench/bench_batched.py --clients 10 50 --steps 3 strategy.name=fedit

Each repeat trains the same round (same downlinks, same batches) both ways, alternating which goes first, and
prints the median samples/s of each and their ratio; the two ways' updates are compared too (max relative
difference of the change, which tests/test_batched.py bounds). Evaluation: the held-out set in length order
(what fedlora does) vs in its stored order, same batch size; both give the same accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--steps", type=int, default=5, help="local steps per client")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedlora import lora
    from fedlora.batched import BatchedRound, why_not_batched
    from fedlora.bench.gpu_sections import relative_change_gap
    from fedlora.client import ClientTrainer, collate
    from fedlora.tasks.classification import evaluate_classifier
    from fedlora.config import load_config
    from fedlora.experiment import prepare_data
    from fedlora.federated_run import build_strategy
    from fedlora.host import ModelHost, load_tokenizer, model_device, to_device
    from fedlora.server import Server

    widest = max(args.clients)
    cfg = load_config(None, [f"federation.num_clients={widest}", f"federation.local_steps={args.steps}",
                             "federation.partition=iid", *args.overrides])
    data = prepare_data(cfg, load_tokenizer(cfg.model.name))
    host = ModelHost(cfg, len(data.label_names), set(cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    trainer = ClientTrainer(cfg, host, build_strategy(cfg, dims))
    head = lora.get_head(host.model, host.ensure_rank(max(cfg.client_ranks())))
    server = Server(cfg, trainer.strategy, dims, head, [len(d) for d in data.clients])
    if why_not_batched(trainer, 1, private=False):
        raise SystemExit(f"bench_batched: {why_not_batched(trainer, 1, private=False)}")

    print(f"{cfg.strategy.name}, ranks {sorted(set(cfg.client_ranks()))}, {args.steps} local steps of batch "
          f"{cfg.federation.batch_size}, {args.threads} thread(s), medians of {args.repeats}")
    print(f"{'clients':>7} {'one by one samples/s':>21} {'batched samples/s':>18} {'ratio':>6} {'max change diff':>16}")
    for k in args.clients:
        jobs = [(c, server.downlink(c), data.clients[c]) for c in range(k)]
        one_sps, batched_sps, gaps = [], [], []
        for rep in range(args.repeats):
            order = ("one", "batched") if rep % 2 == 0 else ("batched", "one")
            out = {}
            for way in order:
                t0 = time.perf_counter()
                out[way] = [trainer.train(c, d, x) for c, d, x in jobs] if way == "one" \
                    else BatchedRound(trainer).train(jobs)
                seconds = time.perf_counter() - t0
                samples = sum(u.samples for u in out[way])
                (one_sps if way == "one" else batched_sps).append(samples / seconds)
            gaps.append(max(relative_change_gap(a, b, d) for a, b, (_, d, _) in zip(out["one"], out["batched"], jobs)))
        one, bat = statistics.median(one_sps), statistics.median(batched_sps)
        print(f"{k:>7} {one:>21.1f} {bat:>18.1f} {bat / one:>5.2f}x {max(gaps):>16.2e}")

    # Evaluation: length-sorted batches (fedlora's) against the stored order.
    test = data.test
    adapter = host.ensure_rank(max(cfg.client_ranks()))
    host.model.set_adapter(adapter)
    sorted_eps, plain_eps, accs = [], [], set()
    for rep in range(args.repeats):
        for way in (("sorted", "plain") if rep % 2 == 0 else ("plain", "sorted")):
            t0 = time.perf_counter()
            if way == "sorted":
                _, acc = evaluate_classifier(host.model, test, cfg.eval.batch_size, host.tokenizer.pad_token_id or 0)
            else:
                acc = _unsorted_accuracy(host.model, test, cfg.eval.batch_size, host.tokenizer.pad_token_id or 0,
                                         collate, model_device, to_device)
            (sorted_eps if way == "sorted" else plain_eps).append(len(test) / (time.perf_counter() - t0))
            accs.add(round(acc, 9))
    s, p = statistics.median(sorted_eps), statistics.median(plain_eps)
    print(f"eval ({len(test)} examples, batch {cfg.eval.batch_size}): sorted {s:.1f} ex/s, stored order {p:.1f} ex/s "
          f"({s / p:.2f}x); accuracies {sorted(accs)}")
    return 0


@torch.inference_mode()
def _unsorted_accuracy(model, data, batch_size, pad_id, collate, model_device, to_device) -> float:
    correct = 0
    for s in range(0, len(data), batch_size):
        idx = np.arange(s, min(s + batch_size, len(data)))
        batch = to_device(collate(data, idx, pad_id), model_device(model))
        correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / max(len(data), 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
