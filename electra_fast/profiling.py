"""Peak-memory measurement shared by the benchmarks and the memory tests.

``peak_memory(fn)`` returns the largest number of bytes that ``fn()`` held allocated at once above what
was allocated when it started:
  * CUDA: ``torch.cuda.reset_peak_memory_stats`` + ``max_memory_allocated`` (minus the baseline);
  * CPU: torch has no allocator statistics for CPU, so the profiler's memory events
    (``profile_memory=True``: every allocation and free by torch's CPU allocator, in order) are
    replayed and the running total's maximum is taken. Memory outside torch's allocator (e.g. a
    std::vector inside a C++ kernel) is not seen; the C++ kernels here allocate their buffers as tensors.
Both sides of every comparison are measured the same way.
"""
from __future__ import annotations

from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: "torch.device | str" = "cpu") -> int:
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        evt = stack.pop()
        if evt.tag == _EventType.Allocation:
            allocs.append((evt.start_time_ns, evt.extra_fields.alloc_size))
        stack.extend(evt.children)
    allocs.sort(key=lambda a: a[0])
    running = peak = 0
    for _, size in allocs:
        running += size
        peak = max(peak, running)
    return int(peak)
