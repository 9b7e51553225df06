"""The install layout: every package directory is listed in pyproject and importable under memory3."""

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def listed_packages() -> tuple[list[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["packages"], setuptools["package-dir"]


def test_every_package_directory_is_listed():
    packages, package_dir = listed_packages()
    found = set()
    for import_root, directory in package_dir.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory).parts
            found.add(".".join((import_root, *relative)))
    assert sorted(found) == sorted(packages)


def test_packages_import_from_this_checkout():
    packages, package_dir = listed_packages()
    for name in packages:
        module = importlib.import_module(name)
        root = next(d for prefix, d in package_dir.items() if name == prefix or name.startswith(prefix + "."))
        assert Path(module.__file__).resolve().is_relative_to(ROOT / root)


def test_model_package_imports_no_service_code():
    for path in (ROOT / "model").rglob("*.py"):
        text = path.read_text()
        for forbidden in ("memory3.services", "import grpc", "from grpc"):
            assert forbidden not in text, f"{path.name} mentions {forbidden!r}"
