"""Suite `paper-rbla-digits`: the RBLA authors' own kind of experiment, offline, on scikit-learn's digits.

Protocol (arXiv 2408.08699's small-model setting, rebuilt on data that ships in a package): 8x8 digit images
(1,797, 10 classes, a fixed stratified 80/20 split); an MLP 64-H-H-10 whose every layer is a LoRA on a frozen
random weight (W0 fixed, seeded), biases trained and averaged, no separate head; 10 clients with ranks
int(R·ratio), ratio 0.1..1.0; partitions one-label-per-client and Dirichlet 0.1; ranks aligned with client size
(the largest client gets the largest rank) or reversed; SGD lr 0.01 momentum 0.9, one local epoch per round.

Aggregation is fedlora's registered strategies through their `aggregate` / `downlink` API (rbla, zeropad, ...):
this module only trains the clients (torch) and moves factors. Biases: weighted mean over the round's clients.
scikit-learn is an optional extra (`pip install 'fedlora[bench]'`); without it the suite refuses in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.bench import plots
from fedlora.bench.common import SuiteOutput
from fedlora.bench.tables import fmt_mean_std, md_table
from fedlora.config import LoraConfigSection
from fedlora.errors import UserError
from fedlora.strategies import LoraFactors, get_strategy

NAME = "paper-rbla-digits"
SKLEARN_MISSING = (f"fedlora bench {NAME} needs scikit-learn (its digits data set): "
                   "pip install 'fedlora[bench]' (or pip install scikit-learn)")
NUM_CLIENTS = 10
LR, MOMENTUM, BATCH = 0.01, 0.9, 32

# label -> (strategy name, options)
METHODS: dict[str, tuple[str, dict]] = {
    "rbla": ("rbla", {}), "rbla γ=0.5": ("rbla", {"gamma": 0.5}), "rbla γ=1": ("rbla", {"gamma": 1.0}),
    "zeropad": ("zeropad", {}), "flexlora": ("flexlora", {}), "ffa": ("ffa", {}),
}


@dataclass(frozen=True)
class Size:
    seeds: tuple[int, ...]
    rounds: int
    hidden: int
    r_max: int
    methods: tuple[str, ...]
    local_epochs: int
    scalings: tuple[str, ...]
    partitions: tuple[str, ...] = ("one-label", "dirichlet-0.1")
    assignments: tuple[str, ...] = ("aligned", "reversed")
    skip: tuple[tuple[str, str], ...] = ()  # (scaling, partition) pairs not run
    estimate: str = ""


SIZES: dict[str, Size] = {
    # 36 runs; RBLA plateaus within ~50 rounds, zero-padding still climbs at 150, so 300 rounds of 3 local epochs.
    # alpha/r only on one-label: there 11 of 12 runs diverge within 20 rounds (the rank-1 client's scale is 16).
    "full": Size(seeds=(0, 1, 2), rounds=300, hidden=64, r_max=16, local_epochs=3,
                 methods=("rbla", "zeropad"), scalings=("constant", "alpha/r"),
                 skip=(("alpha/r", "dirichlet-0.1"),),
                 estimate="about 8 min on one idle core (36 runs of up to 15 s), several times that on a busy machine"),
    "quick": Size(seeds=(0,), rounds=20, hidden=32, r_max=8, methods=("rbla", "zeropad"), scalings=("alpha/r",), local_epochs=1,
                  estimate="under a minute"),
    "smoke": Size(seeds=(0,), rounds=2, hidden=16, r_max=8, methods=("rbla", "zeropad"), scalings=("alpha/r",), local_epochs=1,
                  partitions=("dirichlet-0.1",), assignments=("aligned",), estimate="seconds (tests only)"),
}


def alpha_for(scaling: str, r_max: int) -> float:
    """alpha such that the widest client's scale is 1 under every rule: the rules then differ only in how much
    larger the scale of a lower rank is (alpha/r: r_max/r; rsLoRA: sqrt(r_max/r); constant: 1)."""
    return {"alpha/r": float(r_max), "rslora": math.sqrt(r_max), "constant": 1.0}[scaling]


def client_ranks_by_ratio(r_max: int, n: int = NUM_CLIENTS) -> list[int]:
    """int(R·ratio) for ratio = 0.1, 0.2, ..., 1.0 (at least 1)."""
    return [max(1, int(r_max * (i + 1) / n)) for i in range(n)]


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test): pixels / 16, a fixed stratified 80/20 split (seed 0 for every run)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(SKLEARN_MISSING) from None
    d = load_digits()
    X, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(0.2 * len(idx)))]] = True
    return X[~test], y[~test], X[test], y[test]


def partition(y: np.ndarray, kind: str, rng: np.random.Generator, n: int = NUM_CLIENTS) -> list[np.ndarray]:
    """Index sets per client: one-label (client k holds every example of label k) or Dirichlet(0.1) per class
    (redrawn until every client has at least 10 examples)."""
    if kind == "one-label":
        return [np.flatnonzero(y == k) for k in range(n)]
    alpha = float(kind.split("-", 1)[1])
    for _ in range(1000):
        parts = [[] for _ in range(n)]
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 10:
            return [np.array(sorted(p)) for p in parts]
    raise RuntimeError("could not draw a Dirichlet partition with >= 10 examples per client")


def assign_ranks(sizes: list[int], ranks: list[int], assignment: str) -> list[int]:
    """aligned: the k-th largest client gets the k-th largest rank; reversed: the k-th largest the k-th smallest."""
    order = sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))  # largest first
    by_rank = sorted(ranks, reverse=(assignment == "aligned"))
    out = [0] * len(sizes)
    for k, r in zip(order, by_rank):
        out[k] = r
    return out


@dataclass(frozen=True)
class DigitsRun:
    method: str
    scaling: str
    partition: str
    assignment: str
    seed: int
    rounds: int
    hidden: int
    r_max: int
    local_epochs: int

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class _Net:
    """The MLP as plain tensors: layer l computes x W0ᵀ + b + s·(x Aᵀ) Bᵀ; ReLU between layers."""

    def __init__(self, dims: list[int], seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.W0, self.b0 = [], []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, seeded: the frozen random weights
            self.W0.append((torch.rand(d_out, d_in, generator=g) * 2 - 1) * bound)
            self.b0.append(((torch.rand(d_out, generator=g) * 2 - 1) * bound).numpy().astype(np.float64))

    def modules(self) -> list[str]:
        return [f"layer{i}" for i in range(len(self.W0))]

    def forward(self, x, A, B, s, b):
        import torch

        for i, W in enumerate(self.W0):
            x = x @ W.T + b[i] + s[i] * ((x @ A[i].T) @ B[i].T)
            if i < len(self.W0) - 1:
                x = torch.relu(x)
        return x


def _tensors(factors: dict[str, LoraFactors], biases: list[np.ndarray], modules: list[str]):
    import torch

    A = [torch.tensor(factors[m].A, dtype=torch.float32) for m in modules]
    B = [torch.tensor(factors[m].B, dtype=torch.float32) for m in modules]
    b = [torch.tensor(v, dtype=torch.float32) for v in biases]
    return A, B, [float(factors[m].scale) for m in modules], b


def predict(net: _Net, factors, biases, X: np.ndarray) -> np.ndarray:
    import torch

    A, B, s, b = _tensors(factors, biases, net.modules())
    with torch.no_grad():
        return net.forward(torch.from_numpy(X), A, B, s, b).argmax(-1).numpy()


def truncated(factors: dict[str, LoraFactors], k: int) -> dict[str, LoraFactors]:
    """The global adapter with its slots above k cut off (same scale: ΔW_k = s·B[:, :k]·A[:k])."""
    return {m: LoraFactors(A=f.A[:k], B=f.B[:, :k], scale=f.scale) for m, f in factors.items()}


def train_client(net: _Net, factors, biases, X, y, train_A: bool, rng: np.random.Generator, epochs: int):
    """`epochs` local epochs of SGD (lr 0.01, momentum 0.9, batch 32) from the downlink; (factors, biases)."""
    import torch

    modules = net.modules()
    A, B, s, b = _tensors(factors, biases, modules)
    params = [*B, *b] + (A if train_A else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    order = np.concatenate([rng.permutation(len(y)) for _ in range(epochs)])
    for start in range(0, len(order), BATCH):
        idx = torch.from_numpy(order[start: start + BATCH])
        loss = torch.nn.functional.cross_entropy(net.forward(Xt[idx], A, B, s, b), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {m: LoraFactors(A=A[i].detach().double().numpy(), B=B[i].detach().double().numpy(), scale=s[i])
           for i, m in enumerate(modules)}
    return out, [v.detach().double().numpy() for v in b]


def run_one(spec: DigitsRun, data=None) -> dict:
    """Train one federation; returns its numbers (accuracy per round, final cut-off accuracies, class fractions)."""
    import torch

    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = data or load_digits_split()
    rng = np.random.default_rng([spec.seed, 7])
    parts = partition(ytr, spec.partition, rng)
    sizes = [len(p) for p in parts]
    ranks = assign_ranks(sizes, client_ranks_by_ratio(spec.r_max), spec.assignment)
    lcfg = LoraConfigSection(rank=spec.r_max, alpha=alpha_for(spec.scaling, spec.r_max), scaling=spec.scaling)
    net = _Net([64, spec.hidden, spec.hidden, 10], seed=1000 + spec.seed)
    modules = net.modules()
    init_rng = np.random.default_rng([spec.seed, 11])
    # Seeded LoRA init (A kaiming-uniform-like, B = 0), float32-representable so FFA's shared A stays bit-exact.
    init = {}
    for m, d_in, d_out in zip(modules, net.dims[:-1], net.dims[1:]):
        A0 = init_rng.uniform(-1, 1, (spec.r_max, d_in)) / math.sqrt(d_in)
        init[m] = LoraFactors(A=A0.astype(np.float32).astype(np.float64), B=np.zeros((d_out, spec.r_max)),
                              scale=lcfg.scale(spec.r_max))
    name, options = METHODS[spec.method]
    strategy = get_strategy(name, **options, scale_for_rank=lcfg.scale, seed=spec.seed, initial_factors=init)
    biases = [v.copy() for v in net.b0]
    result = None
    curve = []
    client_rngs = [np.random.default_rng([spec.seed, 13, k]) for k in range(NUM_CLIENTS)]
    for _ in range(spec.rounds):
        ups, new_b = [], []
        for k in range(NUM_CLIENTS):
            r = ranks[k]
            down = result.downlink(r) if result is not None else {
                m: LoraFactors(A=f.A[:r].copy(), B=f.B[:, :r].copy(), scale=lcfg.scale(r)) for m, f in init.items()}
            f, bk = train_client(net, down, biases, Xtr[parts[k]], ytr[parts[k]], strategy.trains_A, client_rngs[k],
                                 spec.local_epochs)
            ups.append(f)
            new_b.append(bk)
        if not all(np.isfinite(x.B).all() and np.isfinite(x.A).all() for u in ups for x in u.values()):
            # A client's SGD blew up (a large scale times lr): the federation is lost; recorded, not raised.
            diverged_round = len(curve) + 1
            curve += [0.0] * (spec.rounds - len(curve))
            return {"spec": asdict(spec), "client_sizes": sizes, "client_ranks": ranks, "accuracy_curve": curve,
                    "final_accuracy": 0.0, "last10_accuracy": 0.0, "diverged": True,
                    "diverged_round": diverged_round, "cutoff_accuracy": {}, "pred_fractions": [],
                    "test_examples": int(len(yte))}
        result = strategy.aggregate(ups, sizes)
        w = np.asarray(sizes, float) / sum(sizes)
        biases = [sum(wk * bk[i] for wk, bk in zip(w, new_b)) for i in range(len(modules))]
        glob = result.downlink(spec.r_max)
        curve.append(float((predict(net, glob, biases, Xte) == yte).mean()))
    glob = result.downlink(spec.r_max)
    pred = predict(net, glob, biases, Xte)
    cut = {str(k): float((predict(net, truncated(glob, k), biases, Xte) == yte).mean()) for k in sorted(set(ranks))}
    return {"spec": asdict(spec), "client_sizes": sizes, "client_ranks": ranks, "accuracy_curve": curve,
            "final_accuracy": curve[-1], "last10_accuracy": float(np.mean(curve[-10:])),
            "cutoff_accuracy": cut, "pred_fractions": np.bincount(pred, minlength=10).tolist(),
            "test_examples": int(len(yte)), "diverged": False}


def specs(size: Size) -> list[DigitsRun]:
    return [DigitsRun(m, sc, p, a, seed, size.rounds, size.hidden, size.r_max, size.local_epochs)
            for sc in size.scalings for p in size.partitions for a in size.assignments for m in size.methods
            for seed in size.seeds if (sc, p) not in size.skip]


def ensure_all(out: Path, size: Size, console: Console) -> tuple[list[dict], list[dict]]:
    """Every run of the size, cached as runs/<key>.json (an interrupted suite resumes)."""
    data = load_digits_split()
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    results, log = [], []
    todo = specs(size)
    for i, spec in enumerate(todo, 1):
        path = folder / f"{spec.key()}.json"
        if path.exists():
            res, status = json.loads(path.read_text()), "cached"
        else:
            t0 = time.perf_counter()
            res = run_one(spec, data)
            res["seconds"] = time.perf_counter() - t0
            path.write_text(json.dumps(res))
            status = "ran"
        results.append(res)
        desc = f"{spec.method} {spec.scaling} {spec.partition} {spec.assignment} seed={spec.seed}"
        log.append({"spec": desc, "run_dir": str(path.relative_to(out)), "status": status,
                    "seconds": res.get("seconds", 0.0)})
        console.print(f"[bold]{NAME}[/bold] [{i}/{len(todo)}] {desc:<48} {status:<7} acc {res['final_accuracy']:.3f} "
                      f"{res.get('seconds', 0.0):5.1f} s")
    return results, log


def _pick(results, **want) -> list[dict]:
    return [r for r in results if all(r["spec"][k] == v for k, v in want.items())]


def _paired(results, a: str, b: str, **where) -> str:
    """mean ± std over seeds of (a − b) in points, paired by seed."""
    A = {r["spec"]["seed"]: r["last10_accuracy"] for r in _pick(results, method=a, **where)}
    B = {r["spec"]["seed"]: r["last10_accuracy"] for r in _pick(results, method=b, **where)}
    diffs = [100 * (A[s] - B[s]) for s in sorted(set(A) & set(B))]
    if not diffs:
        return "–"
    return f"{np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1) if len(diffs) > 1 else 0.0:.1f}"


def run(out: Path, size_name: str, console: Console, jobs: int = 1) -> SuiteOutput:
    size = SIZES[size_name]
    t0 = time.perf_counter()
    results, log = ensure_all(out, size, console)
    md_sections, numbers, curves = [], {}, {}
    for p in size.partitions:
        for sc in size.scalings:
            if (sc, p) in size.skip:
                continue
            rows = []
            for m in size.methods:
                row = [m]
                for a in size.assignments:
                    rs = _pick(results, method=m, scaling=sc, partition=p, assignment=a)
                    numbers.setdefault(p, {}).setdefault(sc, {}).setdefault(a, {})[m] = {
                        "final_accuracy": [r["final_accuracy"] for r in rs],
                        "last10_accuracy": [r["last10_accuracy"] for r in rs],
                        "cutoff_accuracy": [r["cutoff_accuracy"] for r in rs],
                        "pred_fractions": [r["pred_fractions"] for r in rs]}
                    row.append(fmt_mean_std([r["last10_accuracy"] for r in rs]))
                    curves.setdefault(f"{p}, {a}, {sc}", {})[m] = [r["accuracy_curve"] for r in rs]
                rows.append(row)
            diff_row = ["rbla − zeropad (pts, paired)"] + [
                _paired(results, "rbla", "zeropad", scaling=sc, partition=p, assignment=a) for a in size.assignments]
            md_sections += [f"### {p}, scale {sc}", "",
                            md_table(["method", *(f"ranks {a}" for a in size.assignments)], rows + [diff_row]), ""]
    # Cut-off diagnostics for rbla and zeropad (first scaling, every partition and assignment).
    cut_rows = []
    sc0 = size.scalings[0]
    for p in size.partitions:
        for a in size.assignments:
            for m in ("rbla", "zeropad"):
                rs = _pick(results, method=m, scaling=sc0, partition=p, assignment=a)
                if not rs:
                    continue
                ks = sorted(rs[0]["cutoff_accuracy"], key=int)
                cells = [f"{np.mean([r['cutoff_accuracy'][k] for r in rs]):.3f}" for k in ks]
                cut_rows.append([f"{p}, {a}", m, " / ".join(f"{k}:{c}" for k, c in zip(ks, cells))])
    png = plots.plot_curves_with_band(curves, out / "plots" / "digits_accuracy_vs_rounds.png")
    elapsed = time.perf_counter() - t0
    ranks = client_ranks_by_ratio(size.r_max)
    md = [
        f"# {NAME}: RBLA vs zero-padding on the authors' kind of protocol (scikit-learn digits, LoRA-only MLP)",
        "",
        "## Protocol",
        "",
        f"- data: scikit-learn digits (8x8, 10 classes), pixels / 16, fixed stratified 80/20 split "
        f"({len(load_digits_split()[3])} held-out images).",
        f"- model: MLP 64-{size.hidden}-{size.hidden}-10, every layer a LoRA on a frozen random weight (seeded "
        "nn.Linear init), biases trained and averaged (weighted mean), no separate head; ReLU between layers.",
        f"- {NUM_CLIENTS} clients, ranks int(R·ratio) for ratio 0.1..1.0 with R = {size.r_max}: {ranks}; "
        "partitions: one-label-per-client (client k holds every training image of digit k) and Dirichlet 0.1 per "
        "class (sizes very unequal); ranks aligned with client size (the largest client gets R) or reversed.",
        f"- local training: SGD lr {LR} momentum {MOMENTUM}, batch {BATCH}, one local epoch per round, fresh "
        f"optimizer per round; {size.rounds} rounds; every client every round; weights = client sizes.",
        "- scale rules: alpha chosen so that the widest client's scale is 1 under every rule (alpha/r: alpha = R; "
        "rsLoRA: alpha = sqrt(R); constant: alpha = 1); a rank-r client's scale is then R/r, sqrt(R/r), 1.",
        "- aggregation: fedlora's registered strategies through `aggregate` and `downlink` (the global adapter is "
        "the widest downlink); `rbla γ=g`: strategy.options = {gamma = g}.",
        f"- accuracy: held-out accuracy of the global model, mean over the last 10 rounds (the curves are flat "
        f"there; final-round numbers in results.json), mean ± std over seeds {list(size.seeds)}.",
        f"- size `{size_name}`: {len(results)} runs, {sum(r.get('seconds', 0) for r in results) / 60:.1f} min "
        f"summed over the runs (one process, one torch thread); expected: {size.estimate}.",
        "",
        "## Results",
        "",
        *md_sections,
        f"### Global adapter cut off at slot k (scale {sc0}), accuracy per k (mean over seeds)",
        "",
        md_table(["setting", "method", "k: accuracy"], cut_rows),
        "",
        "## Plots",
        "",
        f"![accuracy per round]({png.relative_to(out)})",
        "",
    ]
    results_json = {"settings": {**asdict(size), "lr": LR, "momentum": MOMENTUM, "batch": BATCH,
                                 "client_ranks_by_ratio": ranks}, "numbers": numbers, "runs": results,
                    "seconds_this_call": elapsed}
    return SuiteOutput(markdown="\n".join(md), results=results_json, run_log=log)
