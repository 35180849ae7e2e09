"""``kvlingua real-model``: a pool with a real pretrained model.

Reading order: :mod:`~experiments.realmodel.runner` (the stages), :mod:`~experiments.realmodel.levers` (each
lever's start), :mod:`~experiments.realmodel.arms` (the training arms at equal wall time), :mod:`~experiments.realmodel.handoff` (translate against
re-prefill), :mod:`~experiments.realmodel.report` and :mod:`~experiments.realmodel.sections` (the report).
"""
