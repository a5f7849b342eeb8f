"""Torch threads per training stage: an equal share of the cores among the stages that may run at once."""

from __future__ import annotations

import pytest

from distill.runtime import stage_threads, usable_cpus


@pytest.mark.parametrize("cpus, concurrent, expected", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 3, 5), (16, 4, 4),
                                                        (1, 8, 1)])
def test_stage_threads_share_the_cores(cpus, concurrent, expected):
    assert stage_threads(cpus, concurrent) == expected
    assert stage_threads(cpus, concurrent) * min(concurrent, cpus) <= cpus  # never oversubscribed


def test_override_wins_and_bad_values_are_refused():
    assert stage_threads(16, 4, "3") == 3 and stage_threads(2, 2, 6) == 6 and stage_threads(2, 2, "") == 1
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="DISTILL_TORCH_THREADS"):
            stage_threads(2, 1, bad)
    with pytest.raises(ValueError, match="at least 1"):
        stage_threads(2, 0)


def test_usable_cpus_is_the_affinity_mask():
    import os

    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1


def test_the_stage_flow_sets_its_threads(monkeypatch):
    """``distill-train``'s first act: its share of the cores, from the job's ``concurrent``, or the override."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("prefect")
    from flows.train import _set_threads
    from tasks.lab import TrainJob

    job = TrainJob(kind="cifar", role="teacher", name="teacher", lab={}, data_key="data/x", out_prefix="stages/x",
                   store_url="file:///tmp/unused", concurrent=2)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("DISTILL_TORCH_THREADS", raising=False)
        assert _set_threads(job) == max(1, usable_cpus() // 2) == torch.get_num_threads()
        monkeypatch.setenv("DISTILL_TORCH_THREADS", "3")
        assert _set_threads(job) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
