"""python -m syncbn_ext demo: the synchronized row matches the whole-batch run, per-replica BN drifts."""

from __future__ import annotations

import os
import shutil
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
        (
            ["--replicas", "2", "demo"],  # the self-check's option: it was silently overridden by the demo's default
            "argument --replicas: before 'demo' it is the self-check's, which the demo does not run; "
            "put it after 'demo': python -m syncbn_ext demo --replicas 2",
        ),
        (["--passes", "3", "demo"], "argument --passes: the self-check's, which the demo does not run"),
        (
            ["demo", "--seed", str(2**64)],  # torch's seeds end at 2**64 - 1: it overflowed in torch.manual_seed
            f"argument --seed: must be from -2**63 to 2**64 - 1 (torch's seeds), got {2**64}",
        ),
        (
            ["demo", "--seed", str(-(2**63) - 1)],
            f"argument --seed: must be from -2**63 to 2**64 - 1 (torch's seeds), got {-(2**63) - 1}",
        ),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert "Traceback" not in captured.err
    assert captured.out == ""  # before any work


def test_the_widest_seeds_are_taken(monkeypatch):
    taken = []
    monkeypatch.setattr("syncbn_ext.__main__.run_demo", lambda *args: taken.append(args[3]))
    for seed in (2**64 - 1, -(2**63)):
        assert main(["demo", "--seed", str(seed)]) == 0
    assert taken == [2**64 - 1, -(2**63)]


@pytest.mark.parametrize(
    "plot, message",
    [
        ("{tmp}/missing/demo.png", "argument --plot: no folder '{tmp}/missing'"),
        ("{tmp}", "argument --plot: '{tmp}' is a folder"),
        ("{tmp}/demo.xyz", "argument --plot: '{tmp}/demo.xyz': .xyz is not a format matplotlib writes ("),
        ("{tmp}/demo", "argument --plot: '{tmp}/demo' has no extension to name its format ("),
        # A folder that cannot be written: before, the demo trained, then failed with a traceback (also pgf without
        # LaTeX, below).
        ("/proc/demo.png", "argument --plot: matplotlib cannot save a .png file in '/proc' here: "),
    ],
)
def test_a_plot_matplotlib_cannot_write_is_a_usage_error_before_training(plot, message, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--plot", plot.format(tmp=tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert f"demo: error: {message.format(tmp=tmp_path)}" in last
    assert "Traceback" not in captured.err
    assert captured.out == ""  # nothing trained
    assert list(tmp_path.iterdir()) == []


def test_a_plot_format_matplotlib_cannot_write_here_is_a_usage_error_before_training(tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is not None:
        pytest.skip("LaTeX is installed: matplotlib writes pgf here")  # (not on the machines we test on)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--plot", str(tmp_path / "demo.pgf")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"demo: error: argument --plot: matplotlib cannot save a .pgf file in '{tmp_path}' here: " in captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []  # nothing trained, no trial file left


def test_the_command_line_errors_in_one_line_without_a_traceback():
    """The same checks, as a user meets them: exit status 2, the usage and one error line, no traceback."""
    result = child_processes.run([sys.executable, "-m", "syncbn_ext", "--replicas", "2", "demo"], timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: python -m syncbn_ext")
    assert result.stderr.strip().splitlines()[-1].startswith("python -m syncbn_ext: error: argument --replicas: ")
    assert "Traceback" not in result.stderr


def test_a_bad_syncbn_timeout_is_one_line_not_a_traceback():
    env = {**os.environ, "SYNCBN_TIMEOUT": "abc"}
    result = child_processes.run([sys.executable, "-m", "syncbn_ext", "--passes", "1"], timeout=120, env=env)
    assert result.returncode == 1
    assert result.stdout == ""  # not half the information block
    assert result.stderr.strip().splitlines() == [
        "python -m syncbn_ext: SYNCBN_TIMEOUT must be a positive number of seconds, got 'abc'"
    ]


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m syncbn_ext: versions, how _C was loaded" in " ".join(out.split())
    assert "``" not in out and ":mod:" not in out


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


def test_a_plot_over_a_writable_file_in_a_folder_that_takes_no_new_file_is_accepted(tmp_path, monkeypatch):
    # The trial save cannot go next to it there (a read-only folder: simulated, as root writes anywhere); the file
    # itself can be written over, so the format alone is tried, elsewhere.
    pytest.importorskip("matplotlib")
    from syncbn_ext import demo

    plot = tmp_path / "demo.png"
    plot.write_bytes(b"old")
    real_access = os.access
    monkeypatch.setattr(demo.os, "access", lambda path, mode: str(path) != str(tmp_path) and real_access(path, mode))
    assert demo.plot_path_error(str(plot)) is None
    assert list(tmp_path.iterdir()) == [plot] and plot.read_bytes() == b"old"
    plot.chmod(0o444)
    monkeypatch.setattr(demo.os, "access", lambda path, mode: False)
    assert demo.plot_path_error(str(plot)) == f"{str(plot)!r} cannot be written (permission denied)"
