"""Experiments: the harness layer between the method and the command line.

Above ``kvlingua`` (the method), ``workers`` and ``tune_spaces`` (Ray); below ``orchestrator`` (the CLI, which
only parses arguments and calls). Every experiment has one shape — a frozen config, its runs (each stage
skipped when its files exist), a results directory, and a report generated from that directory only:

* :mod:`~experiments.training` — the one run function of a run config (tracked, on Ray or in process);
* :mod:`~experiments.quickstart` — ``kvlingua quickstart``;
* :mod:`~experiments.paper` — ``kvlingua paper``: the paper's experiments, claims and report;
* :mod:`~experiments.realmodel` — ``kvlingua real-model``: stages, levers, the hand-off measurement, the report;
* :mod:`~experiments.modules` — ``kvlingua modules experiment``: Figure 5 / Table 4 and its report;
* :mod:`~experiments.toolkit` — what every report shares: paired statistics and the outcome rule, pool
  tables, provenance.
"""
