"""``kvlingua real-model``: a pool with a real pretrained model.

Reading order: :mod:`~experiments.realmodel.runner` (the stages), :mod:`~experiments.realmodel.levers` (each
lever's start; the objectives at equal wall time), :mod:`~experiments.realmodel.handoff` (translate against
re-prefill), :mod:`~experiments.realmodel.report` and :mod:`~experiments.realmodel.sections` (the report).
"""
