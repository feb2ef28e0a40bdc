"""Portal Hub benchmark suite: ``python -m bench`` (or ``make bench``).

Starts a hub on a fresh data directory, a Node socket.io reference server and a Node load
generator, measures delivery latency, throughput, fan-out and memory per connection, and
writes ``bench/results/latest.json`` and the results block of ``docs/benchmarks.md``.
"""
