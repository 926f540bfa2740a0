"""VLN metrics against hand-computed cases and a brute-force DTW."""

import math

import numpy as np
import pytest

from omnistream.navigation.metrics import dedup, dtw, episode_metrics, ndtw, path_length, spl, summarize


def pts(*xs):
    """Points on the x axis."""
    return [np.array([float(x), 0.0, 0.0]) for x in xs]


def brute_dtw(r, q):
    """Minimum over every monotone warping path, enumerated recursively (independent of the DP)."""
    def best(i, j):
        d = float(np.linalg.norm(r[i] - q[j]))
        if i == 0 and j == 0:
            return d
        options = []
        if i > 0:
            options.append(best(i - 1, j))
        if j > 0:
            options.append(best(i, j - 1))
        if i > 0 and j > 0:
            options.append(best(i - 1, j - 1))
        return d + min(options)
    return best(len(r) - 1, len(q) - 1)


def test_dtw_hand_computed():
    # R = 0,1,2 ; Q = 0,2: warping (0-0), (1-0 or 1-2: cost 1), (2-2) -> DTW 1
    assert dtw(pts(0, 1, 2), pts(0, 2)) == pytest.approx(1.0)
    assert ndtw(pts(0, 1, 2), pts(0, 2)) == pytest.approx(math.exp(-1 / (3 * 3.0)))
    assert ndtw(pts(0, 1, 2), pts(0, 1, 2)) == 1.0
    # a path 1 m to the side of a 4-point reference: every point costs 1 -> DTW 4, nDTW exp(-4 / (4 * 3))
    side = [p + np.array([0, 0, 1.0]) for p in pts(0, 1, 2, 3)]
    assert ndtw(pts(0, 1, 2, 3), side) == pytest.approx(math.exp(-1 / 3))


def test_dtw_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        r = list(rng.normal(size=(int(rng.integers(1, 5)), 3)))
        q = list(rng.normal(size=(int(rng.integers(1, 5)), 3)))
        assert dtw(r, q) == pytest.approx(brute_dtw(r, q))
        assert dtw(r, q, lambda a, b: float(np.linalg.norm(a - b))) == pytest.approx(brute_dtw(r, q))  # any d


def test_dtw_rejects_empty():
    with pytest.raises(ValueError):
        dtw([], pts(0))


def test_spl():
    assert spl(True, 10.0, 12.5) == pytest.approx(0.8)
    assert spl(True, 10.0, 8.0) == 1.0  # l / max(p, l): never above 1
    assert spl(False, 10.0, 10.0) == 0.0


def test_path_length_and_dedup():
    assert path_length(pts(0, 1, 1, 3)) == pytest.approx(3.0)
    assert path_length(pts(5)) == 0.0
    assert len(dedup(pts(0, 0, 1, 1, 0))) == 3


def test_success_straight_run():
    # start 0, goal 10, walks to 9 and stops: NE 1 < 3 -> success, SPL 10 / max(9, 10) = 1
    m = episode_metrics(pts(*range(10)), [10, 0, 0], 10.0, pts(0, 5, 10), called_stop=True)
    assert m["NE"] == pytest.approx(1.0)
    assert (m["SR"], m["OS"]) == (1.0, 1.0)
    assert m["PL"] == pytest.approx(9.0)
    assert m["SPL"] == pytest.approx(1.0)
    assert m["SDTW"] == pytest.approx(m["nDTW"])


def test_overshoot_lowers_spl():
    # to 12 and back to 10.5: PL = 12 + 1.5 = 13.5, SPL = 10 / 13.5
    m = episode_metrics(pts(0, 4, 8, 12, 10.5), [10, 0, 0], 10.0, pts(0, 10), called_stop=True)
    assert m["SR"] == 1.0
    assert m["NE"] == pytest.approx(0.5)
    assert m["SPL"] == pytest.approx(10 / 13.5)


def test_oracle_success_without_success():
    # passes 1 m from the goal, stops 5 m past it: OS 1, SR 0, SPL 0, SDTW 0
    m = episode_metrics(pts(0, 5, 9, 15), [10, 0, 0], 10.0, pts(0, 10), called_stop=True)
    assert (m["OS"], m["SR"], m["SPL"], m["SDTW"]) == (1.0, 0.0, 0.0, 0.0)
    assert m["NE"] == pytest.approx(5.0)
    assert m["nDTW"] > 0


def test_no_stop_is_no_success():
    # ends 1 m from the goal but ran out of steps (no STOP): OS 1, SR 0
    m = episode_metrics(pts(0, 9), [10, 0, 0], 10.0, pts(0, 10), called_stop=False)
    assert (m["OS"], m["SR"]) == (1.0, 0.0)


def test_success_distance_is_strict():
    # habitat-lab's Success: distance_to_goal < success_distance
    assert episode_metrics(pts(0, 7), [10, 0, 0], 10.0, pts(0, 10), True)["SR"] == 0.0
    assert episode_metrics(pts(0, 7.01), [10, 0, 0], 10.0, pts(0, 10), True)["SR"] == 1.0


def test_geodesic_distance_is_used():
    # 1 m away in a straight line but 5 m around a wall: NE = 5, neither SR nor OS
    m = episode_metrics(pts(0, 9), [10, 0, 0], 10.0, pts(0, 10), True, distance_to_goal=lambda p: 5.0)
    assert m["NE"] == 5.0
    assert (m["SR"], m["OS"]) == (0.0, 0.0)


def test_summarize():
    rows = [{"NE": 1.0, "OS": 1.0, "SR": 1.0, "SPL": 0.5, "nDTW": 0.8, "SDTW": 0.8, "PL": 4.0, "steps": 10,
             "unparseable": 2},
            {"NE": 3.0, "OS": 0.0, "SR": 0.0, "SPL": 0.0, "nDTW": 0.4, "SDTW": 0.0, "PL": 2.0, "steps": 30,
             "unparseable": 1}]
    s = summarize(rows)
    assert s["episodes"] == 2
    assert s["NE"] == pytest.approx(2.0) and s["SR"] == pytest.approx(0.5) and s["SPL"] == pytest.approx(0.25)
    assert s["nDTW"] == pytest.approx(0.6) and s["SDTW"] == pytest.approx(0.4) and s["steps"] == 20
    assert s["unparseable"] == 3
    assert math.isnan(summarize([])["SR"])
