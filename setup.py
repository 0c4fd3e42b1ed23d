"""Build hooks only (the metadata is in pyproject.toml): put ``weco_observe_alias.pth`` in site-packages.

The ``.pth`` file makes the official guide's ``from weco.observe import WecoObserver``
work when the official ``weco`` package is not installed; its name and its one line
are ``weco_observe/_weco_alias.py``'s, read from there. A ``.pth`` file works only at the top of
site-packages, so the wheel carries it at its root, beside the package:

- a regular wheel (``pip install .``, ``python -m build``): ``build_py`` copies it
  into the build folder, whose contents become the wheel's root;
- an editable install (``pip install -e .``, PEP 660): setuptools builds that wheel
  itself and keeps only its own ``.pth`` and finder, so the file is added to the
  wheel it made. This overrides ``editable_wheel._create_wheel_file``, a private
  method: if a setuptools release renames it, an editable install simply comes
  without the alias (``weco observe status`` then says ``weco.observe`` is not
  importable) and nothing else changes.
"""

from __future__ import annotations

import ast
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _constants(path: str) -> dict[str, str]:
    """The module's string constants, read without importing it (the build runs before any install)."""
    tree = ast.parse(Path(__file__).resolve().parent.joinpath(path).read_text(encoding="utf-8"))
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


_ALIAS = _constants("weco_observe/_weco_alias.py")
PTH_NAME, PTH_LINE = _ALIAS["PTH_NAME"], _ALIAS["PTH_LINE"]


class build_py_with_pth(build_py):
    """``build_py`` that also writes the ``.pth`` file at the root of the wheel."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib, PTH_NAME)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, str(Path(self.build_lib, PTH_NAME))]


cmdclass: dict[str, type] = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable installs (pyproject.toml asks for >= 64)
    pass
else:

    class editable_wheel_with_pth(editable_wheel):
        """The PEP 660 editable wheel, with the ``.pth`` file added at its root."""

        def _create_wheel_file(self, bdist_wheel):  # type: ignore[no-untyped-def]
            path = Path(super()._create_wheel_file(bdist_wheel))
            from wheel.wheelfile import WheelFile  # setuptools' own import for this wheel

            with tempfile.TemporaryDirectory() as tmp:
                rebuilt = Path(tmp, path.name)  # WheelFile checks the name; it rewrites RECORD on close
                with WheelFile(path) as old, WheelFile(rebuilt, "w") as new:
                    for item in old.infolist():
                        if not item.filename.endswith(".dist-info/RECORD"):
                            new.writestr(item, old.read(item))
                    new.writestr(PTH_NAME, PTH_LINE)
                shutil.move(str(rebuilt), str(path))
            return path

    cmdclass["editable_wheel"] = editable_wheel_with_pth


setup(cmdclass=cmdclass)
