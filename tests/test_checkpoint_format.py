"""The checkpoint format cannot confuse data with its own references (issue 26, item 2): dicts that hold marker
keys (a client's privacy report carrying "__array__" or "$array") come back as the same plain data, and a file
whose references do not resolve is one clear "unreadable" error, never a silently different state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.checkpoint import CHECKPOINT_FILE, FORMAT, load_checkpoint, save_checkpoint
from fedlora.errors import UserError
from fedlora.privacy.report_check import verify_report
from fedlora.strategies import LoraFactors

MARKER_KEYS = ["__array__", "__factors__", "__intkeys__", "$array", "$factors", "$map", "$", "$$", "$$array",
               "$$$map", "__meta__", "format", "state", "a0"]


def poisoned_report() -> dict:
    return {"epsilon": 0.7, "__array__": "a0", "$array": "a0", "$factors": [1, 2, 3], "$map": [[1, 2]],
            "$$array": "a1", "accountant": {"kind": "rdp", "history": [[1.1, 0.25, 2]], "__intkeys__": [[0, 1]]},
            "nested": [{"__factors__": ["a0", "a1", 1.0]}, {"$": "$"}]}


def write_raw(folder, meta, **arrays) -> None:
    """A checkpoint file with this JSON structure, as a damaged or foreign file would hold it."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(folder / CHECKPOINT_FILE, __meta__=raw, **arrays)


def test_a_report_with_marker_keys_round_trips_as_plain_data(tmp_path):
    state = {"server": {"round": 2, "privacy": {3: poisoned_report(), np.int64(1): poisoned_report()}},
             "w": np.arange(3.0), "f": LoraFactors(A=np.ones((2, 3)), B=np.zeros((4, 2), np.float32), scale=2.0)}
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back["server"]["privacy"] == {3: poisoned_report(), 1: poisoned_report()}
    assert np.array_equal(back["w"], np.arange(3.0))
    assert isinstance(back["f"], LoraFactors) and back["f"].scale == 2.0 and back["f"].B.dtype == np.float32


def test_a_verified_report_is_what_reaches_the_checkpoint(tmp_path):
    """The server stores `VerifiedReport.to_dict()`: the smuggled keys are gone before the file is written."""
    from fedlora.privacy import ClientAccountant

    acc = ClientAccountant("rdp", [(1.1, 0.25, 2)])
    report = {**poisoned_report(), "epsilon": acc.epsilon(1e-5), "noise_multiplier": 1.1, "sample_rate": 0.25,
              "dp_steps": 2}
    verified = verify_report(report, None, delta=1e-5, accountant="rdp", expected_steps=2)
    save_checkpoint(tmp_path, {"privacy": {0: verified.to_dict()}})
    stored = load_checkpoint(tmp_path)["privacy"][0]
    assert "__array__" not in stored and "$array" not in stored and stored == verified.to_dict()


@pytest.mark.parametrize("meta,fragment", [
    ({"format": FORMAT, "state": {"r": {"$array": "a9"}}}, "refers to array 'a9', which it does not hold"),
    ({"format": FORMAT, "state": {"r": {"$array": "__meta__"}}}, "which it does not hold"),
    ({"format": FORMAT, "state": {"r": {"$array": ["a0"]}}}, "which it does not hold"),
    ({"format": FORMAT, "state": {"r": {"$array": "a0", "x": 1}}}, "unknown reference"),
    ({"format": FORMAT, "state": {"r": {"$tensor": "a0"}}}, "unknown reference"),
    ({"format": FORMAT, "state": {"r": {"$factors": [{"$array": "a0"}, 3, 1.0]}}}, "two arrays"),
    ({"format": FORMAT, "state": {"r": {"$factors": "x"}}}, "not [A, B, scale]"),
    ({"format": FORMAT, "state": {"r": {"$map": [[[1], 2]]}}}, "[key, value] pairs"),
    ({"format": FORMAT, "state": {"r": {"$map": {"a": 1}}}}, "[key, value] pairs"),
    ({"server": {"round": 1}, "w": {"__array__": "a0"}}, "older fedlora"),  # format 1
    ([1, 2], "older fedlora"),
])
def test_a_reference_that_does_not_resolve_is_one_clear_error(tmp_path, meta, fragment):
    write_raw(tmp_path, meta, a0=np.zeros(2))
    with pytest.raises(UserError, match="unreadable") as err:
        load_checkpoint(tmp_path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_keys_that_look_escaped_stay_what_they_were(tmp_path):
    state = {"$": 1, "$$": 2, "$x": {"$$y": [3]}, "x$": 4, "": 5}
    save_checkpoint(tmp_path, state)
    assert load_checkpoint(tmp_path) == state


keys = st.one_of(st.sampled_from(MARKER_KEYS), st.text(max_size=6))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=6),
                   st.sampled_from(MARKER_KEYS), st.floats(allow_nan=False))
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4),
                            st.dictionaries(st.integers(-5, 5), inner, max_size=3)),
    max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(tree=st.dictionaries(keys, trees, max_size=4))
def test_any_plain_structure_round_trips(tmp_path_factory, tree):
    folder = tmp_path_factory.mktemp("ckpt")
    state = {"data": tree, "w": np.ones(2), "inf": math.inf}
    save_checkpoint(folder, state)
    back = load_checkpoint(folder)
    assert back["data"] == tree and back["inf"] == math.inf and np.array_equal(back["w"], np.ones(2))
