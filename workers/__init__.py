"""Ray side of kvlingua: model-host actors, KV streaming, Ray Train workers, the driver.

Importing this package sets the environment Ray must see *before* ``import ray``:
zero-copy torch tensors through the object store (the default torch transport is
about 20x slower than memcpy) and no usage-stats reporting. Every Ray import in the
project goes through ``workers`` (or imports it first).
"""
import os

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def quiet_embedded_worker() -> None:
    """Worker setup hook of the embedded Ray (``driver.connect``): without a dashboard there is no
    State API, so Ray Train's placement-group cleaner would warn every few seconds; errors only."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
