"""Trace-driven network simulator: replays the real edge's and verifier's traces through a SimPy model of
shared uplinks, downlinks and a verifier queue (``python -m simulate``; see README "Network simulator").

Modules, one concern each: ``trace`` (load + validate against the contract in ``proto/trace.py``),
``framing`` (bytes on the wire), ``channel`` (rate, propagation, loss models), ``links`` (processor
sharing / TDMA), ``compute`` (fitted service times), ``batched`` (the batched engine's measured service
time and its batching rule), ``script`` (a generation of the earlier stop-and-wait
edge as events), ``loop`` (a protocol-v2 generation, stop-and-wait or pipelined, as the edge loop replays
it), ``coarse`` (a span/step generation: spans, judged steps and blocks as round trips), ``engine`` (the SimPy
model), ``metrics``, ``config``, ``study`` (runs and sweeps), ``capacity`` (devices per verifier replica at a
latency objective), ``modes`` (the modes table's simulated tokens/s), ``plots``, ``cli``.

``simulate.testbed``: the real edge and verifier behind the traces and the real-link check: ``record``
(one trace per policy from the demo pair), ``validate`` (real shaped link vs simulator), ``netns`` (two
network namespaces, ``tc tbf``), ``relay`` (userspace propagation delay), ``edge_run`` (the edge process
inside the namespace).
"""
