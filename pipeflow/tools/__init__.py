"""Tools around the library: what measures it and reports on it, not what trains.

* :mod:`.flops`   -- the FLOP model of a Glow's layers.
* :mod:`.balance` -- measured per-step costs and the cuts that balance them.
* :mod:`.plan`    -- how a config cuts its model (``pipeflow plan``).
* :mod:`.bench` and :mod:`.bench_worker` -- throughput side by side (``pipeflow bench``).
* :mod:`.compare` -- bits/dim against time, by parts against end to end (``pipeflow compare``).
"""
