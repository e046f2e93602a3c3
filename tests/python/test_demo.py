"""python -m syncbn_ext demo: the synchronized row matches the whole-batch run, per-replica BN drifts."""

from __future__ import annotations

import sys

import child_processes
import pytest

from syncbn_ext.__main__ import _max_difference, main, run_demo


def test_demo_synchronized_matches_whole_batch_and_per_replica_drifts():
    per_replica, synchronized, reference = run_demo(replicas=3, steps=4, batch_per_replica=3, seed=1)
    assert [run.name for run in (per_replica, synchronized, reference)] == [
        "BatchNorm per replica",
        "synchronized BatchNorm",
        "one module, whole batch",
    ]
    assert _max_difference(synchronized.buffers, reference.buffers) < 1e-5
    assert max(abs(a - b) for a, b in zip(synchronized.losses, reference.losses, strict=True)) < 1e-5
    assert _max_difference(synchronized.parameters, reference.parameters) < 1e-5
    assert _max_difference(per_replica.buffers, reference.buffers) > 1e-3
    assert len(synchronized.step_seconds) == 4 and all(t > 0 for t in synchronized.step_seconds)
    assert all(run.buffer_history == [] for run in (per_replica, synchronized, reference))  # kept for --plot only


def test_demo_command_prints_the_table():
    result = child_processes.run(
        [sys.executable, "-m", "syncbn_ext", "demo", "--steps", "3", "--replicas", "2"], timeout=300
    )
    assert result.returncode == 0, result.stderr
    for row in ("BatchNorm per replica", "synchronized BatchNorm", "one module, whole batch", "ms/step"):
        assert row in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
        (["demo", "--replicas", "-2"], "argument --replicas: must be at least 1, got -2"),
        (["demo", "--batch-per-replica", "0"], "argument --batch-per-replica: must be at least 1, got 0"),
        (["demo", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--replicas", "0"], "argument --replicas: must be at least 1, got 0"),
        (["--passes", "x"], "argument --passes: invalid int value: 'x'"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1].endswith(f"error: {message}")
    assert "Traceback" not in error


def test_demo_across_two_processes_draws_its_plot(tmp_path):
    plot = tmp_path / "demo.png"
    result = child_processes.run(
        [
            sys.executable,
            "-m",
            "syncbn_ext",
            "demo",
            "--steps",
            "2",
            "--replicas",
            "2",
            "--processes",
            "2",
            "--plot",
            str(plot),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 processes x 2 CPU replicas" in result.stdout
    rows = {
        line[:26].strip(): line.split()
        for line in result.stdout.splitlines()
        if line[:26].strip() in ("BatchNorm per replica", "synchronized BatchNorm")
    }
    assert float(rows["synchronized BatchNorm"][-2]) < 1e-5  # running statistics vs the whole batch
    assert float(rows["BatchNorm per replica"][-2]) > 1e-3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_progress_bar_when_asked(capsys):
    run_demo(replicas=2, steps=2, batch_per_replica=2, seed=0, show_progress=True)
    err = capsys.readouterr().err
    assert "demo: 100%|" in err and "6/6" in err  # 3 ways x 2 steps
