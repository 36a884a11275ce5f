"""What the wheel holds: every library package, and the code location under its own import name."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_and_the_code_location_has_its_own_name() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "curation_platform").rglob("__init__.py")}
    location = {".".join(("curation_platform_dagster", *init.parent.relative_to(ROOT / "assets").parts))
                for init in (ROOT / "assets").rglob("__init__.py")}
    assert set(config["packages"]) == on_disk | location
    assert {"curation_platform_dagster", "curation_platform_dagster.defs"} <= location
    assert config["package-dir"] == {"curation_platform_dagster": "assets"}  # never a top-level module `assets`


def test_the_library_imports_no_dagster() -> None:
    """Importing every library module (the CLI included) leaves Dagster unloaded."""
    modules = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for path in (ROOT / "curation_platform").rglob("*.py")]
    code = f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\nprint('dagster' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert not [path for path in (ROOT / "curation_platform").rglob("*.py") if "dagster" in path.read_text()]
