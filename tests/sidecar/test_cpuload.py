"""``cpuload``: /proc/stat and cgroup cpu.stat parsing, the contention decision, and
``CpuWatch`` over real files (written here: the machine's own counters cannot be set)."""

from __future__ import annotations

import os
from pathlib import Path

from backdial.sidecar.cpuload import CpuSample, CpuWatch, contended, cpu_ticks, throttled_us

STAT = """cpu  100 0 50 800 10 0 5 0 0 0
cpu0 60 0 30 10 0 0 3 2 0 0
cpu1 40 0 20 790 10 0 2 0 0 0
intr 12345
ctxt 999
"""


def test_ticks_are_summed_over_the_cpus_asked_for() -> None:
    assert cpu_ticks(STAT, [0]) == (60 + 30 + 3 + 2, 10)
    assert cpu_ticks(STAT, [1]) == (40 + 20 + 2, 790 + 10)
    assert cpu_ticks(STAT, [0, 1]) == (95 + 62, 10 + 800)
    assert cpu_ticks(STAT, [7]) == (0, 0)  # not in the text: nothing counted
    assert cpu_ticks("cpu0 1 2 3 4 5 6 7", [0]) == (1 + 2 + 3 + 6 + 7, 4 + 5)  # no steal


def test_throttled_time_from_cgroup_cpu_stat() -> None:
    text = "usage_usec 500\nnr_periods 10\nnr_throttled 2\nthrottled_usec 4200\n"
    assert throttled_us(text) == 4200
    assert throttled_us("usage_usec 500\n") == 0


def test_contended_below_five_percent_idle_until_above_a_quarter_or_throttled() -> None:
    start = CpuSample(busy=1000, idle=1000, throttled_us=0)
    assert contended(start, CpuSample(1050, 1001, 0), was=False)  # 1 idle tick in 51
    assert not contended(start, CpuSample(1050, 1010, 0), was=False)  # 10 in 60
    # Once saturated, a little idle time (about 2 % under batch) does not end it...
    assert contended(start, CpuSample(1047, 1003, 0), was=True)
    assert contended(start, CpuSample(1040, 1010, 0), was=True)  # 20 %
    # ...real room does.
    assert not contended(start, CpuSample(1030, 1020, 0), was=True)  # 40 %
    assert contended(start, CpuSample(1001, 1050, 10), was=False)  # throttled: quota spent
    assert not contended(start, start, was=False)  # no time passed: nothing new known
    assert contended(start, start, was=True)


def test_watch_samples_real_files_and_says_nothing_before_two_samples(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    stat, cgroup = tmp_path / "stat", tmp_path / "cpu.stat"
    stat.write_text(f"cpu{cpu} 100 0 0 100 0 0 0 0 0 0\n")
    watch = CpuWatch(stat, cgroup)  # no cgroup file: only the CPUs' idle time counts
    assert watch.update() is False
    stat.write_text(f"cpu{cpu} 200 0 0 101 0 0 0 0 0 0\n")
    assert watch.update() is True
    stat.write_text(f"cpu{cpu} 290 0 0 111 0 0 0 0 0 0\n")
    assert watch.update() is True  # 10 % idle: still saturated, once saturated
    stat.write_text(f"cpu{cpu} 310 0 0 191 0 0 0 0 0 0\n")
    assert watch.update() is True  # 80 % idle: one window with room is a lull
    stat.write_text(f"cpu{cpu} 330 0 0 271 0 0 0 0 0 0\n")
    assert watch.update() is False  # two in a row: the load changed
    cgroup.write_text("throttled_usec 0\n")
    watch.update()
    cgroup.write_text("throttled_usec 900\n")
    stat.write_text(f"cpu{cpu} 331 0 0 371 0 0 0 0 0 0\n")
    assert watch.update() is True  # idle CPU time, but the container's quota ran out
    stat.unlink()
    assert watch.update() is False  # unreadable: not contended, never an error
