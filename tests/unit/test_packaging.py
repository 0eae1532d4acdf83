"""The install: the four top-level folders become thyrocad.pacs, thyrocad.worker,
thyrocad.models and thyrocad.db, and nothing is installed under their bare names."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_the_thyrocad_name() -> None:
    package_dir: dict[str, str] = CONFIG["package-dir"]
    expected = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inner = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *inner)))
    assert set(CONFIG["packages"]) == expected
    assert all(name == "thyrocad" or name.startswith("thyrocad.") for name in expected)


def test_the_installed_names_import_from_outside_the_checkout(tmp_path: Path) -> None:
    code = (
        "import sys, thyrocad.pacs.meta, thyrocad.worker.app, thyrocad.db.engine, "
        "thyrocad.models.architectures\n"
        "bare = sorted({'pacs', 'worker', 'models', 'db'} & set(sys.modules))\n"
        "print(bare, thyrocad.db.engine.MIGRATIONS_DIR.is_dir())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["[]", "True"]
