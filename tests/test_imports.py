"""The packages' layering: merging/ and evaluators/ sit below search/ and beside each other.

Neither imports search/, the other one, Optuna or Ray (only search/ drives a study), so each can be
used and tested on its own. Every import statement counts, inside functions and TYPE_CHECKING
blocks too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support.runs import REPO

FORBIDDEN = {
    "merging": ("search", "evaluators", "optuna", "ray"),
    "evaluators": ("search", "merging", "optuna", "ray"),
}


def _module_name(root: Path, path: Path) -> tuple[str, str]:
    """(module, the package its relative imports start from) of a file under root."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imported(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    _, package = _module_name(root, path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import name` may name a submodule: check both spellings
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def offenders(root: Path, package: str) -> list[str]:
    """`file:line imports module` for each import of a module the package must not use."""
    banned = FORBIDDEN[package]
    out = []
    for path in sorted((root / package).rglob("*.py")):
        seen = set()
        for line, module in imported(root, path):
            top = module.split(".")[0]
            if top in banned and (line, top) not in seen:
                seen.add((line, top))
                out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_packages_import_neither_search_nor_each_other_nor_optuna_or_ray(package):
    found = offenders(REPO, package)
    assert not found, "\n".join(found)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    (tmp_path / "merging" / "sub").mkdir(parents=True)
    (tmp_path / "merging" / "__init__.py").write_text("from merging import methods\n")
    (tmp_path / "merging" / "sub" / "__init__.py").write_text("")
    (tmp_path / "merging" / "sub" / "late.py").write_text(
        "import torch\n"
        "from .. import errors\n"
        "\n"
        "def f():\n"
        "    import ray.util\n"
        "    from search.config import load_config\n"
        "    return importlib.import_module('optuna')\n"
    )
    (tmp_path / "evaluators").mkdir()
    (tmp_path / "evaluators" / "x.py").write_text("from . import merging\n")
    assert offenders(tmp_path, "merging") == [
        "merging/sub/late.py:5 imports ray.util",
        "merging/sub/late.py:6 imports search.config",
        "merging/sub/late.py:7 imports optuna",
    ]
    # evaluators/merging.py would be evaluators' own module, not the package merging
    assert offenders(tmp_path, "evaluators") == []


def test_no_module_compares_a_method_family_or_keep_rule_to_a_string():
    """Behaviour comes from the method table (merging/catalog.py): a family or keep rule spelled as
    a string elsewhere would drift from the table's rows without a test noticing."""
    pattern = re.compile(r"\b(family|keep)\s*(==|!=|\bin\b|\bis\b)\s*[\"'(]")
    offenders = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for package in ("search", "merging", "evaluators")
        for path in sorted((REPO / package).rglob("*.py"))
        if path != REPO / "merging" / "catalog.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
