"""The one report toolkit every generated report is built from.

* :mod:`~experiments.toolkit.stats` — paired differences over held-out batches, the ±2 SE outcome rule,
  tolerances as a share of the no-prefix − base gap, and whether no-prefix would have passed;
* :mod:`~experiments.toolkit.pools` — the pool manifest reader, the pool table, the deep/shallow picker;
* :mod:`~experiments.toolkit.provenance` — the commit and the machine a report names.

The metric key is :class:`kvlingua.metric_names.NllKey`; the number formatter and the Agg figure are
:func:`kvlingua.report.fmt` and :func:`kvlingua.report.agg_figure` (the core's run report uses them too).
"""
