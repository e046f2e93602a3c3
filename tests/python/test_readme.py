"""Every Python example in README.md runs as written.

Examples that say they are started by torchrun are run by torchrun, in two processes on localhost.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import child_processes
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
TORCHRUN_MARK = "started by torchrun"
IN_PROCESS = [b for b in BLOCKS if TORCHRUN_MARK not in b.splitlines()[0]]
UNDER_TORCHRUN = [b for b in BLOCKS if TORCHRUN_MARK in b.splitlines()[0]]


def test_readme_has_python_examples():
    assert len(IN_PROCESS) >= 2
    assert len(UNDER_TORCHRUN) >= 1


@pytest.mark.parametrize("index", range(len(IN_PROCESS)))
def test_readme_python_example_runs(index):
    exec(compile(IN_PROCESS[index], f"README.md python block {index}", "exec"), {"__name__": "readme_example"})


@pytest.mark.parametrize("index", range(len(UNDER_TORCHRUN)))
def test_readme_torchrun_example_runs_in_two_processes(index, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(UNDER_TORCHRUN[index])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = child_processes.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The two ranks' lines may interleave on the shared stdout.
    found = dict(re.findall(r"rank (\d): running_mean\[:2\] = (\[[^\]]*\])", result.stdout))
    assert sorted(found) == ["0", "1"], result.stdout
    # The running statistics are synchronized: bitwise the same on both ranks.
    assert found["0"] == found["1"], result.stdout
