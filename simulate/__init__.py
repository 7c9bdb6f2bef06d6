"""Trace-driven network simulator: replays the real edge's and verifier's traces through a SimPy model of
shared uplinks, downlinks and a verifier queue (``python -m simulate``; see README "Network simulator").

Modules, one concern each: ``trace`` (load + validate), ``framing`` (bytes on the wire), ``channel``
(rate, propagation, loss models), ``links`` (processor sharing / TDMA), ``compute`` (fitted service
times), ``script`` (a generation as events), ``engine`` (the SimPy model), ``metrics``, ``config``,
``study`` (sweeps), ``plots``, ``record`` (traces from the demo pair), ``validate`` / ``netns`` /
``relay`` / ``edge_run`` (the real shaped-link testbed), ``cli``.
"""
