"""The shape of the library's code: its largest class and function, its longest module, and
the places that test what a model is.

    python benchmarks/code_shape.py [--out=benchmarks/results/code_shape.json]

Reads every module of `clustr_tf/` (and, for the model-type tests, the binaries in
`training/` and `export/`) with `ast`, and reports:

- `largest_class`, `largest_function`: the name, module and length in lines (docstring
  included, from `def`/`class` to the last line of the body) of the longest;
- `longest_module`: the module with the most lines, and the line count of each;
- `model_type_tests`: every place that decides what a model is by looking at it:
  `getattr(x, "cluster_centers", ...)`, `hasattr(x, "cluster_centers")` and
  `isinstance(x, ClusTRModel | SoftmaxClassifier)`, with file and line.

Saves the result file and prints it as one JSON object on the last line.
"""

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402
LIBRARY = "clustr_tf"
BINARIES = ("training", "export")
MODEL_CLASSES = ("ClusTRModel", "SoftmaxClassifier")


def _modules(folder):
    for base, _, files in sorted(os.walk(os.path.join(ROOT, folder))):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(base, name), ROOT)


def _type_tests(tree):
    """Line numbers where a model's kind is decided by inspecting it."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        name, args = node.func.id, node.args
        if name in ("getattr", "hasattr") and len(args) >= 2 and isinstance(args[1], ast.Constant) \
                and args[1].value == "cluster_centers":
            lines.append(node.lineno)
        elif name == "isinstance" and len(args) == 2:
            kinds = args[1].elts if isinstance(args[1], ast.Tuple) else [args[1]]
            if any((isinstance(k, ast.Attribute) and k.attr in MODEL_CLASSES)
                   or (isinstance(k, ast.Name) and k.id in MODEL_CLASSES) for k in kinds):
                lines.append(node.lineno)
    return sorted(lines)


def measure():
    largest = {"class": None, "function": None}
    modules = {}
    type_tests = []
    for folder in (LIBRARY, *BINARIES):
        for path in _modules(folder):
            with open(os.path.join(ROOT, path)) as fh:
                text = fh.read()
            tree = ast.parse(text, filename=path)
            type_tests += [f"{path}:{line}" for line in _type_tests(tree)]
            if folder != LIBRARY:
                continue
            modules[path] = len(text.splitlines())
            for node in ast.walk(tree):
                kind = ("class" if isinstance(node, ast.ClassDef) else "function"
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
                if kind is None:
                    continue
                size = node.end_lineno - node.lineno + 1
                if largest[kind] is None or size > largest[kind]["lines"]:
                    largest[kind] = {"name": node.name, "module": path, "lines": size}
    longest = max(modules, key=modules.get)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "largest_class": largest["class"],
        "largest_function": largest["function"],
        "longest_module": {"module": longest, "lines": modules[longest]},
        "module_lines": modules,
        "model_type_tests": {"count": len(type_tests), "places": type_tests},
        "command": "python benchmarks/code_shape.py",
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "code_shape.json"))
    args = parser.parse_args()
    result = measure()
    machine.save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
