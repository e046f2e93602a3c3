"""The package's type hints as a type-checked user meets them: the compiled module's stub (_C.pyi) matches the
module, correct code passes ``mypy --strict`` and wrong calls are flagged."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import syncbn_ext
from syncbn_ext import _C

PACKAGE = Path(syncbn_ext.__file__).resolve().parent
STUB = PACKAGE / "_C.pyi"
CASES = Path(__file__).resolve().parent / "typing_cases"
STUB_ONLY = {"__getattr__", "__setattr__"}  # the stub's way of saying "anything else"


def stub_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def stub_functions(body: list[ast.stmt]) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in body if isinstance(node, ast.FunctionDef)}


def parameter_names(function: ast.FunctionDef, bound: list[str | None]) -> list[str | None]:
    names = [argument.arg for argument in function.args.args if argument.arg != "self"]
    return [None if theirs is None else name for name, theirs in zip(names, bound, strict=False)] + names[len(bound) :]


def bound_parameter_names(obj: object) -> list[str | None]:
    """The parameter names pybind11 writes in the first line of a bound function's docstring."""
    first = (obj.__doc__ or "").splitlines()[0]
    match = re.match(r"\w+\((.*)\) -> ", first)
    assert match, f"no signature in {first!r}"
    names = [part.split(":")[0].strip() for part in re.split(r",\s*(?![^\[]*\])", match.group(1)) if part.strip()]
    # pybind11 names a parameter without py::arg "argN": positional only, its name in the stub is free.
    return [None if re.fullmatch(r"arg\d+", name) else name for name in names if name not in ("self", "/")]


def test_every_name_the_package_takes_from_the_compiled_module_is_in_its_stub():
    stubbed = set(stub_classes()) | set(stub_functions(ast.parse(STUB.read_text()).body))
    exported = {name for name in syncbn_ext.__all__ if getattr(_C, name, None) is getattr(syncbn_ext, name)}
    assert exported >= {"SyncMaster", "BarrierError", "execute_replication_callbacks"}, exported
    assert exported <= stubbed, exported - stubbed


def test_the_stub_matches_the_compiled_module():
    # Names, bases, parameter names, and which properties may be set: a binding changed without its stub fails here.
    for name, node in stub_classes().items():
        runtime = getattr(_C, name)
        bases = [base.id for base in node.bases if isinstance(base, ast.Name)]
        assert [base.__name__ for base in runtime.__bases__ if base.__name__ != "pybind11_object"] == bases, name
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign):  # an attribute the user may set
                attribute = statement.target.id
                described = inspect.getattr_static(runtime, attribute)
                assert isinstance(described, property) and described.fset is not None, (name, attribute)
        for method, function in stub_functions(node.body).items():
            if method in STUB_ONLY:
                continue
            described = inspect.getattr_static(runtime, method)
            is_property = any(getattr(d, "id", None) == "property" for d in function.decorator_list)
            assert isinstance(described, property) == is_property, (name, method)
            if is_property:
                assert described.fset is None, f"{name}.{method} may be set: declare it as an attribute"
            elif method != "__init__" or "Initialize self" not in (described.__doc__ or ""):
                bound = bound_parameter_names(described)
                assert bound == parameter_names(function, bound), (name, method)
    for name, function in stub_functions(ast.parse(STUB.read_text()).body).items():
        if name not in STUB_ONLY:
            bound = bound_parameter_names(getattr(_C, name))
            assert bound == parameter_names(function, bound), name


def marked_errors(path: Path) -> dict[int, str]:
    marks = (re.search(r"  # error: ([\w-]+)$", line) for line in path.read_text().splitlines())
    return {number: mark.group(1) for number, mark in enumerate(marks, 1) if mark}


def test_mypy_strict_passes_correct_code_and_flags_wrong_calls(tmp_path):
    env = {**os.environ, "MYPYPATH": str(PACKAGE.parent)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path),
            "--no-error-summary",
            "--show-error-codes",
            str(CASES / "user_code.py"),
            str(CASES / "misuse.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    found: dict[str, dict[int, str]] = {"user_code.py": {}, "misuse.py": {}}
    for line in result.stdout.splitlines():
        match = re.match(r".*?([\w]+\.py):(\d+): error: .*\[([\w-]+)\]$", line)
        assert match, f"unexpected mypy output: {line}\n{result.stdout}{result.stderr}"
        found[match.group(1)][int(match.group(2))] = match.group(3)
    assert found["user_code.py"] == {}, result.stdout
    assert found["misuse.py"] == marked_errors(CASES / "misuse.py"), result.stdout
