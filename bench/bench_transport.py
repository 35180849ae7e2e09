"""KV block transport actor -> actor through the Ray object store, vs an in-memory copy.

How to run (a local Ray with 2 CPUs is started and stopped by the script)::

    python bench/bench_transport.py                 # default: 8 x 256 x 16 x 512 fp32 blocks (~268 MB)
    python bench/bench_transport.py --batch 4 --positions 512 --layers 26 --width 256 --repeats 5

A producer actor holds a KV block (keys and values ``[B, P, L, D]`` fp32) and returns
it as the wire tuple ``ModelHost.prefix_block`` uses; a consumer actor receives the
object ref, reads the block (one element from every layer of keys and values, so
the whole mapping is reached) and returns. The time from submitting to the
consumer's answer is the transport time (serialize into the object store +
zero-copy read). The reference is ``torch.clone`` of the same two tensors in one
process: the machine's in-memory copy bandwidth. Printed side by side, with the
ratio (target: >= 0.5x). A ``copy_`` into an already-touched buffer (no page
faults: the raw memcpy bandwidth) is printed as a stricter second reference.
"""
from __future__ import annotations

import argparse
import statistics
import time

import workers  # noqa: F401  (zero-copy torch tensors before ``import ray``)
import ray
import torch


@ray.remote(num_cpus=0.5)
class Producer:
    def __init__(self, shape: tuple[int, ...]):
        torch.manual_seed(0)
        self.keys = torch.randn(shape)  # [B, P, L, D]
        self.values = torch.randn(shape)

    def block(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.keys, self.values, 1


@ray.remote(num_cpus=0.5)
class Consumer:
    def read(self, wire) -> float:
        keys, values, _ = wire
        return float(keys[:, :, :, 0].sum() + values[:, :, :, 0].sum())  # touches every [B, P, L] row


def copy_gbps(shape: tuple[int, ...], repeats: int, into_fresh: bool) -> float:
    """In-process copy bandwidth: ``clone`` (fresh memory, like a receiver) or ``copy_`` into a reused buffer."""
    keys, values = torch.randn(shape), torch.randn(shape)
    k2, v2 = torch.empty_like(keys), torch.empty_like(values)
    nbytes = 2 * keys.numel() * keys.element_size()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        if into_fresh:
            k2, v2 = keys.clone(), values.clone()
        else:
            k2.copy_(keys), v2.copy_(values)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


def transport_gbps(shape: tuple[int, ...], repeats: int) -> float:
    producer, consumer = Producer.remote(shape), Consumer.remote()
    ray.get(consumer.read.remote(producer.block.remote()))  # warm-up: actors up, store mapped
    nbytes = 2 * torch.Size(shape).numel() * 4
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(consumer.read.remote(producer.block.remote()))
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    shape = (args.batch, args.positions, args.layers, args.width)
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        mb = 2 * torch.Size(shape).numel() * 4 / 1e6
        ray_bw = transport_gbps(shape, args.repeats)
        clone_bw = copy_gbps(shape, args.repeats, into_fresh=True)
        copy_bw = copy_gbps(shape, args.repeats, into_fresh=False)
    finally:
        ray.shutdown()
    print(f"KV block {list(shape)} keys+values fp32 = {mb:.0f} MB, median of {args.repeats}")
    print(f"{'actor -> actor (object store)':>32}: {ray_bw:6.2f} GB/s")
    print(f"{'in-memory copy (torch.clone)':>32}: {clone_bw:6.2f} GB/s")
    print(f"{'copy_ into a reused buffer':>32}: {copy_bw:6.2f} GB/s")
    print(f"{'ratio vs clone':>32}: {ray_bw / clone_bw:6.2f}x  (target >= 0.5x)")
    print(f"{'ratio vs reused-buffer copy':>32}: {ray_bw / copy_bw:6.2f}x")


if __name__ == "__main__":
    main()
