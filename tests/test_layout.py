"""The package's layering, read from the source with `ast`: a command module (a `python -m jaxrm.X`
entry point) is a thin shell over the library, so no module in jaxrm/ imports one, not even inside
a function. Only an `if __name__ == "__main__":` block may."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import jaxrm

COMMANDS = frozenset(
    f"jaxrm.{name}" for name in ("train", "evaluate", "score", "export", "devices", "memory_plan")
)
PACKAGE_DIR = Path(jaxrm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`, the one place a command's own module may import anything."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    left, right = node.test.left, node.test.comparators
    return (
        isinstance(left, ast.Name)
        and left.id == "__name__"
        and len(right) == 1
        and isinstance(right[0], ast.Constant)
        and right[0].value == "__main__"
    )


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if not module_is_package(module):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_is_package(module: str) -> bool:
    return (PACKAGE_DIR.parent / module.replace(".", "/") / "__init__.py").is_file()


def imported_names(module: str, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the tree, function bodies included, outside
    `__main__` blocks; `from jaxrm import train` counts as importing jaxrm.train."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            found.append((node.lineno, source))
            found.extend((node.lineno, f"{source}.{alias.name}") for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def offences(find: Callable[[str, ast.AST], list[tuple[int, str]]]) -> list[str]:
    """ "path:line imports name" for each (line, name) `find(module, tree)` flags in jaxrm/."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in find(module_name(path), tree):
            found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {name}")
    return found


def command_offences(module: str, tree: ast.AST) -> list[tuple[int, str]]:
    return [(line, n) for line, n in imported_names(module, tree) if n in COMMANDS and n != module]


def test_no_module_imports_a_command():
    assert offences(command_offences) == []


def test_the_reader_sees_every_kind_of_import():
    """The checker itself: each way of importing a command is caught, a `__main__` block is not."""
    source = """
import jaxrm.train
from jaxrm import evaluate
from jaxrm.score import main
from . import export as e
def f():
    from jaxrm.devices import main
if __name__ == "__main__":
    from jaxrm.memory_plan import main
"""
    names = {name for _, name in imported_names("jaxrm.hf", ast.parse(source))}
    assert COMMANDS & names == COMMANDS - {"jaxrm.memory_plan"}


def test_the_command_list_names_real_modules():
    for name in COMMANDS:
        assert (PACKAGE_DIR.parent / f"{name.replace('.', '/')}.py").is_file(), name


# A model family is the business of jaxrm/models/: the rest of the package reaches it only
# through the family-neutral modules (the registry, the family interface, the reward head, the
# attention kernels and remat policies), and names no family.
NEUTRAL_MODULES = frozenset(
    f"jaxrm.models.{name}" for name in ("families", "family", "reward", "attention", "remat")
)
FAMILY_WORDS = ("llama", "qwen", "mistral", "olmo", "gemma", "phi")


def family_offences(module: str, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of each import of family-specific code, and each identifier naming a family,
    in a module outside jaxrm.models."""
    if module.startswith("jaxrm.models"):
        return []
    found = [
        (line, name)
        for line, name in imported_names(module, tree)
        if name.startswith("jaxrm.models.")
        and not any(name == m or name.startswith(m + ".") for m in NEUTRAL_MODULES)
    ]
    found += [
        (node.lineno, ident)
        for node in ast.walk(tree)
        for ident in identifiers(node)
        if any(word in ident.lower() for word in FAMILY_WORDS)
    ]
    return found


def identifiers(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.alias):
        return [node.asname or node.name]
    return []


def test_no_module_outside_models_imports_a_family():
    assert offences(family_offences) == []


def test_the_family_reader_sees_each_family_import():
    source = """
import jaxrm.models.decoder
from jaxrm.hf import llama_config_from_hf
from jaxrm.models.attention import ATTENTION_IMPLEMENTATIONS
from jaxrm.models.families import family_of
from jaxrm.models import qwen_hf
def f():
    from jaxrm.models.reward import RewardModel
    from jaxrm.models.gemma_hf import GEMMA2
    return config.is_olmo
"""
    found = {name for _, name in family_offences("jaxrm.train", ast.parse(source))}
    assert found == {
        "jaxrm.models.decoder",
        "llama_config_from_hf",
        "jaxrm.models.qwen_hf",
        "qwen_hf",
        "jaxrm.models.gemma_hf",
        "jaxrm.models.gemma_hf.GEMMA2",
        "GEMMA2",
        "is_olmo",
    }
    assert family_offences("jaxrm.models.reward", ast.parse(source)) == []
