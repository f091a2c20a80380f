"""DP-SGD round speed against the non-private batched round, before and after, side by side in one process.

    python bench/bench_dp_speed.py                                       # default experiment, 3 repeats
    python bench/bench_dp_speed.py --repeats 1 --dp-steps 2 --steps 6     # quicker

One round of the default experiment (MiniLM, rotten tomatoes, the default federation and DP recipe: expected
Poisson batch privacy.batch_size, privacy.local_steps; local steps shortened with --steps/--dp-steps, which
changes the round's length, not its per-sample cost), trained four ways from the same downlinks:

- non-private batched: `federation.batched_clients`, the default non-private path (`BatchedRound`);
- DP-SGD one by one, padded: each Poisson batch in one forward padded to its longest row (before);
- DP-SGD one by one, micro-batched: length-grouped micro-batches, clipped sums over them (`dp_tokens_per_chunk`);
- DP-SGD batched: the round's clients together (`PrivateBatchedRound`), micro-batched.

Each repeat runs the four in a rotated order; the table has the median round samples/s of each and its ratio to
the non-private batched round, and the machine's load before and after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

WAYS = ("non-private batched", "DP-SGD one by one, padded", "DP-SGD one by one, micro-batched", "DP-SGD batched")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="non-private local steps (default config: 25)")
    ap.add_argument("--dp-steps", type=int, default=3, help="DP-SGD local steps (default config: 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dp-tokens", type=int, default=None, help="DP micro-batch token budget (default: the device's)")
    ap.add_argument("overrides", nargs="*", help="config overrides for both (key=value)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedlora import lora
    from fedlora.batched import BatchedRound, why_not_batched
    from fedlora.batched_private import PrivateBatchedRound
    from fedlora.client import ClientTrainer
    from fedlora.config import load_config
    from fedlora.dp import SamplePrivacy
    from fedlora.experiment import prepare_data
    from fedlora.federated_run import build_strategy
    from fedlora.host import ModelHost, load_tokenizer
    from fedlora.server import Server

    plain_cfg = load_config(None, [f"federation.local_steps={args.steps}", *args.overrides])
    dp_cfg = load_config(None, [f"federation.local_steps={args.steps}", "privacy.mode=sample", "privacy.epsilon=3",
                                f"privacy.local_steps={args.dp_steps}", *args.overrides])
    data = prepare_data(plain_cfg, load_tokenizer(plain_cfg.model.name))
    host = ModelHost(plain_cfg, len(data.label_names), set(plain_cfg.client_ranks()))
    dims = lora.module_dims(host.model)
    plain = ClientTrainer(plain_cfg, host, build_strategy(plain_cfg, dims))
    private = ClientTrainer(dp_cfg, host, build_strategy(dp_cfg, dims))
    private.dp_tokens_per_chunk = args.dp_tokens
    head = lora.get_head(host.model, host.ensure_rank(max(plain_cfg.client_ranks())))
    server = Server(plain_cfg, plain.strategy, dims, head, [len(d) for d in data.clients])
    for tr, dp in ((plain, False), (private, True)):
        if why_not_batched(tr, 1, private=dp):
            raise SystemExit(f"bench_dp_speed: {why_not_batched(tr, 1, private=dp)}")
    clients = list(range(plain_cfg.federation.per_round()))
    jobs = [(c, server.downlink(c), data.clients[c]) for c in clients]

    # Each client's DP state is calibrated once (sigma for the target epsilon: a run does this once per client,
    # not per round) and copied fresh for every timed round, so the accountant's history does not grow.
    calibrated = {c: SamplePrivacy.for_client(dp_cfg, len(data.clients[c])).state_dict() for c in clients}

    def states():
        return {c: SamplePrivacy.from_state_dict(s) for c, s in calibrated.items()}

    def one_by_one(tokens, dps):
        private.dp_tokens_per_chunk = tokens
        return [private.train(c, d, x, dp=dps[c]) for c, d, x in jobs]

    run = {  # each takes the round's fresh DP states (made before the clock starts; unused by the first)
        WAYS[0]: lambda dps: BatchedRound(plain).train(jobs),
        WAYS[1]: lambda dps: one_by_one(0, dps),
        WAYS[2]: lambda dps: one_by_one(args.dp_tokens, dps),
        WAYS[3]: lambda dps: PrivateBatchedRound(private, args.dp_tokens).train(
            [(c, d, x, dps[c]) for c, d, x in jobs]),
    }
    load_before = open("/proc/loadavg").read().split()[:3]
    rates: dict[str, list[float]] = {w: [] for w in WAYS}
    for rep in range(args.repeats):
        for way in WAYS[rep % len(WAYS):] + WAYS[: rep % len(WAYS)]:
            dps = states()
            t0 = time.perf_counter()
            updates = run[way](dps)
            rates[way].append(sum(u.samples for u in updates) / (time.perf_counter() - t0))
            print(f"  repeat {rep + 1}: {way:<34} {rates[way][-1]:7.1f} samples/s", file=sys.stderr, flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]

    base = statistics.median(rates[WAYS[0]])
    print(f"{plain_cfg.strategy.name} on {plain_cfg.data.name}, {len(clients)} clients, rank(s) "
          f"{sorted(set(plain_cfg.client_ranks()))}; non-private: {args.steps} steps of {plain_cfg.federation.batch_size}; "
          f"DP-SGD: {args.dp_steps} steps, expected Poisson batch {dp_cfg.privacy.batch_size}, eps 3; "
          f"{args.threads} torch thread(s); medians of {args.repeats}")
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    print(f"| {'way':<34} | {'round samples/s':>15} | {'vs non-private':>14} | {'runs':<24} |")
    print(f"|{'-' * 36}|{'-' * 16}:|{'-' * 15}:|{'-' * 26}|")
    for way in WAYS:
        med = statistics.median(rates[way])
        runs = ", ".join(f"{r:.1f}" for r in rates[way])
        print(f"| {way:<34} | {med:>15.1f} | {med / base:>13.2f}x | {runs:<24} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
