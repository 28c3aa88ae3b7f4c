"""The benchmark harness: a fake upstream, a bare baseline, load generators and a runner.

``python -m bench`` (or ``make bench``) measures the gateway against the baseline in one run
and writes ``bench/results/report.md`` and ``report.json``; see docs/performance.md.
"""
