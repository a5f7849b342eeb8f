"""Statistics over seeds: t quantiles, mean and interval against hand-computed numbers, pairing by seed, and the
report's across-seed section and sweep plot."""

import math

import pytest

from distill.image.kind import KIND
from distill.seedstats import mean_ci, paired_gains, seed_summary, seed_table, t_cdf, t_quantile


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (10**7, 1.9600)])
def test_t_quantile_matches_the_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=5e-5)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=5e-5)
    assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-9)


def test_mean_ci_by_hand():
    # gains [0.4, 0.1, 0.7]: mean 0.4; deviations 0, -0.3, 0.3 -> sd = sqrt(0.18 / 2) = 0.3; sem = 0.3 / sqrt(3)
    # t(0.975, 2) = 4.3027 -> half width 4.3027 * 0.173205 = 0.74525
    ci = mean_ci([0.4, 0.1, 0.7])
    assert ci["n"] == 3 and ci["df"] == 2
    assert ci["mean"] == pytest.approx(0.4) and ci["sd"] == pytest.approx(0.3)
    assert ci["sem"] == pytest.approx(0.3 / math.sqrt(3))
    assert ci["lo"] == pytest.approx(0.4 - 0.74525, abs=1e-4) and ci["hi"] == pytest.approx(0.4 + 0.74525, abs=1e-4)
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and one["lo"] is None and one["sd"] is None  # one run has no interval
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([0.1, float("nan")])


def _results(student_acc=(0.60, 0.62), base_acc=(0.58, 0.61), sweep_acc=(0.55, 0.57)):
    def member(name, base, role, seed, acc, sweep=None, main=False):
        return {"name": name, "role": role, "seed": seed, "replica_of": base, "main": main, "sweep": sweep,
                "val_acc": acc + 0.01, "test": {"test_accuracy": acc}}

    res = {"teacher": {"role": "teacher", "val_acc": 0.7, "test": {"test_accuracy": 0.7}}}
    for i, seed in enumerate((0, 1)):
        sfx = "" if i == 0 else f"-s{seed}"
        res["baseline" + sfx] = member("baseline" + sfx, "baseline", "baseline", seed, base_acc[i])
        res["student" + sfx] = member("student" + sfx, "student", "student", seed, student_acc[i],
                                      {"temperature": 4.0, "alpha": 0.7}, main=True)
        res["sweep-T1" + sfx] = member("sweep-T1" + sfx, "sweep-T1", "student", seed, sweep_acc[i],
                                       {"temperature": 1.0, "alpha": 0.7})
    return res


def test_seed_summary_pairs_each_student_with_the_baseline_of_its_seed():
    s = seed_summary(KIND, _results())
    assert set(s) == {"baseline", "student", "sweep-T1"} and s["student"]["seeds"] == [0, 1]
    # paired: (0.60 - 0.58, 0.62 - 0.61) = (0.02, 0.01), not (student mean - baseline mean) by accident only
    g = s["student"]["gain_test"]
    assert g["n"] == 2 and g["mean"] == pytest.approx(0.015) and g["sd"] == pytest.approx(math.sqrt(0.00005))
    assert g["lo"] == pytest.approx(0.015 - 12.7062 * math.sqrt(0.00005) / math.sqrt(2), abs=1e-6)
    assert s["baseline"]["gain_test"] is None and s["baseline"]["test"]["mean"] == pytest.approx(0.595)
    assert seed_summary(KIND, {"teacher": {"role": "teacher", "test": {}}, "baseline": {"role": "baseline"}}) == {}

    class Lower:  # a lower-is-better metric: gain is reference - candidate
        def gain(self, c, r):
            return r - c

    assert paired_gains(Lower(), {0: 10.0, 1: 12.0, 2: float("nan")}, {0: 11.0, 1: 15.0, 3: 1.0}) == [1.0, 3.0]


def test_seed_table_shows_means_and_intervals():
    md = seed_table(KIND, _results())
    assert md.startswith("## Across seeds")
    row = next(line for line in md.splitlines() if line.startswith("| student |"))
    assert "| 2 |" in row and "+1.50 pt [" in row  # mean gain 1.5 points with its interval
    assert seed_table(KIND, {"teacher": {"role": "teacher"}}) == ""


def test_report_has_the_across_seed_section_and_one_sweep_point_per_member(tmp_path):
    from tasks.report import build_report, sweep_points

    res = _results()
    for r in res.values():
        r["history"] = [{"epoch": 1, "train_loss": 1.0, "val_acc": 0.5}]
    rep = build_report(KIND, res, None, [], tmp_path)
    assert "## Across seeds" in rep["markdown"] and rep["seed_summary"]["student"]["gain_test"]["n"] == 2
    pts = sweep_points(KIND, res)
    assert sorted(p["name"] for p in pts) == ["student", "sweep-T1"]  # replicas averaged, one point each
    assert all(p["lo"] is not None and p["lo"] <= p["test_accuracy"] <= p["hi"] for p in pts)
    assert (tmp_path / "test_accuracy_across_sweep.png").stat().st_size > 0
    # a run without replicas reports as before
    single = {k: {kk: vv for kk, vv in v.items() if kk not in ("seed", "replica_of")} for k, v in res.items()
              if not k.endswith("-s1")}
    out = build_report(KIND, single, None, [], tmp_path / "single")
    assert "Across seeds" not in out["markdown"] and out["seed_summary"] == {}
