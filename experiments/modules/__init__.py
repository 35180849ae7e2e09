"""``kvlingua modules experiment``: module portability (paper §6, Figure 5 / Table 4) over
:mod:`kvlingua.modules`: :mod:`~experiments.modules.experiment` runs it, :mod:`~experiments.modules.report`
writes the report."""
