"""FL as a service: profiles checked as hostile input, the rank planner, the simulated clock, and a run that plans
its ranks, keeps a client that fits nothing out with its reason, and drops a straggler at the deadline."""

from __future__ import annotations

import pytest

from fedlora.config import ConfigError, load_config
from fedlora.flaas.planner import MB, Geometry, expected_cost, plan_ranks
from fedlora.flaas.profiles import (
    ClientProfile,
    ProfileError,
    load_profiles_file,
    parse_profile,
    population_profiles,
    profile_from_node_fields,
)
from fedlora.flaas.simulate import simulate_round

# A made-up geometry with round numbers: 100 MiB fixed + 10 MiB per unit of rank; 1 GFLOP fixed + 0.1 per rank;
# 1 MB up and down per unit of rank.
GEOMETRY = Geometry(fixed_memory=100 * MB, memory_per_rank=10 * MB, flops_fixed=1e9, flops_per_rank=1e8,
                    up_bytes={r: r * 1e6 for r in (1, 2, 4, 8, 16)}, down_bytes={r: r * 1e6 for r in (1, 2, 4, 8, 16)})
CHOICES = [2, 4, 8, 16]
FAST = dict(download_mbps=1000.0, gflops=1000.0)


def prof(memory_mb: float, upload_mbps: float, **kw) -> ClientProfile:
    return ClientProfile(memory_mb=memory_mb, upload_mbps=upload_mbps, **{**FAST, **kw})


def three_classes() -> dict[int, ClientProfile]:
    # phone: memory binds (100 + 10 r <= 150: r <= 5 -> 4); tablet: the uplink binds (8 r Mbit at 8 Mbit/s plus
    # ~0.1 s must fit 10 s: r <= 8 after 16 fails); laptop: everything fits.
    return {0: prof(150, 100, device="phone"), 1: prof(10_000, 10, device="tablet"), 2: prof(10_000, 1000)}


def test_three_device_classes_get_three_ranks_and_a_slower_uplink_changes_the_plan():
    plan = plan_ranks(three_classes(), GEOMETRY, CHOICES, deadline_s=10.0, mixed=True)
    assert plan.ranks == {0: 4, 1: 8, 2: 16} and plan.sit_out == {}
    slower = {**three_classes(), 1: prof(10_000, 2)}  # the tablet's uplink drops to 2 Mbit/s: 8 r / 2 <= 10 -> 2
    assert plan_ranks(slower, GEOMETRY, CHOICES, 10.0, True).ranks == {0: 4, 1: 2, 2: 16}
    # deterministic: the same profiles, the same plan
    assert plan_ranks(three_classes(), GEOMETRY, CHOICES, 10.0, True) == plan


def test_a_client_whose_memory_fits_nothing_sits_out_with_the_reason():
    profiles = {**three_classes(), 3: prof(110, 1000)}  # rank 2 needs 120 MiB
    plan = plan_ranks(profiles, GEOMETRY, CHOICES, 10.0, True)
    assert 3 not in plan.ranks and plan.sit_out[3] == "memory: rank 2 needs 120 MiB, the device has 110 MiB"
    late = plan_ranks({0: prof(10_000, 0.1)}, GEOMETRY, CHOICES, 10.0, True)  # 2 MB at 0.1 Mbit/s: 160 s
    assert late.ranks == {} and late.sit_out[0].startswith("deadline: rank 2 takes 160.")


def test_a_method_that_cannot_mix_ranks_gets_the_weakest_participants_rank():
    profiles = {**three_classes(), 3: prof(110, 1000)}
    plan = plan_ranks(profiles, GEOMETRY, CHOICES, 10.0, mixed=False)
    assert plan.ranks == {0: 4, 1: 4, 2: 4} and 3 in plan.sit_out and "client 0" in plan.note


def test_simulated_time_follows_the_profiles_and_a_straggler_is_dropped_with_its_reason():
    profiles = {0: ClientProfile(memory_mb=1e3, upload_mbps=8, download_mbps=16, gflops=10),
                1: ClientProfile(memory_mb=1e3, upload_mbps=1, download_mbps=2, gflops=1)}
    work = {c: (20e9, 4e6, 2e6) for c in profiles}  # 20 GFLOP, 4 MB up, 2 MB down
    sim = simulate_round(profiles, work, deadline_s=None)
    # client 0: 2 s compute + 4 s up + 1 s down; client 1: 20 + 32 + 8
    assert sim.costs[0].total_s == pytest.approx(7.0) and sim.costs[1].total_s == pytest.approx(60.0)
    assert sim.wall_s == pytest.approx(60.0) and sim.late == {}
    sim = simulate_round(profiles, work, deadline_s=30.0)
    assert list(sim.late) == [1] and sim.late[1].startswith("straggler: simulated 60.0 s")
    assert sim.wall_s == 30.0  # the server waited until the deadline
    assert simulate_round(profiles, work, 30.0, slowdown={0: 2.0, 1: 1.0}).costs[0].total_s == pytest.approx(14.0)


@pytest.mark.parametrize("raw, says", [
    ({"memory_mb": -1, "upload_mbps": 1, "download_mbps": 1, "gflops": 1}, "memory_mb"),
    ({"memory_mb": 1e12, "upload_mbps": 1, "download_mbps": 1, "gflops": 1}, "memory_mb"),
    ({"memory_mb": 1, "upload_mbps": float("nan"), "download_mbps": 1, "gflops": 1}, "upload_mbps"),
    ({"memory_mb": 1, "upload_mbps": 1, "download_mbps": True, "gflops": 1}, "download_mbps"),
    ({"memory_mb": 1, "upload_mbps": 1, "download_mbps": 1}, "gflops"),
    ({"memory_mb": 1, "upload_mbps": 1, "download_mbps": 1, "gflops": 1, "rank": 16}, "rank: unknown key"),
    ({"memory_mb": 1, "upload_mbps": 1, "download_mbps": 1, "gflops": 1, "availability": 0}, "availability"),
])
def test_absurd_or_missing_profile_values_are_one_line(raw, says):
    with pytest.raises(ProfileError, match=says) as err:
        parse_profile(raw)
    assert "\n" not in str(err.value)


def test_node_config_profiles_are_checked_and_never_carry_a_rank():
    p = profile_from_node_fields({"flaas-memory-mb": 2048, "flaas-upload-mbps": 5, "flaas-download-mbps": 20,
                                  "flaas-gflops": 15.5, "flaas-device": "phone"})
    assert (p.memory_mb, p.gflops, p.device) == (2048, 15.5, "phone")
    with pytest.raises(ProfileError, match="unknown key 'flaas-rank'"):
        profile_from_node_fields({"flaas-rank": 64, "flaas-memory-mb": 2048})
    with pytest.raises(ProfileError, match="gflops"):
        profile_from_node_fields({"flaas-memory-mb": 1, "flaas-upload-mbps": 1, "flaas-download-mbps": 1,
                                  "flaas-gflops": "fast"})


def test_named_population_and_trace_file(tmp_path):
    a = population_profiles("phones-tablets-laptops", 10, seed=3)
    assert [p.device for p in a] == ["phone"] * 5 + ["tablet"] * 2 + ["laptop"] * 3
    assert a == population_profiles("phones-tablets-laptops", 10, seed=3) != population_profiles(
        "phones-tablets-laptops", 10, seed=4)
    trace = tmp_path / "trace.csv"
    trace.write_text("computation,communication,memory_mb\n50,2000,1024\n")  # 50 ms/sample, 2 Mbit/s
    (p,) = load_profiles_file(trace, flops_per_sample=1e9)
    assert p.gflops == pytest.approx(20.0) and p.upload_mbps == pytest.approx(2.0) and p.memory_mb == 1024
    bad = tmp_path / "bad.json"
    bad.write_text('[{"memory_mb": 1, "upload_mbps": 1, "download_mbps": 1, "gflops": -5}]')
    with pytest.raises(ProfileError, match="row 0: gflops"):
        load_profiles_file(bad)


def test_config_refuses_bad_flaas_sections_in_one_line():
    with pytest.raises(ConfigError, match="exactly one of population, profiles, profiles_file"):
        load_config(None, ["flaas.ranks=[2, 4]"])
    with pytest.raises(ConfigError, match="flaas.profiles.0.upload_mbps"):
        load_config(None, ["flaas.profiles=[{memory_mb=1, upload_mbps=0, download_mbps=1, gflops=1}]"])
    with pytest.raises(ConfigError, match="secure sum"):
        load_config(None, ["flaas.population=phones", "flaas.deadline_s=10", "privacy.secure_aggregation=true",
                           "strategy.name=ffa"])
    assert load_config(None, []).to_toml() == load_config(None, []).to_toml() and "flaas" not in \
        load_config(None, []).to_toml()  # configs without [flaas] are unchanged


# -- a run ---------------------------------------------------------------------------------------------------
TINY = ["data.max_length=16", "data.max_eval_examples=32", "federation.rounds=2", "federation.local_steps=1",
        "federation.batch_size=4", "federation.partition=iid", "federation.num_clients=3", "strategy.name=rbla",
        "output.save_adapter=false", "output.progress=false", "flaas.ranks=[2, 4, 8]"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_plans_ranks_logs_who_sits_out_and_drops_stragglers(tmp_path):
    from fedlora.engines import execute
    from fedlora.experiment import make_run_dir
    from fedlora.federated_run import Run
    from fedlora.metrics import read_metrics

    profiles = ("[{memory_mb=1, upload_mbps=10, download_mbps=10, gflops=100},"  # fits nothing
                " {memory_mb=4096, upload_mbps=0.5, download_mbps=10, gflops=100},"  # slow uplink: a low rank
                " {memory_mb=4096, upload_mbps=100, download_mbps=100, gflops=100}]")
    cfg = load_config(None, TINY + [f"flaas.profiles={profiles}", "flaas.deadline_s=2.0", "flaas.jitter=0.5",
                                    "seed=3"])
    run = Run(cfg, make_run_dir(cfg, str(tmp_path / "run")))
    plan = run.flaas.plan
    assert 0 in plan.sit_out and plan.ranks[2] == 8 and plan.ranks[1] < 8
    assert run.cfg.federation.ranks[1:] == [plan.ranks[1], 8]  # the plan is the run's ranks
    # A node that declares a profile (Flower --node-config) is re-planned; a hostile one sits out, one line.
    notes = []
    fast = {"flaas-memory-mb": 4096, "flaas-upload-mbps": 100, "flaas-download-mbps": 100, "flaas-gflops": 100}
    run.flaas.observe({1: fast}, notes.append)
    assert run.server.client_ranks[1] == run.flaas.plan.ranks[1] == 8 and "re-planned" in notes[-1]
    run.flaas.observe({1: {**fast, "flaas-rank": 64}}, notes.append)
    assert 1 in run.flaas.plan.sit_out and "unknown key 'flaas-rank'" in notes[-2]
    run.flaas.observe({1: {**fast, "flaas-upload-mbps": 0.5, "flaas-download-mbps": 10}}, notes.append)  # as at first
    assert run.flaas.plan == plan and run.server.client_ranks[1] == plan.ranks[1]
    execute(run)
    rows = read_metrics(tmp_path / "run")
    late_seen = 0
    for row in rows:
        assert row["flaas_plan"] == plan.to_json()
        assert row["dropped_reasons"]["0"].startswith("sits out: memory: rank 2 needs")
        sim = {int(c): s for c, s in row["sim_client_s"].items()}
        late = {c for c, s in sim.items() if s > 2.0}
        late_seen += len(late)
        assert all(row["dropped_reasons"][str(c)].startswith("straggler: simulated") for c in late)
        assert set(row["clients"]) == set(sim) - late and row["ranks"] == {str(c): plan.ranks[c] for c in row["clients"]}
        assert row["sim_round_s"] == pytest.approx(2.0 if late else max(sim.values()), abs=1e-5) and row["wall_s"] > 0
    assert late_seen >= 1  # seed 3: client 1 (about 1.3 s as profiled) is 1.61x slower in round 2 (the check above holds either way)
