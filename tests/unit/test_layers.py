"""Layers point one way: parse every module's imports (including lazy and TYPE_CHECKING ones)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mongarsd"

# (importing package, forbidden target, why)
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("mongarsd.mesh", "mongarsd.api", "the API calls the mesh, never the reverse"),
    ("mongarsd.mesh", "mongarsd.cli", "sub-CLIs share helpers through mongarsd.cli_common"),
    ("mongarsd.inference", "mongarsd.cli", "sub-CLIs share helpers through mongarsd.cli_common"),
    ("mongarsd.memory", "mongarsd.api", "the store knows nothing of HTTP"),
    ("mongarsd.memory", "mongarsd.cognition", "cognition reads memory, never the reverse"),
)
# Leaf modules every layer may import: they import nothing from the project.
LEAVES = ("mongarsd.principal", "mongarsd.fsutil", "mongarsd.inference.kv_cache")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Return every absolute module name `module` imports; `from a import b` yields a and a.b."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations() -> list[str]:
    out: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        module = module_name(path)
        imports = imported_modules(path.read_text(), module, is_package=path.name == "__init__.py")
        for src, target, why in FORBIDDEN:
            if within(module, src):
                out += [f"{module} imports {name}: {why}" for name in sorted(imports) if within(name, target)]
        if module in LEAVES:
            out += [f"{module} imports {name}: it must stay a leaf" for name in sorted(imports) if within(name, "mongarsd")]
    return out


def test_layers_point_one_way() -> None:
    assert len(list(PKG.rglob("*.py"))) > 20  # the scan sees the package
    assert violations() == []


def test_import_parser_sees_every_form() -> None:
    src = (
        "import mongarsd.api.auth\n"
        "from mongarsd import cli\n"
        "from ..cognition import pipeline\n"
        "def f():\n"
        "    from mongarsd.cli_common import load_from_args\n"
        "if TYPE_CHECKING:\n"
        "    from . import gossip\n"
    )
    found = imported_modules(src, "mongarsd.mesh.service")
    assert {"mongarsd.api.auth", "mongarsd.cli", "mongarsd.cognition.pipeline", "mongarsd.mesh.gossip"} <= found
    assert within("mongarsd.cli", "mongarsd.cli") and not within("mongarsd.cli_common", "mongarsd.cli")
    assert not within("mongarsd.cli_common.load_from_args", "mongarsd.cli")


# Rule 2 (no fire-and-forget tasks): outside the supervisor, a task is spawned only through a
# TaskSupervisor or an asyncio.TaskGroup. The check flags every call to `create_task` or
# `ensure_future` (as a bare name or as an attribute of anything: asyncio, a loop, ...) except an
# attribute call on a name bound by `async with ...TaskGroup() as NAME` in the same module: those
# tasks belong to the group's block and cannot outlive it.
SPAWNERS = frozenset({"create_task", "ensure_future"})
TASK_OWNER_MODULES = frozenset({"mongarsd.supervisor"})


def _task_group_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncWith):
            for item in node.items:
                ctx = item.context_expr
                func = ctx.func if isinstance(ctx, ast.Call) else None
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called == "TaskGroup" and isinstance(item.optional_vars, ast.Name):
                    names.add(item.optional_vars.id)
    return names


def bare_task_spawns(source: str) -> list[int]:
    """Return the line numbers of create_task/ensure_future calls not made on a TaskGroup."""
    tree = ast.parse(source)
    groups = _task_group_names(tree)
    lines: list[int] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        on_group = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in groups
        if (isinstance(func, ast.Name) and func.id in SPAWNERS) or (
            isinstance(func, ast.Attribute) and func.attr in SPAWNERS and not on_group
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_bare_tasks_outside_the_supervisor() -> None:
    found = [
        f"{module_name(path)}:{line}"
        for path in sorted(PKG.rglob("*.py"))
        if module_name(path) not in TASK_OWNER_MODULES
        for line in bare_task_spawns(path.read_text())
    ]
    assert found == [], "spawn through a TaskSupervisor (spawn/spawn_once) or an asyncio.TaskGroup"


def test_bare_task_check_sees_every_form() -> None:
    src = (
        "import asyncio\n"
        "from asyncio import create_task, ensure_future\n"
        "async def f(loop, coro):\n"
        "    asyncio.create_task(coro)\n"  # 4
        "    loop.create_task(coro)\n"  # 5
        "    asyncio.get_running_loop().create_task(coro)\n"  # 6
        "    create_task(coro)\n"  # 7
        "    asyncio.ensure_future(coro)\n"  # 8
        "    ensure_future(coro)\n"  # 9
        "    async with asyncio.TaskGroup() as tg:\n"
        "        tg.create_task(coro)\n"  # allowed: owned by the group
        "    self.tg.create_task(coro)\n"  # 12: not a TaskGroup name
    )
    assert bare_task_spawns(src) == [4, 5, 6, 7, 8, 9, 12]
