"""The paper's experiments (§4, §5, §7) as configs, their claims as checks, the suite run and the generated report.

Reading order: :mod:`experiments.paper.suite` (one YAML per section of the paper,
``configs/paper/<section>.yaml``), :mod:`experiments.paper.claims` (a claim is a set of paired
comparisons over held-out batches; its verdict follows from the numbers),
:mod:`experiments.paper.runner` (each experiment trained on Ray Train or swept on Ray Tune, resumable),
:mod:`experiments.paper.report` (``docs/results/paper.md`` and its plots, generated from the results
directory).
"""
