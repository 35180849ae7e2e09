"""Ray Tune sweeps of Σ training: named search spaces, the sweep driver, results and ablation reports.

* :mod:`tune_spaces.spaces`: the paper's search spaces as code (``SPACES``) and trial validation;
* :mod:`tune_spaces.sweep_config`: the sweep YAML (``configs/sweeps/*.yaml``);
* :mod:`tune_spaces.trial`: one trial (the Σ training loop against the sweep's shared model hosts);
* :mod:`tune_spaces.sweep`: the driver (validate, share the pool, Tune, results, resume);
* :mod:`tune_spaces.results`: results table (CSV, Markdown) and the best config as a run YAML;
* :mod:`tune_spaces.report`: the paper's ablation plots and tables from a sweep's results.
"""
