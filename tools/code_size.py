"""Module and function sizes: no module in components/ or pipelines/ over 450 lines, no function over
80 lines (benchmarks/ included). Prints what is over; exits 1 when anything is.

    python tools/code_size.py            # the limits
    python tools/code_size.py --top 10   # the longest modules and functions, over or not
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIRS = ("components", "pipelines")
FUNCTION_DIRS = ("components", "pipelines", "benchmarks", "tools")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def python_files(dirs: tuple[str, ...]) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "work" not in p.relative_to(ROOT).parts[1:2])


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines, decorators and docstring included) of every function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.append((f"{prefix}{child.name}", start, child.end_lineno - start + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
    walk(tree, "")
    return out


def report(top: int = 0) -> tuple[list[str], list[str]]:
    modules = [(module_lines(p), p.relative_to(ROOT)) for p in python_files(MODULE_DIRS)]
    functions = [(n, f"{p.relative_to(ROOT)}:{line} {name}") for p in python_files(FUNCTION_DIRS)
                 for name, line, n in function_lengths(p)]
    if top:
        print(f"longest modules (limit {MAX_MODULE_LINES}):")
        for n, p in sorted(modules, reverse=True)[:top]:
            print(f"  {n:5d}  {p}")
        print(f"longest functions (limit {MAX_FUNCTION_LINES}):")
        for n, where in sorted(functions, reverse=True)[:top]:
            print(f"  {n:5d}  {where}")
    big_modules = [f"{p}: {n} lines" for n, p in sorted(modules, reverse=True) if n > MAX_MODULE_LINES]
    long_functions = [f"{where}: {n} lines" for n, where in sorted(functions, reverse=True) if n > MAX_FUNCTION_LINES]
    return big_modules, long_functions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=0, help="also list the N longest modules and functions")
    big_modules, long_functions = report(ap.parse_args().top)
    for line in big_modules:
        print(f"module over {MAX_MODULE_LINES} lines: {line}")
    for line in long_functions:
        print(f"function over {MAX_FUNCTION_LINES} lines: {line}")
    if big_modules or long_functions:
        print(f"{len(big_modules)} modules and {len(long_functions)} functions over the limits")
        return 1
    print("every module and function within the limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
