"""Pipeline schedules, their simulator and the layer partition: pure Python, no process groups."""
from collections import Counter, defaultdict
from xml.etree import ElementTree

import pytest

from megaengine.parallel import ConfigError
from megaengine.pipeline import build, layer_ranges, validate
from megaengine.pipeline.schedules import Action, peer_of
from megaengine.pipeline.simulate import main as simulate_main, simulate

UNIT = {"F": 1.0, "B": 1.0, "W": 1.0}


def configs(name):
    for p in range(1, 9):
        for m in range(p, 33):
            for v in ((2, 3) if name == "interleaved" else (1,)):
                if name == "interleaved" and (p < 2 or m % p):
                    continue
                yield p, m, v


def check_compute(schedule, m, v):
    """Every (micro-batch, chunk) computed once per rank; F before its B, B before its W."""
    for actions in schedule:
        where = {}
        for i, a in enumerate(actions):
            if not a.is_comm:
                assert (a.kind, a.microbatch, a.chunk) not in where, a
                where[(a.kind, a.microbatch, a.chunk)] = i
        for mb in range(m):
            for c in range(v):
                f = where[("F", mb, c)]
                if ("BW", mb, c) in where:
                    assert f < where[("BW", mb, c)] and ("B", mb, c) not in where
                else:
                    assert f < where[("B", mb, c)] < where[("W", mb, c)]
        assert len(where) == sum(1 for a in actions if not a.is_comm)


def check_sends_matched(schedule):
    """Per directed channel, the messages sent equal the messages received, in the same order."""
    p = len(schedule)
    sent, got = defaultdict(list), defaultdict(list)
    for rank, actions in enumerate(schedule):
        for a in actions:
            if a.is_comm:
                peer, peer_chunk = peer_of(a, rank, p)
                if a.kind.startswith("SEND"):
                    sent[(rank, peer)].append((a.kind[-1], a.microbatch, peer_chunk))
                else:
                    got[(peer, rank)].append((a.kind[-1], a.microbatch, a.chunk))
    assert sent == got


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_every_valid_schedule_is_complete_matched_and_deadlock_free(name):
    for p, m, v in configs(name):
        schedule = build(name, p, m, v)
        assert len(schedule) == p
        check_compute(schedule, m, v)
        check_sends_matched(schedule)
        validate(schedule, m, v)  # also runs it with rendezvous sends: raises on a deadlock


def test_validate_catches_broken_schedules():
    good = build("1f1b", 4, 8)
    dropped = [list(a) for a in good]
    dropped[1].remove(Action("SEND_F", 3))
    swapped = [list(a) for a in good]
    i, j = swapped[2].index(Action("F", 5)), swapped[2].index(Action("BW", 5))
    swapped[2][i], swapped[2][j] = swapped[2][j], swapped[2][i]
    # stage 0 waits for gradient 0 before it sends forward 0: each stage waits on the other
    F, BW = Action("F", 0), Action("BW", 0)
    deadlock = [[F, Action("RECV_B", 0), BW, Action("SEND_F", 0)],
                [Action("RECV_F", 0), F, BW, Action("SEND_B", 0)]]
    for broken in (dropped, swapped):
        with pytest.raises(ValueError):
            validate(broken, 8)
    with pytest.raises(ValueError, match="deadlock"):
        validate(deadlock, 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_of_gpipe_and_1f1b(name):
    for p, m in [(1, 4), (2, 4), (4, 4), (4, 8), (8, 32)]:
        for cost in (UNIT, {"F": 1.0, "B": 2.0, "W": 0.5}):
            sim = simulate(build(name, p, m), cost)
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
            assert sim["makespan"] == pytest.approx((m + p - 1) * (cost["F"] + cost["B"] + cost["W"]))


def test_gpipe_bubble_with_p2p_latency():
    p, m, d = 4, 8, 0.25
    sim = simulate(build("gpipe", p, m), UNIT, p2p=d)
    assert sim.makespan == pytest.approx((m + p - 1) * 3 + 2 * (p - 1) * d)


def test_interleaved_bubble_matches_narayanan():
    for p, m, v in [(2, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 3)]:
        cost = {k: 1.0 / v for k in UNIT}  # a chunk is 1/v of a stage
        sim = simulate(build("interleaved", p, m, v), cost)
        ideal = m * 3.0
        assert (sim.makespan - ideal) / ideal == pytest.approx((p - 1) / (v * m))
        assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
        assert sim.bubble_fraction < simulate(build("1f1b", p, m), UNIT).bubble_fraction


def test_zb_h1_bubble_is_about_a_third_of_1f1b():
    for p, m in [(2, 8), (4, 8), (4, 32), (8, 64)]:
        zb = simulate(build("zb-h1", p, m), UNIT)
        one = simulate(build("1f1b", p, m), UNIT)
        assert zb.makespan == pytest.approx(3 * m + p - 1)  # bubble (p-1)(T_F + T_B - T_W), Qi et al.
        assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))
        ratio = zb.bubble_fraction / one.bubble_fraction
        assert 1 / 3 <= ratio <= (m + p - 1) / (3 * m) + 1e-9
        if m >= 8 * p:
            assert ratio < 0.36


def test_peak_inflight():
    for p, m in [(1, 3), (2, 2), (4, 4), (4, 16), (8, 9)]:
        one = simulate(build("1f1b", p, m), UNIT).peak_inflight
        assert one == [min(p - s, m) for s in range(p)]
        assert simulate(build("gpipe", p, m), UNIT).peak_inflight == [m] * p
        assert all(z <= o for z, o in zip(simulate(build("zb-h1", p, m), UNIT).peak_inflight, one))


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--global-batch-size"):
        build("1f1b", 4, 3)
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size"):
        build("interleaved", 4, 6, 2)
    with pytest.raises(ConfigError, match="--pipeline-schedule 'pipedream'.*gpipe, 1f1b, interleaved, zb-h1"):
        build("pipedream", 4, 8)
    with pytest.raises(ConfigError, match="--pipeline-schedule interleaved"):
        build("1f1b", 4, 8, 2)


def test_layer_ranges():
    assert layer_ranges(8, 2) == [[(0, 4)], [(4, 8)]]
    # chunk c on rank r is virtual stage c * pp + r
    assert layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    covered = sorted(r for rank in layer_ranges(24, 4, 3) for r in rank)
    assert covered == [(i, i + 2) for i in range(0, 24, 2)]
    with pytest.raises(ConfigError, match="--num-layers 10.*--pipeline-model-parallel-size 4"):
        layer_ranges(10, 4)
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage"):
        layer_ranges(12, 2, 4)


def test_simulate_cli_draws_and_writes_svg(tmp_path, capsys):
    svg = tmp_path / "t.svg"
    simulate_main(["--schedule", "interleaved", "--pp", "4", "--microbatches", "8", "--virtual-stages", "2",
                   "--svg", str(svg)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("stage ")]
    assert len(rows) == 4 and "F0" in rows[0] and "BW7c1" in rows[3]
    assert "bubble 0.1579" in out and "peak in-flight" in out
    root = ElementTree.parse(svg).getroot()
    assert sum(1 for e in root.iter() if e.tag.endswith("rect")) == 4 * 8 * 2 * 2
    simulate_main(["--schedule", "zb-h1", "--pp", "4", "--microbatches", "8"])
    assert "bubble 0.1111" in capsys.readouterr().out


def test_simulator_counts_actions_by_kind():
    sim = simulate(build("zb-h1", 3, 5), {"F": 1.0, "B": 2.0, "W": 3.0})
    for row in sim.timeline:
        kinds = Counter(a.kind for _, _, a in row)
        assert kinds == {"F": 5, "B": 5, "W": 5}
        assert all(e - s == {"F": 1.0, "B": 2.0, "W": 3.0}[a.kind] for s, e, a in row)
        assert all(row[i][1] <= row[i + 1][0] for i in range(len(row) - 1))
