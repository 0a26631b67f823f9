"""MUMU-mini: a synthetic world small enough to train MUMU on a CPU (see docs/MINI.md).

- ``world``: seeded scenes, rendering, captions, references, known-boxes records for bootstrapping;
- ``analyser``: finds and classifies objects and background style in generated images (shipped weights);
- ``evaluate``: the model-agnostic evaluation harness (single / pair / tokens / style suites).
"""
