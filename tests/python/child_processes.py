"""Child processes for the tests: bounded in time, and leaving nothing behind when they overrun.

Each child starts in a session of its own, so that on a timeout its whole process group is stopped (ranks a
launcher spawned, a benchmark's workers), not only the child. Its output goes to temporary files, never to a pipe
that could fill while another child is being waited for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

# After SIGTERM, how long a child may take to stop its own children (torchrun's agent stops its workers, which
# run in sessions of their own) before its group gets SIGKILL.
TERMINATE_GRACE_SECONDS = 10.0
# How long an overrunning child is given to print its stacks before it is stopped.
STACK_DUMP_SECONDS = 2.0
# How long gdb may take to print an overrunning child's native stacks (where gdb is installed).
NATIVE_STACKS_SECONDS = 60.0


@dataclass
class Finished:
    """A child that ended: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str


class Child:
    """A started child process."""

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: os.PathLike | None = None,
        stack_dump_signal: signal.Signals | None = None,
    ):
        """``stack_dump_signal``: a signal on which the child prints every thread's stack to its stderr (through
        ``faulthandler.register``), sent before stopping it when it overruns; its native stacks are then taken too,
        where gdb is installed."""
        self.stack_dump_signal = stack_dump_signal
        self.native_stacks = ""  # gdb's, taken when it overran
        self._stdout = tempfile.TemporaryFile()
        self._stderr = tempfile.TemporaryFile()
        self.command = list(map(str, command))
        self.process = subprocess.Popen(
            self.command, stdout=self._stdout, stderr=self._stderr, env=env, cwd=cwd, start_new_session=True
        )

    def output(self) -> Finished:
        """Its exit status (None while it runs) and everything it wrote."""
        texts = []
        for file in (self._stdout, self._stderr):
            file.seek(0)
            texts.append(file.read().decode(errors="replace"))
        return Finished(self.process.returncode, *texts)

    def stop(self) -> None:
        """SIGTERM to its whole process group; SIGKILL to the group if the child has not ended after the grace."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=TERMINATE_GRACE_SECONDS)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def wait_all(children: Sequence[Child], timeout: float) -> list[Finished]:
    """Waits for every child within one deadline; past it, stops them all and fails the test, showing each child
    still running then (with its threads' stacks where it prints them)."""
    deadline = time.monotonic() + timeout
    late: list[Child] = []
    try:
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late = [child for child in children if child.process.poll() is None]
                break
    finally:
        if late:
            _dump_stacks(late)
        for child in children:
            if child.process.poll() is None:
                child.stop()
    if late:
        reports = []
        for child in late:
            output = child.output()
            report = f"{' '.join(child.command)}\n{output.stdout[-2000:]}\n{output.stderr[-6000:]}"
            if child.native_stacks:
                report += f"\nnative stacks (gdb):\n{child.native_stacks}"
            reports.append(report)
        pytest.fail(f"{len(late)} of {len(children)} did not finish within {timeout} s:\n" + "\n\n".join(reports))
    return [child.output() for child in children]


def _dump_stacks(running: Sequence[Child]) -> None:
    """Asks each running child that can print its threads' stacks to do so, gives them a moment to, and takes their
    native stacks with gdb where it is installed (a hang in C++, or in the interpreter's shutdown, shows no Python
    frame)."""
    asked = []
    for child in running:
        if child.stack_dump_signal is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, child.stack_dump_signal)
                asked.append(child)
    if not asked:
        return
    time.sleep(STACK_DUMP_SECONDS)
    gdb = shutil.which("gdb")
    for child in asked:
        if gdb is None or child.process.poll() is not None:
            continue
        command = [gdb, "-p", str(child.process.pid), "-batch", "-nx", "-iex", "set auto-load off"]
        command += ["-ex", "set print frame-arguments none", "-ex", "thread apply all bt 20"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=NATIVE_STACKS_SECONDS)
            child.native_stacks = done.stdout[-20000:] + done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            child.native_stacks = f"(gdb took more than {NATIVE_STACKS_SECONDS:g} s)"


def run(
    command: Sequence[str], timeout: float, env: dict[str, str] | None = None, cwd: os.PathLike | None = None
) -> Finished:
    """Runs ``command`` to its end within ``timeout`` seconds (see :func:`wait_all`)."""
    return wait_all([Child(command, env, cwd)], timeout)[0]
