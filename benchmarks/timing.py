"""Measuring shared by the benchmarks: variants in interleaved rounds (these machines are noisy), memory counters;
and the argparse types of their options, checked before any work."""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence

from syncbn_ext.__main__ import positive_int  # noqa: F401  (the command line's, for the benchmarks' options)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` in the order of round ``round_index``: rotated by one each round, so no variant always goes first."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def status_kb(field: str) -> int:
    """A memory counter of this process from /proc/self/status (``VmRSS``, ``VmHWM``: peak RSS), in kB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_mb(step: Callable[[], None]) -> float:
    """How far the resident set size rises above its level before ``step()`` while it runs, in MB: the peak of
    everything it holds at once (the kernel's peak-RSS mark, reset to the current RSS first)."""
    gc.collect()
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return (status_kb("VmHWM") - base) / 1024.0


def median_ms(step: Callable[[], None], iters: int) -> float:
    """One warm-up call (caches, after the other variants ran), then the median of ``iters`` timed calls, in ms."""
    step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_rounds(
    steps: dict[str, Callable[[], None]],
    iters: int,
    rounds: int,
    before_each: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per variant, :func:`median_ms` of each of ``rounds`` rounds; each round runs every variant in turn, the
    order rotating from round to round. ``before_each`` runs before each variant's turn (e.g. a barrier)."""
    names: Sequence[str] = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            if before_each is not None:
                before_each()
            samples[name].append(median_ms(steps[name], iters))
    return samples


def writable_file(text: str) -> str:
    """An argparse type: a file path that can be written (e.g. ``--json``), checked before the run rather than
    found unwritable at its end. A file that does not exist yet is created and removed again to find out."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    try:
        if os.path.exists(text):
            with open(text, "a", encoding="utf-8"):  # appending nothing leaves the file as it is
                pass
        else:
            with open(text, "x", encoding="utf-8"):
                pass
            os.remove(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {error.strerror}") from None
    return text
