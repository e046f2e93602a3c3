"""The benchmark scripts run and print their tables (smoke runs: no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import child_processes

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name, *args):
    result = child_processes.run([sys.executable, str(BENCHMARKS / name), *args], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_bench_barrier_smoke():
    out = run_script("bench_barrier.py", "--replicas", "2", "4", "--passes", "200", "--rounds", "1")
    assert "ours/(a)" in out and "ours/(b)" in out


def test_bench_batchnorm_smoke():
    out = run_script("bench_batchnorm.py", "--quick", "--image-sizes", "32", "48")
    for row in ("layer fwd+bwd 64x64x32x32", "CNN train step (8 blocks)", "layer fwd+bwd peak extra"):
        assert row in out
    assert "batch 8, 32x32" in out and "batch 8, 48x48" in out  # a wrapper table per image size
    assert "in slices (32x32)" in out and "in slices (48x48)" in out
    assert "training step time (ms)" in out and "process peak RSS (MB)" in out  # the wrapper's own cost
    assert "ratio to the same threads alone" in out and "4 alone" in out  # ... beside what threads alone cost
    assert "cores busy" in out and "4 plain" in out  # ... and synchronization's own
    assert "The split alone: one thread" in out and "oneDNN weight reorders (calls per step)" in out  # ... the floor
    assert "check layer against nn.BatchNorm2d on the whole batch" in out


def test_bench_distributed_smoke():
    out = run_script("bench_distributed.py", "--quick")
    for row in ("1 CPU replica(s)", "2 CPU replica(s)", "per synchronized layer and step"):
        assert row in out


def test_buffer_cost_smoke():
    out = run_script("buffer_cost.py", "--sizes-mb", "0", "4", "--iters", "1", "--rounds", "1")
    assert "4 MB" in out and "ms per step per 100 MB of buffers" in out and "torch.equal" in out
