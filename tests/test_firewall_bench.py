"""The firewall bench's arithmetic (bench/firewall.py): the CPU per byte it reads from iperf3 and
the confidence interval of a median it reports. Pure: no namespaces."""

from __future__ import annotations

import math

import pytest

from bench.firewall import Run, median_ci95


def test_run_charges_both_ends_cpu_per_gb():
    # 1 s, client 30 %, server 90 %: 1.2 CPU-seconds for 0.8 GB -> 1.5 s/GB
    end = {"sum_received": {"bits_per_second": 6.4e9, "seconds": 1.0, "bytes": 800_000_000},
           "cpu_utilization_percent": {"host_total": 30.0, "remote_total": 90.0}}
    run = Run.parse(end)
    assert run.bps == 6.4e9 and run.nbytes == 800_000_000
    assert run.cpu_s_per_gb == pytest.approx(1.5)


def test_run_refuses_an_empty_transfer():
    end = {"sum_received": {"bits_per_second": 0.0, "seconds": 1.0, "bytes": 0},
           "cpu_utilization_percent": {"host_total": 1.0, "remote_total": 1.0}}
    with pytest.raises(ZeroDivisionError):  # Iperf.run retries it against a new server
        Run.parse(end)


@pytest.mark.parametrize(("n", "k"), [(21, 6), (11, 2), (15, 4), (5, 1)])
def test_median_ci95_order_statistics(n, k):
    values = [float(i) for i in range(n, 0, -1)]  # any order
    assert median_ci95(values) == [float(k), float(n - k + 1)]
    if n < 6:
        return  # too few rounds for 95 %: the whole range
    # the interval's coverage is >= 95 %, and one step narrower it would not be
    below = sum(math.comb(n, i) for i in range(k)) / 2**n
    assert 1 - 2 * below >= 0.95
    assert 1 - 2 * (below + math.comb(n, k) / 2**n) < 0.95
