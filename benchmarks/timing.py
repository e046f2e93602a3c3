"""Timing shared by the benchmarks: variants measured in interleaved rounds (these machines are noisy)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


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
        shift = round_index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            if before_each is not None:
                before_each()
            samples[name].append(median_ms(steps[name], iters))
    return samples
