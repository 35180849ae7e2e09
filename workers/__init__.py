"""Ray side of kvlingua: model-host actors, KV streaming, Ray Train workers, the driver.

Importing this package sets the environment Ray must see *before* ``import ray``
(and that a Ray started from this process, e.g. ``ray.init()``, passes on to its raylet):

* ``RAY_free_objects_period_milliseconds=0``: the raylet frees an object as soon as it
  goes out of scope. By default it batches frees for up to a second, so a host streaming
  blocks writes each new block into object-store memory that its process has never
  touched: one page fault per 4 KiB (0.3-1 GB/s instead of memcpy speed, measured by
  ``bench/bench_transport.py``), and the store's shared memory grows towards its
  capacity. A cluster started with ``ray start`` needs the variable in the environment
  of ``ray start`` on every node.
* zero-copy torch tensors through the object store for code that sends ``torch.Tensor``
  objects (the default torch transport is about 20x slower than memcpy); the model hosts
  send bytes as ``workers.wire.WireTensor`` and do not depend on it;
* no usage-stats reporting.

Every Ray import in the project goes through ``workers`` (or imports it first).
"""
import os

os.environ.setdefault("RAY_free_objects_period_milliseconds", "0")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def quiet_embedded_worker() -> None:
    """Worker setup hook of the embedded Ray (``driver.connect``): without a dashboard there is no
    State API, so Ray Train's placement-group cleaner would warn every few seconds; errors only."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
