"""The benchmark scripts run and print their tables (smoke runs: no timing is asserted)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import child_processes
import pytest

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


def test_kernel_memory_smoke():
    out = run_script(
        "kernel_memory.py", "--device", "cpu", "--shape", "8", "16", "32", "32", "--dtypes", "float32", "float16"
    )
    assert "input (8, 16, 32, 32) float32" in out and "input (8, 16, 32, 32) float16" in out
    for row in (
        "F.batch_norm, training forward (torch)",
        "local_stats",
        "normalize",
        "backward_reduce",
        "backward_elemt",
    ):
        assert row in out
    # Its own figures, not a target: the float32 forward kernels hold their output and no temporary.
    assert re.search(r"normalize \(forward: the output\) +1\.00 x S", out), out


@pytest.fixture
def usage_error(monkeypatch, capsys):
    """The last line of a run of benchmark ``name`` (its ``main``, in this process: an interpreter start per case
    cost the suite a minute) that must stop at its arguments: exit status 2, the usage first (nothing measured
    before it), no traceback (any other exception propagates)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def run(name, *args):
        monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / name)])  # argparse's prog: the script's name
        script = importlib.import_module(name.removesuffix(".py"))
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            script.main(list(args))
        out, err = capsys.readouterr()
        assert exit_.value.code == 2, out[-3000:] + err[-3000:]
        assert out == "" and err.startswith("usage: "), out + err
        return err.strip().splitlines()[-1]

    return run


@pytest.mark.parametrize("name", ["bench_barrier.py", "bench_batchnorm.py", "bench_distributed.py"])
def test_an_unwritable_json_path_is_a_usage_error(name, tmp_path, usage_error):
    path = tmp_path / "missing" / "out.json"
    last = usage_error(name, "--json", str(path))  # it was found only at the end, after the whole run
    assert last == f"{name}: error: argument --json: cannot write '{path}': No such file or directory"
    assert usage_error(name, "--json", str(tmp_path)) == f"{name}: error: argument --json: '{tmp_path}' is a directory"


@pytest.mark.parametrize(
    "name, args, message",
    [
        # --iters 0 --rounds 0 became 1 x 2 silently; --iters -1 failed in the spawned ranks after their set-up.
        (
            "bench_distributed.py",
            ["--iters", "0", "--rounds", "0", "--quick"],
            "argument --iters: must be at least 1, got 0",
        ),
        ("bench_distributed.py", ["--iters", "-1"], "argument --iters: must be at least 1, got -1"),
        ("bench_distributed.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        ("buffer_cost.py", ["--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
        ("buffer_cost.py", ["--replicas", "-2"], "argument --replicas: must be at least 1, got -2"),
        (
            "buffer_cost.py",
            ["--sizes-mb", "4", "-5"],
            "argument --sizes-mb: must be a finite number of at least 0, got -5",
        ),
        (
            "buffer_cost.py",
            ["--sizes-mb", "inf"],
            "argument --sizes-mb: must be a finite number of at least 0, got inf",
        ),
        ("buffer_cost.py", ["--iters", "0"], "argument --iters: must be at least 1, got 0"),
        ("buffer_cost.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        ("kernel_memory.py", ["--shape", "0", "3"], "argument --shape: must be at least 1, got 0"),
        ("kernel_memory.py", ["--shape", "4"], "--shape needs at least two sizes, (N, C, *)"),
        (
            "kernel_memory.py",
            ["--shape", "1", "3", "1"],
            "--shape 1 3 1: BatchNorm needs more than one value per channel",
        ),
        ("split_cost.py", ["0"], "argument PIXELS: must be at least 1, got 0"),
        ("split_cost.py", ["--rounds", "x"], "argument --rounds: invalid int value: 'x'"),
    ],
)
def test_bad_counts_are_usage_errors(name, args, message, usage_error):
    assert usage_error(name, *args) == f"{name}: error: {message}"


def test_split_cost_has_help():
    out = run_script("split_cost.py", "--help")  # it read sys.argv[1] as the image size: ValueError
    assert out.startswith("usage: split_cost.py") and "PIXELS" in out and "--rounds" in out
