"""Every remote PowerShell script is a module-level constant with a param() block that parses,
and no code path builds script text from data."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

import pytest
import tree_sitter_pwsh
from tree_sitter import Language, Node, Parser

from workflows.backends import failover, psrp, vmm
from workflows.patchers import configmgr, remote

MODULES: list[ModuleType] = [vmm, failover, psrp, remote, configmgr]
PARSER = Parser(Language(tree_sitter_pwsh.language()))


def constant_scripts() -> list[tuple[str, str]]:
    found = [
        (f"{m.__name__}.{name}", value)
        for m in MODULES
        for name, value in vars(m).items()
        if name.endswith("_SCRIPT") and isinstance(value, str)
    ]
    assert len(found) >= 4, found
    return found


def first_error(node: Node) -> str | None:
    if node.type == "ERROR" or node.is_missing:
        row, col = node.start_point
        return f"line {row + 1}, column {col + 1}: {node.type}"
    for child in node.children:
        problem = first_error(child)
        if problem:
            return problem
    return None


@pytest.mark.parametrize(("name", "script"), constant_scripts())
def test_constant_script_parses_and_has_a_param_block(name: str, script: str) -> None:
    """Each *_SCRIPT constant parses with tree-sitter-pwsh and declares its inputs in param()."""
    tree = PARSER.parse(script.encode("utf-8"))
    assert not tree.root_node.has_error, f"{name}: {first_error(tree.root_node)}"
    assert script.lstrip().lower().startswith("param("), f"{name} must start with param("


def test_the_linter_catches_a_broken_script() -> None:
    """The lint is not vacuous: an unclosed brace is flagged."""
    assert PARSER.parse(b"param($X)\nif ($X) {\n").root_node.has_error


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_scripts_sent_are_constants_never_built_from_data(module: ModuleType) -> None:
    """Cmd(..., script=True) only ever gets a *_SCRIPT constant (or the operator's own file);
    no module uses execute_ps, f-strings or concatenation for scripts."""
    source = inspect.getsource(module)
    assert "execute_ps" not in source
    assert module is psrp or "add_script" not in source
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        is_script = any(
            k.arg == "script" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if not is_script:
            continue
        arg = node.args[0]
        name = arg.id if isinstance(arg, ast.Name) else getattr(arg, "attr", "")
        allowed = name.endswith("_SCRIPT") or (module is remote and name == "body")
        assert allowed, f"{module.__name__}:{node.lineno} sends a non-constant script"
