"""Package hygiene: public names, error hierarchy, schema version, entry points, cheap imports."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import weco_observe
from weco_observe import errors, journal, migrations

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli


@pytest.mark.parametrize("module", [weco_observe, errors])
def test_all_is_sorted_and_importable(module):
    assert module.__all__ == sorted(module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_public_sdk_names():
    from weco_observe import ObserveRun, WecoObserver  # noqa: F401 - the issue's import line

    with pytest.raises(AttributeError):
        weco_observe.NoSuchThing  # noqa: B018


def test_every_error_class_has_a_docstring_and_exit_code():
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert classes
    for cls in classes:
        assert issubclass(cls, errors.WecoObserveError), cls
        assert cls.__doc__ and len(cls.__doc__.strip().splitlines()) == 1, cls
        assert isinstance(cls.exit_code, int) and cls.exit_code != 0
    assert errors.InvalidInput.exit_code == errors.EXIT_BAD_INPUT
    assert errors.JournalUnavailable.exit_code == errors.EXIT_JOURNAL
    assert issubclass(errors.InvalidInput, ValueError)  # SDK users can catch ValueError


def test_schema_version_equals_number_of_migrations():
    assert journal.SCHEMA_VERSION == migrations.SCHEMA_VERSION == len(migrations.migrations._migrations)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "weco_observe", "--help"],
        [sys.executable, "-m", "weco_observe", "observe", "--help"],
        [sys.executable, "-c", "from weco_observe.cli import main_observe; main_observe()", "--help"],
    ],
)
def test_entry_points_answer_help(argv):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "init" in out.stdout or "observe" in out.stdout


def test_console_scripts_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"weco": "weco_observe.cli:main_weco", "weco-observe": "weco_observe.cli:main_observe"}
    assert project["requires-python"] == ">=3.10"
    deps = " ".join(project["dependencies"])
    for dep in ("typer", "sqlite-utils", "httpx", "platformdirs", "tenacity"):
        assert dep in deps


def test_import_weco_observe_is_light():
    """`import weco_observe` loads none of the heavy deps; the SDK loads no httpx/sqlite-utils either."""
    code = (
        "import sys, weco_observe\n"
        "light = sorted(m for m in sys.modules if m.startswith('weco_observe'))\n"
        "from weco_observe import WecoObserver\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'sqlite_utils', 'tenacity', 'typer'))\n"
        "print(light, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['weco_observe'] []"


def test_cli_modules_import_only_typer_at_load_time():
    code = (
        "import sys\n"
        "import weco_observe.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'sqlite_utils', 'tenacity',"
        " 'platformdirs')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_modules_have_docstrings():
    import pkgutil

    for info in pkgutil.iter_modules(weco_observe.__path__):
        if info.name == "__main__":  # runs the CLI on import
            continue
        module = importlib.import_module(f"weco_observe.{info.name}")
        assert module.__doc__, info.name
