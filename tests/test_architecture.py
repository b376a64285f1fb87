"""The package boundaries of docs/architecture.md, checked on the source: who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("bot", "captioner", "common", "storage", "train")

# Package -> the packages of ours it may import (docs/architecture.md).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "captioner": {"common"},
    "storage": {"common"},
    "bot": {"captioner", "storage", "common"},
    "train": {"captioner", "storage", "common"},
}
# Package -> third-party top-level modules it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "common": {"torch", "telegram", "sqlalchemy", "prometheus_client"},
    "captioner": {"telegram", "sqlalchemy", "aiosqlite", "alembic", "pydantic_settings"},
    "storage": {"torch", "torchvision", "telegram", "numpy", "prometheus_client"},
    # fastapi/uvicorn are the optional 'api' extra (captioner.serving.http): the bot must not need them.
    "bot": {"torch", "torchvision", "numpy", "fastapi", "uvicorn", "starlette"},
    "train": {"telegram"},
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports (relative imports resolved to its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(ROOT).parts[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def package_imports(package: str) -> dict[Path, set[str]]:
    return {path: imported_modules(path) for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package", OURS)
def test_package_imports_only_what_the_layering_allows(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted((names & set(OURS)) - ALLOWED[package] - {package})
        for path, names in package_imports(package).items()
    }
    assert {file: names for file, names in wrong.items() if names} == {}


@pytest.mark.parametrize("package", OURS)
def test_package_never_imports_another_concern(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(names & FORBIDDEN[package])
        for path, names in package_imports(package).items()
    }
    assert {file: names for file, names in wrong.items() if names} == {}


def test_the_checker_sees_imports() -> None:
    """Guards the guard: a file of the bot that imports torch is reported."""
    sample = imported_modules(ROOT / "captioner" / "model.py")
    assert "torch" in sample
    assert "captioner" in imported_modules(ROOT / "bot" / "service.py")
