"""The bench's targets table says "met" only for what was measured to meet it."""

from conformance.bench import JOBS_PLAUSIBLE, _target_rows


def _jobs_met(ratio: float):
    rows = _target_rows({"harness": {"one_process": {"exec_per_s": 300.0}, "jobs_2_over_1": ratio}})
    return {name: met for name, _, _, met in rows}["fuzz --jobs 2 / --jobs 1"]


def test_jobs_scaling_is_met_only_when_plausible():
    assert _jobs_met(1.9) is True
    assert _jobs_met(1.2) is False
    # Two cores cannot give 3x: the runs varied, the ratio says nothing.
    assert _jobs_met(JOBS_PLAUSIBLE + 0.7) is None


def test_rates_and_memory_rows_follow_the_goals():
    results = {
        "rates": {"16": {"differential_over_native": 0.25}, "256": {"differential_over_native": 0.05}},
        "scattered": {str(10**6): {"model": {"seconds": 2.5, "peak_mib": 900.0, "base_mib": 200.0},
                                   "c": {"seconds": 0.9, "peak_mib": 350.0, "base_mib": 200.0}}},
    }
    met = {name: m for name, _, _, m in _target_rows(results)}
    assert met == {
        "differential / native kc_run, 16 ops": True, "differential / native kc_run, 256 ops": False,
        "10^6 scattered pages, model: time": True, "10^6 scattered pages, model: peak memory": False,
        "10^6 scattered pages, c: time": True, "10^6 scattered pages, c: peak memory": True,
    }
