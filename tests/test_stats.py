import math

import pytest

from tc.stats import over_runs, paired_difference, rate_fields, verdict, wilson_interval


def test_wilson_interval():
    low, high = wilson_interval(27, 100)
    assert low == pytest.approx(0.1927, abs=1e-4) and high == pytest.approx(0.3643, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert rate_fields("shown", 3, 12) == {"shown": 0.25, "shown_ci_low": wilson_interval(3, 12)[0],
                                           "shown_ci_high": wilson_interval(3, 12)[1]}  # fmt: skip


def test_paired_difference_matches_newcombe():
    # Newcombe (1998), paired example: 12 both, 9 only the first, 2 only the second, 21 neither;
    # his method 10 gives 0.0182 to 0.2892 for the difference 0.1591.
    a = [1] * 12 + [1] * 9 + [0] * 2 + [0] * 21
    b = [1] * 12 + [0] * 9 + [1] * 2 + [0] * 21
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(7 / 44)
    assert d["ci_low"] == pytest.approx(0.0182, abs=1e-4) and d["ci_high"] == pytest.approx(0.2892, abs=1e-4)
    assert (d["episodes"], d["a_only"], d["b_only"]) == (44, 9, 2) and verdict(d) == "ahead"
    # swapping the sides mirrors the interval
    m = paired_difference(b, a)
    assert m["ci_low"] == pytest.approx(-d["ci_high"]) and verdict(m) == "behind"


def test_pairing_narrows_the_interval_and_identical_runs_show_no_difference():
    a = [1] * 30 + [0] * 70
    same_seeds_hard = [1] * 20 + [0] * 80  # solves a subset of a's seeds: strongly correlated
    spread = [0] * 80 + [1] * 20  # solves other seeds: anti-correlated
    tight, loose = paired_difference(a, same_seeds_hard), paired_difference(a, spread)
    assert tight["difference"] == loose["difference"] == pytest.approx(0.1)
    assert tight["ci_high"] - tight["ci_low"] < loose["ci_high"] - loose["ci_low"]
    assert verdict(tight) == "ahead" and verdict(loose) == "no difference"
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["ci_low"] < 0 < same["ci_high"] and verdict(same) == "no difference"
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([1, 0], [1])


def test_over_runs():
    r = over_runs([0.3, 0.35, 0.28])
    assert r["runs"] == 3 and r["mean"] == pytest.approx(0.31) and (r["min"], r["max"]) == (0.28, 0.35)
    half = 4.303 * r["std"] / math.sqrt(3)  # t with 2 degrees of freedom
    assert r["ci_low"] == pytest.approx(0.31 - half) and r["ci_high"] == pytest.approx(0.31 + half)
    assert over_runs([0.5])["ci_low"] is None  # one run has no spread
