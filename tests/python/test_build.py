"""The builds: one source list, the JIT fallback and its stale-lock check, the command line."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import syncbn_ext
from syncbn_ext import _loader

ROOT = Path(__file__).resolve().parents[2]


def test_source_list_names_every_source_once():
    parts = _loader.read_source_list()
    assert set(parts) == {"core", "bindings"}
    listed = [path for paths in parts.values() for path in paths]
    assert len(listed) == len(set(listed))
    on_disk = {p.resolve() for folder in ("cpp/src", "cpp/bindings") for p in (ROOT / folder).rglob("*.cpp")}
    assert set(listed) == on_disk
    # The core never includes Python or pybind11.
    for path in parts["core"]:
        text = path.read_text()
        assert "pybind11" not in text and "Python.h" not in text and "torch/extension.h" not in text, path


def test_source_list_rejects_duplicates(tmp_path):
    listing = tmp_path / "sources.txt"
    listing.write_text("core src/a.cpp\nbindings src/a.cpp\n")
    with pytest.raises(ValueError, match="listed twice"):
        _loader.read_source_list(listing)


def test_jit_units_include_every_source_once_and_change_only_with_a_source(tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    files = [sources / f"s{i}.cpp" for i in range(5)]
    for i, path in enumerate(files):
        path.write_text(f"int f{i}() {{ return {i}; }}\n")
    build = tmp_path / "build"
    build.mkdir()
    parts = {"core": files[:3], "bindings": files[3:]}
    units = _loader.unity_sources(parts, build)
    assert [unit.name for unit in units] == [
        "unity_core_0.cpp",
        "unity_core_1.cpp",
        "unity_bindings_0.cpp",
        "unity_bindings_1.cpp",
    ]
    included = [
        line.split('"')[1] for unit in units for line in unit.read_text().splitlines() if line.startswith("#include")
    ]
    assert sorted(included) == sorted(str(path) for path in files)
    before = {unit: (unit.read_text(), unit.stat().st_mtime_ns) for unit in units}
    assert _loader.unity_sources(parts, build) == units
    assert all((unit.read_text(), unit.stat().st_mtime_ns) == before[unit] for unit in units)  # not rewritten
    files[1].write_text("int f1() { return 10; }\n")  # in core's second unit: its hash changes, nothing else
    _loader.unity_sources(parts, build)
    assert [unit.read_text() != before[unit][0] for unit in units] == [False, True, False, False]


def test_project_version_matches_package():
    assert ".".join(map(str, _loader.project_version())) == syncbn_ext._C.version()


def test_the_package_marks_its_type_hints_for_type_checkers():
    # PEP 561: without the marker, mypy and pyright ignore the package's annotations in users' code.
    import importlib.resources

    assert importlib.resources.files("syncbn_ext").joinpath("py.typed").is_file()


def test_load_info_says_how_C_was_loaded():
    info = syncbn_ext.load_info
    assert info.how in ("prebuilt", "jit")
    assert Path(info.path).is_file()
    if info.how == "prebuilt":
        prefix = Path(syncbn_ext.cmake_prefix_path)
        assert (prefix / "share/cmake/syncbn/syncbnConfig.cmake").is_file()
        assert (prefix / "include/syncbn/syncbn.h").is_file()
        assert any((prefix / "lib").glob("libsyncbn.so*"))


def run_python(code, env_updates, timeout, args=()):
    env = {**os.environ, **env_updates}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize("value", ["0", "false", " Off ", "NO", ""])
def test_the_jit_switches_read_every_usual_spelling_of_no_as_no(value):
    # Before, any value but "" or "0" asked for the JIT build: SYNCBN_EXT_JIT=false started a two-minute build.
    env = {"SYNCBN_EXT_JIT": value, "SYNCBN_EXT_JIT_VERBOSE": value}
    if syncbn_ext.load_info.how == "prebuilt":
        env["CXX"] = "/bin/false"  # a build would fail at once
    result = run_python("import syncbn_ext; print(syncbn_ext.load_info.how)", env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [syncbn_ext.load_info.how]


@pytest.mark.parametrize("variable", ["SYNCBN_EXT_JIT", "SYNCBN_EXT_JIT_VERBOSE"])
def test_a_jit_switch_that_is_no_yes_or_no_is_refused_at_import(variable):
    result = run_python("import syncbn_ext", {variable: "maybe"}, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ValueError: {variable} must be 1 (or true, yes, on) or 0 (or false, no, off), got 'maybe'"


@pytest.mark.parametrize("value", ["1", "true", " Yes ", "ON"])
def test_the_jit_switches_read_every_usual_spelling_of_yes_as_yes(monkeypatch, value):
    monkeypatch.setenv("SYNCBN_EXT_JIT_VERBOSE", value)
    assert _loader.switch_from_environment("SYNCBN_EXT_JIT_VERBOSE") is True


def test_stale_jit_lock_is_reported_not_waited_on(tmp_path):
    build_dir = tmp_path / _loader.JIT_MODULE_NAME
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # what a killed build leaves behind
    result = run_python(
        "import syncbn_ext",
        {"TORCH_EXTENSIONS_DIR": str(tmp_path), "SYNCBN_EXT_JIT": "1", "PYTHONPATH": str(ROOT / "python")},
        timeout=120,
    )
    assert result.returncode != 0
    assert "StaleBuildLockError" in result.stderr
    assert f"rm {build_dir / 'lock'}" in result.stderr


def test_a_stale_jit_lock_with_the_builds_processes_still_running_names_them(tmp_path):
    # Killing only the Python of a JIT build leaves its ninja and compilers running in the build directory: before,
    # the next import said "no build is running", and deleting the lock as told started a second build beside them.
    build_dir = tmp_path / _loader.JIT_MODULE_NAME
    build_dir.mkdir()
    (build_dir / "lock").write_text("")
    orphan = subprocess.Popen(["sleep", "120"], cwd=build_dir)  # stands for the build's ninja
    try:
        result = run_python(
            "import syncbn_ext",
            {"TORCH_EXTENSIONS_DIR": str(tmp_path), "SYNCBN_EXT_JIT": "1", "PYTHONPATH": str(ROOT / "python")},
            timeout=120,
        )
    finally:
        orphan.kill()
        orphan.wait()
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("syncbn_ext._loader.StaleBuildLockError"), result.stderr[-2000:]
    assert f"still running in {build_dir}: {orphan.pid} (sleep)" in last, last
    assert "no build is running" not in last and f"rm {build_dir / 'lock'}" in last, last


def test_a_jit_build_without_a_working_compiler_says_what_failed_and_the_way_out(tmp_path):
    # Before: torch's subprocess.CalledProcessError for '/bin/false --version', naming neither syncbn_ext nor a remedy.
    result = run_python(
        "import syncbn_ext",
        {
            "TORCH_EXTENSIONS_DIR": str(tmp_path),
            "SYNCBN_EXT_JIT": "1",
            "PYTHONPATH": str(ROOT / "python"),
            "CXX": "/bin/false",
        },
        timeout=120,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    assert any(line.startswith("ImportError: syncbn_ext: the JIT build of the C++ sources") for line in last), last
    assert "(/bin/false, from $CXX)" in result.stderr and "pip install --no-build-isolation ." in result.stderr
    assert "CalledProcessError" in result.stderr  # what the build said
    assert not (tmp_path / _loader.JIT_MODULE_NAME / "lock").exists()  # the next import tries again


def test_jit_build_compiles_the_same_sources_and_works(tmp_path):
    # A SyncMaster pickled by this process's build (a module of the established library's design holds one) must
    # load under the JIT build, and one pickled there must load here: before, the JIT build's classes belonged to a
    # module 'syncbn_ext_jit' that pickle cannot import, and unpickling the other build's loaded the prebuilt
    # syncbn_ext._C beside the JIT module (a process abort: two registrations of the 'syncbn' operators).
    here = tmp_path / "here.pickle"
    here.write_bytes(pickle.dumps(syncbn_ext.SyncMaster(_loader.read_source_list, timeout=12)))
    code = (
        "import pickle, sys, syncbn_ext; "
        "assert syncbn_ext.load_info.how == 'jit', syncbn_ext.load_info; "
        "import syncbn_ext._C; "
        "assert sys.modules['syncbn_ext._C'] is syncbn_ext._C and syncbn_ext._C.__file__.startswith(sys.argv[1]); "
        "assert syncbn_ext.SyncMaster.__module__ == 'syncbn_ext._C', syncbn_ext.SyncMaster.__module__; "
        "import importlib, syncbn_ext._native as native; importlib.reload(native); "  # finds the JIT module loaded
        "assert native._C is syncbn_ext._C and native.load_info.how == 'jit', native.load_info; "
        "from pathlib import Path; "
        "master = pickle.loads(Path(sys.argv[1], 'here.pickle').read_bytes()); "
        "assert type(master) is syncbn_ext.SyncMaster and master.timeout == 12, master; "
        "Path(sys.argv[1], 'there.pickle').write_bytes(pickle.dumps(master)); "
        "assert syncbn_ext.cmake_prefix_path is None; "
        "from syncbn_ext.__main__ import barrier_self_check; "
        "print('median', barrier_self_check(3, 200)); "
        "print(syncbn_ext._C.version())"
    )
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "SYNCBN_EXT_JIT": "1", "PYTHONPATH": str(ROOT / "python")}
    result = run_python(code, env, timeout=1200, args=[str(tmp_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "median" in result.stdout
    assert result.stdout.strip().endswith(syncbn_ext._C.version())
    there = pickle.loads((tmp_path / "there.pickle").read_bytes())
    assert type(there) is syncbn_ext.SyncMaster and there.master_callback is _loader.read_source_list
    # A second import reuses the cached build; SYNCBN_EXT_JIT_VERBOSE=1 shows the build's steps (torch logs them).
    again = run_python(
        "import syncbn_ext; print(syncbn_ext.load_info.how)", {**env, "SYNCBN_EXT_JIT_VERBOSE": "1"}, timeout=300
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.strip().splitlines()[-1] == "jit"  # after ninja's own output ("no work to do")
    assert "syncbn_ext JIT build: Building extension module syncbn_ext_jit" in again.stderr, again
    assert "syncbn_ext JIT build: Loading extension module syncbn_ext_jit" in again.stderr, again


def test_command_line_prints_versions_and_self_check():
    result = subprocess.run(
        [sys.executable, "-m", "syncbn_ext", "--replicas", "4", "--passes", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"syncbn_ext {syncbn_ext.__version__}" in out
    assert "torch 2.13.0" in out
    assert "compiler: " in out
    assert f"_C: {syncbn_ext.load_info.how}, from " in out
    assert "self-check: 4 CPU replicas x 300 barrier passes OK, median round trip" in out
