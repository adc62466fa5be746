"""The project code a stage runs: its static import closure, and a digest of it.

DVC deps, the evaluation cache and the sample shards' work folder are all keyed by this closure, so
an edit to any module a stage runs (a sampler, the U-Net, checkpoint reading) reruns that stage and
never answers from a cache filled by the old code.

The closure is read from the source (every `import`, also inside functions, and every string that
names a project module, as `models.family.BUILTIN` does) rather than from `sys.modules`, so imports
a function would make later are counted too. Imports under `if TYPE_CHECKING:` run nothing and are
left out; so are empty `__init__.py` files.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "stages", "flows")
ENTRY = "flows.__main__"  # `python -m flows STAGE`, the command of every dvc.yaml stage
# Modules that name other modules as data without running them all (this one; the stage runner's table of
# stage modules, of which a run imports one): only their imports count.
NAMES_AS_DATA = (__name__, "flows.stages")


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _referenced(tree: ast.AST, strings: bool = True) -> set[str]:
    """Dotted names of every module this source imports or names in a string (and their parents)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules; attributes drop out
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            names.add(node.value)  # "models.edm"; other strings resolve to no project file and drop out
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def closure(module: str, root: Path | None = None) -> tuple[str, ...]:
    """Project files (root-relative, sorted) that running `module` may execute."""
    return _closure(module, Path(root or ROOT))


@lru_cache(maxsize=None)
def _closure(module: str, root: Path) -> tuple[str, ...]:
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if path is None or name in seen:
            continue
        seen[name] = path
        todo.extend(_referenced(ast.parse(path.read_text(), str(path)), strings=name not in NAMES_AS_DATA))
    return tuple(sorted({p.relative_to(root).as_posix() for p in seen.values() if p.stat().st_size}))


def digest(module: str, root: Path | None = None) -> str:
    """sha256 over the names and contents of `module`'s closure: changes whenever its code does."""
    root = Path(root or ROOT)
    h = hashlib.sha256()
    for rel in closure(module, root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def stage_code(stage: str, root: Path | None = None) -> tuple[str, ...]:
    """The files `python -m flows STAGE` runs: the entry point's closure (what runs around every stage, e.g.
    its lineage events) and the stage module's closure. Validating params.yaml (every family's schema) is
    the entry point's check, not the stage's work: its modules count only where the stage itself runs them."""
    validation = set(closure("stages.params", root))
    entry = [f for f in closure(ENTRY, root) if f.startswith("flows/") or f not in validation]
    return tuple(sorted({*entry, *closure(f"stages.{stage}", root)}))
