"""The wire format: how a tensor crosses Ray, in training (:mod:`workers.host`) and serving (:mod:`serve_apps`).

Every tensor crosses as a :class:`WireTensor`: its bytes as a NumPy
array, which Ray pickles out of band, so the sender's one copy is the write into the
object store and a receiver on the same node maps the stored bytes without copying.
That buffer is *read-only* (other readers share it). :func:`tensor_from_wire` makes a
tensor over it (``copy=False``) only where the receiver provably never writes into it
(source blocks read by ``IN_i``; the host's inputs, read by the frozen model), and a
private copy (``copy=True``) wherever the tensor is handed to code that may write it:
gradients given to ``autograd.backward`` (which may adopt a gradient tensor as a
parameter's ``.grad`` and accumulate into it in place), losses and NLLs returned to
callers. ``tests/workers/test_host.py`` and ``tests/serve_apps/test_transport.py`` check both claims (bytes in the store and
tensor version counters unchanged after use). We do not send ``torch.Tensor`` objects
through Ray: its zero-copy tensor reducer (``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``)
warns on every use (``ZeroCopyTensorsWarning``) and hands read-only buffers to torch
as writable ones.

Serving sends the same types between deployments: Σ latents ``[1, S, Q]``, raw blocks ``[1, S, L, D]`` (fp32) and a
mixed schedule's generator state (uint8 ``[n]``). This module imports no Ray: a wire tensor is a dataclass over a
NumPy array, which Ray pickles out of band.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kvlingua.cache import KVBlock


@dataclass(frozen=True)
class WireTensor:
    """A CPU tensor as it crosses Ray: its bytes, dtype and shape (no ``torch.Tensor`` inside)."""

    data: np.ndarray
    """``[nbytes]`` uint8, the tensor's bytes in row-major order (read-only after ``ray.get``)."""
    dtype: str
    """torch dtype name, e.g. ``"float32"``."""
    shape: tuple[int, ...]
    """The tensor's shape."""


@dataclass(frozen=True)
class WireBlock:
    """A :class:`~kvlingua.cache.KVBlock` as it crosses Ray."""

    keys: WireTensor
    """``[B, P, L, D]``."""
    values: WireTensor
    """``[B, P, L, D]``."""
    n_kv_heads: int
    """Heads the width ``D`` splits into."""


_READONLY_WARNING = "The given NumPy array is not writable"
_from_numpy_lock = threading.Lock()


def tensor_to_wire(t: Tensor) -> WireTensor:
    """``t`` as a :class:`WireTensor`; no copy when ``t`` is already a contiguous CPU tensor."""
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy()  # [nbytes], a view of t's memory
    return WireTensor(data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def tensor_from_wire(wire: WireTensor, copy: bool) -> Tensor:
    """The tensor of ``wire``: a view of the received bytes (``copy=False``) or a private copy.

    ``copy=False`` is for receivers that never write into the tensor (not in place, not
    through autograd): the bytes may be a read-only buffer of the object store shared
    with other readers. Use ``copy=True`` for anything handed to code that may write it.
    """
    dtype = getattr(torch, wire.dtype)
    data = wire.data
    if data.size == 0:  # no bytes to share (an empty array may arrive with stride 0, which torch cannot view)
        return torch.empty(wire.shape, dtype=dtype)
    if copy:
        data = data.copy()
    if data.flags.writeable:
        flat = torch.from_numpy(data)
    else:
        # A read-only object-store buffer: torch has no read-only tensors and warns (once per
        # process, for every later caller too). Silenced here and only here, because every
        # copy=False caller is shown never to write (module docstring, tests/workers/test_host.py).
        # catch_warnings swaps process-wide state: the lock keeps the host's threads from
        # interleaving their save/restore.
        with _from_numpy_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)
            flat = torch.from_numpy(data)
    return flat.view(dtype).reshape(wire.shape)


def as_tensor(x: Tensor | WireTensor, copy: bool) -> Tensor:
    """A received argument as a tensor: wire tensors are rebuilt, tensors pass unchanged."""
    return tensor_from_wire(x, copy) if isinstance(x, WireTensor) else x


def block_to_wire(block: KVBlock) -> WireBlock:
    """A block as it crosses the object store (no copy for contiguous CPU keys/values)."""
    return WireBlock(tensor_to_wire(block.keys), tensor_to_wire(block.values), int(block.n_kv_heads))


def block_from_wire(wire: WireBlock, copy: bool = False) -> KVBlock:
    """The block of ``wire``; ``copy=False`` views the received bytes (see :func:`tensor_from_wire`)."""
    return KVBlock(tensor_from_wire(wire.keys, copy), tensor_from_wire(wire.values, copy), wire.n_kv_heads)
