"""The guide's ``from weco.observe import WecoObserver`` with only weco-observe installed (issue 10, item 13).

First the finder in fresh interpreters (ours alone, then a real ``weco`` package first on the path); then
real installs into throw-away venvs: a wheel (``pip install DIR``), an editable install, and the official
``weco`` package installed beside ours, whose import must win.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import weco_observe

#: end to end: every CLI call here is a real process (kills, signals, start-up, entry points)
pytestmark = pytest.mark.subprocess_cli

#: The project under test: the checkout the imported weco_observe comes from (PYTHONPATH picks it;
#: to run these against another release), else this test's own checkout.
ROOT = next(
    p
    for p in (Path(weco_observe.__file__).resolve().parent.parent, Path(__file__).resolve().parent.parent)
    if (p / "pyproject.toml").is_file()
)
OFFICIAL = "weco==0.4.0"


def _alias_constants() -> dict[str, str]:
    """PTH_NAME and PTH_LINE of the project under test, read as setup.py reads them (no import)."""
    tree = ast.parse((ROOT / "weco_observe" / "_weco_alias.py").read_text())
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without PYTHONPATH: an interpreter must find only what is installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _run(python: str | Path, code: str, cwd: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *flags, "-c", code], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def test_the_pth_line_imports_one_small_module_at_start_up_and_then_gives_ours(tmp_path):
    """Run the .pth line as `site` does (exec, in a python -S with only the checkout on its path)."""
    line = _alias_constants()["PTH_LINE"]
    assert line.startswith("import ") and line.count("\n") == 1  # what `site` executes from a .pth file
    code = (
        f"import sys\nbefore = set(sys.modules)\nexec({line!r})\n"
        "print(sorted(set(sys.modules) - before))\n"
        "from weco.observe import WecoObserver\n"
        "import weco_observe\n"
        "print(WecoObserver is weco_observe.WecoObserver)\n"
    )
    result = _run(sys.executable, code, tmp_path, "-S", PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['_weco_observe_alias']", "True"]  # not weco_observe, nor importlib


def test_the_pth_line_is_silent_when_the_finder_is_gone(tmp_path):
    """An editable install whose checkout was deleted: every start-up in the venv runs the line."""
    line = _alias_constants()["PTH_LINE"]
    result = _run(
        sys.executable, f"exec({line!r})\nimport sys\nprint('_weco_observe_alias' in sys.modules)", tmp_path, "-S"
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "False\n")


# -- the finder, in fresh interpreters ----------------------------------------------------------


ALIAS = "import _weco_observe_alias as a, weco_observe._weco_alias as w; a.install(); "


def test_the_alias_gives_ours_when_no_weco_package_exists(tmp_path):
    code = ALIAS + (
        "import weco_observe, importlib\n"
        "print(w.which())\n"
        "from weco.observe import WecoObserver, ObserveRun\n"
        "import weco.observe\n"
        "assert WecoObserver is weco_observe.WecoObserver and ObserveRun is weco_observe.ObserveRun\n"
        "assert weco.observe.WecoObserveWarning is weco_observe.WecoObserveWarning\n"
        "for name in ('weco.observe.observer', 'weco.run', 'no_such_module'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
        "try:\n"
        "    weco.observe.nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
        "a.install()\n"
        "print(sum(f is a for f in __import__('sys').meta_path))\n"
    )
    result = _run(sys.executable, code, tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "('weco-observe', None)",
        "module 'weco.observe' has no attribute 'nothing'",
        "1",  # installed once
    ]


def test_a_real_weco_package_wins_over_the_alias(tmp_path):
    fake = tmp_path / "site" / "weco"
    (fake / "observe").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "observe" / "__init__.py").write_text("class WecoObserver:\n    pass\n")
    code = ALIAS + (
        "print(w.which()[0])\n"
        "from weco.observe import WecoObserver\n"
        "print(WecoObserver.__module__)\n"
        "print(w.which()[0])\n"
    )
    result = _run(sys.executable, code, tmp_path, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path / "site")]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["official", "weco.observe", "official"]


# -- real installs into venvs ----------------------------------------------------------------


def _copy_project(dest: Path) -> Path:
    """What `pip install DIR` reads, copied (pip builds in the tree it is given)."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "_weco_observe_alias.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "weco_observe", dest / "weco_observe", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _venv(path: Path) -> Path:
    # --system-site-packages: typer, httpx, ... come from this interpreter's environment, so the test
    # installs only weco-observe itself (--no-deps); the venv's own site-packages comes first on sys.path.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True, timeout=120
    )
    return path / "bin" / "python"


def _pip(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def index_reachable(tmp_path_factory) -> None:
    """pip builds in an isolated environment with setuptools from the package index: skip without one."""
    where = tmp_path_factory.mktemp("probe")
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(where)]
        + ["setuptools>=64"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable for pip's build isolation: {probe.stderr.strip()[-200:]}")


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    return Path(out.stdout.strip())


GUIDE_SCRIPT = (
    "from weco.observe import WecoObserver\n"
    "import weco_observe\n"
    "obs = WecoObserver()\n"
    "run = obs.create_run(name='sweep v3', source_code={'train.py': 'x = 1\\n'}, primary_metric='val_bpb',"
    " maximize=False)\n"
    "run.log_step(step=1, status='completed', description='d', metrics={'val_bpb': 2.2},"
    " code={'train.py': 'x = 2\\n'})\n"
    "obs.close()\n"
    "print(WecoObserver.__module__, weco_observe.__file__)\n"
)


def _status(python: Path, cwd: Path, data: Path) -> dict:
    result = subprocess.run(
        [str(python), "-m", "weco_observe", "observe", "status", "--json"],
        cwd=cwd,
        env=_env(WECO_OBSERVE_DIR=str(data)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["weco_observe_import"]


@pytest.mark.slow
def test_a_wheel_install_makes_the_guides_import_work_and_the_official_package_wins(tmp_path, index_reachable):
    python = _venv(tmp_path / "venv")
    installed = _pip(python, str(_copy_project(tmp_path / "project")), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    site = _site_packages(python)
    alias = _alias_constants()
    assert (site / alias["PTH_NAME"]).read_text() == alias["PTH_LINE"]
    # nothing that collides with the official package: no `weco` module or package is shipped
    record = next(site.glob("weco_observe-*.dist-info")) / "RECORD"
    shipped = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert not {"weco", "weco.py"} & shipped and alias["PTH_NAME"] in shipped

    work = tmp_path / "work"
    work.mkdir()
    result = _run(python, GUIDE_SCRIPT, work, WECO_OBSERVE_DIR=str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    module, where = result.stdout.split()
    assert module == "weco_observe.sdk" and Path(where).is_relative_to(site)
    assert (tmp_path / "data" / "journal.db").is_file()
    assert _status(python, work, tmp_path / "data")["gives"] == "weco-observe"
    text = subprocess.run(
        [str(python), "-m", "weco_observe", "observe", "status"],
        cwd=work,
        env=_env(WECO_OBSERVE_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "weco.observe:   weco-observe's (`from weco.observe import WecoObserver` works" in text

    official = _pip(python, OFFICIAL, cwd=tmp_path)  # --no-deps: requests and rich come from this environment
    if official.returncode != 0:
        pytest.skip(f"cannot install {OFFICIAL}: {official.stderr.strip()[-300:]}")
    result = _run(python, "from weco.observe import WecoObserver; print(WecoObserver.__module__)", work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "weco.observe.observer"  # the official package's own
    status = _status(python, work, tmp_path / "data")
    assert status["gives"] == "official" and Path(status["origin"]) == site / "weco" / "__init__.py"


@pytest.mark.slow
def test_an_editable_install_has_the_alias_too(tmp_path, index_reachable):
    python = _venv(tmp_path / "venv")
    project = _copy_project(tmp_path / "project")
    installed = _pip(python, "-e", str(project), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    alias = _alias_constants()
    assert (_site_packages(python) / alias["PTH_NAME"]).read_text() == alias["PTH_LINE"]
    work = tmp_path / "work"
    work.mkdir()
    result = _run(python, GUIDE_SCRIPT, work, WECO_OBSERVE_DIR=str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    module, where = result.stdout.split()
    assert module == "weco_observe.sdk" and Path(where).is_relative_to(project)  # the checkout itself

    shutil.rmtree(project)  # the checkout deleted: the venv's interpreters still start without a word
    result = _run(python, "print('started')", work)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "started\n")
