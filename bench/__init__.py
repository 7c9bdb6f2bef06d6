"""Benchmarks behind ``make bench`` (``python -m bench``): each writes its own section of reports/bench.json.

``bench.edge_decode``: the ``edge`` section, decode tokens/s of the ONNX edge loop vs PyTorch eager
``generate`` on CPU, with the edge step time split into ORT forward vs the rest of the loop. Its models
are built in ``bench.decode_models``, timed in ``bench.decode_timing``; ``bench.report`` writes every
section into the JSON report and prints the edge table.
"""
