"""Loads the compiled module: the prebuilt ``syncbn_ext._C``, or a JIT build of the same sources.

The prebuilt module comes from ``pip install --no-build-isolation [-e] .``. Where it does not
import (a source checkout on ``PYTHONPATH=python``), or where ``SYNCBN_EXT_JIT=1`` asks for it,
the sources listed in ``cpp/sources.txt`` are compiled with ``torch.utils.cpp_extension.load``
(optimized, as a few unity translation units, cached under ``TORCH_EXTENSIONS_DIR``). One process
never loads both: the JIT module is registered as ``syncbn_ext._C`` (its classes named so too, so that their
pickles load with either build), and a later ``import syncbn_ext._C`` gets it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (libtorch must be loaded before the extension)

JIT_ENV = "SYNCBN_EXT_JIT"
JIT_VERBOSE_ENV = "SYNCBN_EXT_JIT_VERBOSE"
PREBUILT_NAME = "syncbn_ext._C"
JIT_MODULE_NAME = "syncbn_ext_jit"
SOURCE_LIST = Path(__file__).resolve().parent.parent.parent / "cpp" / "sources.txt"


def switch_from_environment(name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case); unset or blank is off.

    Raises:
        ValueError: anything else (never read as on or off silently).
    """
    value = os.environ.get(name, "")
    word = "".join(value.split()).lower()
    if word in ("", "0", "false", "no", "off"):
        return False
    if word in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 (or true, yes, on) or 0 (or false, no, off), got {value!r}")


class StaleBuildLockError(RuntimeError):
    """A killed JIT build left its lock file behind; loading would wait on it forever."""


@dataclass(frozen=True)
class LoadInfo:
    """How ``_C`` was loaded: ``"prebuilt"`` or ``"jit"``, and the file it came from."""

    how: str
    path: str
    reason: str


def read_source_list(source_list: Path = SOURCE_LIST) -> dict[str, list[Path]]:
    """Parses ``cpp/sources.txt`` into {part: [absolute paths]}; the same file CMake reads."""
    parts: dict[str, list[Path]] = {}
    seen: set[Path] = set()
    for number, raw in enumerate(source_list.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{source_list}:{number}: expected '<part> <path>', got {raw!r}")
        part, relative = fields
        path = (source_list.parent / relative).resolve()
        if path in seen:
            raise ValueError(f"{source_list}:{number}: {relative} is listed twice")
        seen.add(path)
        parts.setdefault(part, []).append(path)
    return parts


def project_version(cmake_lists: Path = SOURCE_LIST.parent.parent / "CMakeLists.txt") -> tuple[int, int, int]:
    """The project version from CMakeLists.txt, the one place it is written."""
    match = re.search(r"project\(syncbn VERSION (\d+)\.(\d+)\.(\d+)", cmake_lists.read_text())
    if match is None:
        raise ImportError(f"syncbn_ext: no 'project(syncbn VERSION x.y.z)' in {cmake_lists}")
    major, minor, patch = (int(group) for group in match.groups())
    return major, minor, patch


def jit_build_directory() -> Path:
    """Where torch.utils.cpp_extension.load builds and caches the JIT module."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / JIT_MODULE_NAME


def unity_sources(parts: dict[str, list[Path]], build_dir: Path, units_per_part: int = 2) -> list[Path]:
    """Each part's sources as ``units_per_part`` translation units that ``#include`` them (a unity build).

    torch's headers are then parsed, and their inline code compiled, a few times instead of once per source: the
    JIT build's cost on few cores. The sources are unity-safe (the sanitized CMake builds compile them the same
    way). Each unit names its sources' content hash, so that torch's extension cache sees a source change; a unit
    is rewritten only when it changes, so that an unchanged build is reused.
    """
    units = []
    for part, sources in parts.items():
        count = max(1, min(units_per_part, len(sources)))
        for index in range(count):
            batch = sources[index::count]
            digest = hashlib.sha256(b"".join(path.read_bytes() for path in batch)).hexdigest()
            text = f"// unity build of {len(batch)} syncbn sources; their content: sha256 {digest}\n"
            text += "".join(f'#include "{path}"\n' for path in batch)
            unit = build_dir / f"unity_{part}_{index}.cpp"
            if not unit.is_file() or unit.read_text() != text:
                unit.write_text(text)
            units.append(unit)
    return units


def processes_working_in(directory: Path) -> list[str]:
    """``"<pid> (<command>)"`` for every other process whose working directory is ``directory`` (Linux's /proc;
    elsewhere none found). torch runs a JIT build's ninja, and so its compilers, there."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    target = directory.resolve()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == target:
                found.append(f"{entry.name} ({(entry / 'comm').read_text().strip()})")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


@contextlib.contextmanager
def build_steps_logged(verbose: bool) -> Iterator[None]:
    """With ``verbose``, torch's JIT build steps (logged by torch.utils.cpp_extension, which prints only ninja's
    output itself) are shown on stderr while the build runs, where the program has not configured that logger."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not verbose or logger.hasHandlers() and logger.getEffectiveLevel() <= logging.INFO:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("syncbn_ext JIT build: %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # shown once, not again by a root handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def load_jit(verbose: bool = False) -> ModuleType:
    """Compiles (or reuses the cached build of) the core and binding sources as one module."""
    from torch.utils.cpp_extension import load

    if not SOURCE_LIST.is_file():
        raise ImportError(
            f"syncbn_ext: cannot JIT-compile: the C++ sources are not here ({SOURCE_LIST} is missing). "
            "JIT builds need a source checkout; install with 'pip install --no-build-isolation .' instead."
        )
    parts = read_source_list()
    include_dir = SOURCE_LIST.parent / "include"
    major, minor, patch = project_version()
    version_flags = [
        f"-DSYNCBN_VERSION_MAJOR={major}",
        f"-DSYNCBN_VERSION_MINOR={minor}",
        f"-DSYNCBN_VERSION_PATCH={patch}",
    ]
    build_dir = jit_build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)

    # torch's own lock file ('lock') is left behind by a killed build, and load() then waits on
    # it forever. Our loaders serialize on an flock, which dies with its process: holding it,
    # a 'lock' file can only be a dead build's.
    with open(build_dir / "syncbn_loader.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            age = time.time() - stale.stat().st_mtime
            running = processes_working_in(build_dir)
            if running:  # the Python that ran the build was killed, its ninja and compilers were not
                raise StaleBuildLockError(
                    f"syncbn_ext: a JIT build of {JIT_MODULE_NAME} was interrupted and left the lock file {stale} "
                    f"({age:.0f} s old), and processes of that build are still running in {build_dir}: "
                    f"{', '.join(running)}. Wait until they have ended (or end them), then delete the lock file "
                    f"and import again: rm {stale}"
                )
            raise StaleBuildLockError(
                f"syncbn_ext: a JIT build of {JIT_MODULE_NAME} was interrupted and left the lock file {stale} "
                f"({age:.0f} s old); no build is running. Delete it and import again: rm {stale}"
            )
        sources = unity_sources({part: parts.get(part, []) for part in ("core", "bindings")}, build_dir)
        try:
            with build_steps_logged(verbose):
                module = load(
                    name=JIT_MODULE_NAME,
                    sources=[str(unit) for unit in sources],
                    extra_include_paths=[str(include_dir)],
                    extra_cflags=["-O2", "-DSYNCBN_BUILDING_LIBRARY", *version_flags],
                    extra_ldflags=["-lrt"] if sys.platform.startswith("linux") else [],  # shm_open before glibc 2.34
                    build_directory=str(build_dir),
                    verbose=verbose,
                )
        except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
            # torch's own error (a compiler that does not run, a compile error) says nothing of why a build ran.
            compiler = os.environ.get("CXX", "c++")
            raise ImportError(
                f"syncbn_ext: the JIT build of the C++ sources in {SOURCE_LIST.parent} failed (it runs where no "
                f"prebuilt syncbn_ext._C is installed, or where {JIT_ENV}=1 asks for it). It needs a C++20 compiler "
                f"({compiler}, from $CXX) and ninja; or install the package with 'pip install --no-build-isolation "
                f".', which builds it once. The build said:\n{type(error).__name__}: {error}"
            ) from error
    # Under the name of the prebuilt module (which the module calls itself, and its classes' pickles name): a later
    # 'import syncbn_ext._C' or unpickling gets this module instead of loading the prebuilt beside it.
    sys.modules[PREBUILT_NAME] = module
    return module


def load() -> tuple[ModuleType, LoadInfo]:
    """The compiled module and how it was loaded."""
    verbose = switch_from_environment(JIT_VERBOSE_ENV)
    loaded = sys.modules.get(PREBUILT_NAME)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).parent == jit_build_directory().resolve():
        return loaded, LoadInfo("jit", loaded.__file__, "the JIT build already loaded in this process")
    if switch_from_environment(JIT_ENV):
        if loaded is not None:
            raise ImportError(
                f"syncbn_ext: {JIT_ENV}={os.environ[JIT_ENV]}, but the prebuilt syncbn_ext._C is already loaded"
            )
        module = load_jit(verbose)
        return module, LoadInfo("jit", module.__file__, f"{JIT_ENV}={os.environ[JIT_ENV]}")
    try:
        module = importlib.import_module(PREBUILT_NAME)
    except ImportError as error:
        if not SOURCE_LIST.is_file():
            raise
        module = load_jit(verbose)
        return module, LoadInfo("jit", module.__file__, f"no prebuilt syncbn_ext._C ({error})")
    return module, LoadInfo("prebuilt", module.__file__, "syncbn_ext._C imported")
