"""The scripts read top to bottom, algorithm first (STYLE.md, CleanRL's shape): a short docstring, the flags, the
networks and losses, the training loop, then the prior's sampling rule and the rest, the infrastructure in the
shared package. Few flags, small files, and an import graph without loops: scripts import only envs/ and llmprior/,
benchmarks import no script."""

import ast
import dataclasses
import os
import re
import sys

import pytest
from helpers import ROOT

import bc
import cql_prior
import dqn_prior
import gflan_prior

SCRIPTS = {"dqn_prior.py": (dqn_prior, 800), "cql_prior.py": (cql_prior, 850), "gflan_prior.py": (gflan_prior, 1000),
           "bc.py": (bc, 500)}  # fmt: skip
FIRST_LOSS = {"dqn_prior.py": "td_target", "cql_prior.py": "td_target", "gflan_prior.py": "empirical_prior",
              "bc.py": "bc_samples"}  # fmt: skip


def leaf_flags(cls) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            out += [f"{f.name}.{name}" for name in leaf_flags(type(f.default_factory()))]
        else:
            out.append(f.name)
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_size_flags_and_order(name):
    module, max_lines = SCRIPTS[name]
    text = open(os.path.join(ROOT, name)).read()
    lines = text.splitlines()
    assert len(lines) <= max_lines, f"{name}: {len(lines)} lines"
    flags = leaf_flags(module.Args)
    assert len(flags) <= 35, f"{name}: {len(flags)} flags: {flags}"
    docstring = ast.get_docstring(ast.parse(text), clean=False)
    assert len(docstring.splitlines()) <= 30
    position = {}
    for i, line in enumerate(lines):
        match = re.match(r"(?:class|def) (\w+)", line)
        if match and match.group(1) not in position:
            position[match.group(1)] = i
    assert position["Args"] < position[FIRST_LOSS[name]] < position["train"], position
    assert position[FIRST_LOSS[name]] < 300, f"{name}: the first loss at line {position[FIRST_LOSS[name]] + 1}"
    if "LLMPrior" in position:  # the prior's sampling rule after the loop, the infrastructure last
        assert position["train"] < position["LLMPrior"] < position["validate"]
    assert lines[-2:] == ['if __name__ == "__main__":', "    runs.cli(Args, train)"]


def local_imports(path: str) -> set[str]:
    """The first-party modules a file imports (at any depth: lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_import_graph():
    scripts = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    first_party = scripts | {"envs", "llmprior"}
    for f in scripts:
        assert local_imports(os.path.join(ROOT, f"{f}.py")) & first_party <= {"envs", "llmprior"}, f
    for f in os.listdir(os.path.join(ROOT, "benchmarks")):
        if f.endswith(".py"):
            assert not local_imports(os.path.join(ROOT, "benchmarks", f)) & scripts, f
    for package in ("envs", "llmprior"):  # the package never imports a script; envs never imports llmprior
        for f in os.listdir(os.path.join(ROOT, package)):
            if f.endswith(".py"):
                imported = local_imports(os.path.join(ROOT, package, f)) & first_party
                assert imported <= ({"envs"} if package == "envs" else {"llmprior"}), (package, f, imported)


def test_no_import_loop_between_modules():
    """Module-level (and lazy) imports among envs/* and llmprior/* form no cycle."""
    graph = {}
    for package in ("envs", "llmprior"):
        for f in os.listdir(os.path.join(ROOT, package)):
            if not f.endswith(".py") or f == "__init__.py":
                continue
            tree = ast.parse(open(os.path.join(ROOT, package, f)).read())
            deps = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
                    deps.add(node.module)
                elif isinstance(node, ast.ImportFrom) and node.module == package:
                    deps.update(f"{package}.{a.name}" for a in node.names)
            graph[f"{package}.{f[:-3]}"] = deps

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph.get(start, ()))

    loops = [m for m in graph if reaches(m, m)]
    assert not loops, loops


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
