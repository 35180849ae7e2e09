"""The paper's experiments (§4, §5, §7) as configs, their claims as checks, and the generated report.

Reading order: :mod:`kvlingua.paper.experiments` (one YAML per section of the paper,
``configs/paper/<section>.yaml``), :mod:`kvlingua.paper.claims` (a claim is a set of paired
comparisons over held-out batches; its verdict follows from the numbers),
:mod:`kvlingua.paper.report` (``docs/results/paper.md`` and its plots, generated from the
results directory). ``orchestrator/commands/paper.py`` runs them (Ray Train / Ray Tune).
No Ray here.
"""
