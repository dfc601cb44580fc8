"""benchmarks/sn_overhead.py: the bootstrap interval of the median round ratio."""

from __future__ import annotations

import statistics

from benchmarks.sn_overhead import median_ci


def test_median_ci_constant_ratios_is_a_point() -> None:
    assert median_ci([1.08] * 25) == [1.08, 1.08]


def test_median_ci_brackets_the_median_and_narrows_with_more_rounds() -> None:
    few = [1.0 + 0.01 * (i % 11) for i in range(21)]  # medians of resamples lie in [1.00, 1.10]
    many = few * 10
    lo, hi = median_ci(few)
    assert 1.0 <= lo <= statistics.median(few) <= hi <= 1.1
    lo_many, hi_many = median_ci(many)
    assert lo_many <= statistics.median(many) <= hi_many
    assert hi_many - lo_many < hi - lo


def test_median_ci_is_deterministic() -> None:
    ratios = [1.05, 1.2, 0.98, 1.07, 1.11, 1.02, 1.09]
    assert median_ci(ratios) == median_ci(ratios)


def test_cpu_name_reads_the_model_name(tmp_path, monkeypatch) -> None:
    import benchmarks._machine as machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) X\n")
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: real_path(info) if p == "/proc/cpuinfo" else p)
    assert machine.cpu_name() == "Intel(R) Xeon(R) X"
    monkeypatch.setattr(machine, "Path", lambda p: real_path(tmp_path / "missing"))
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_name() == "x86_64"
