"""The guide's ``from weco.observe import WecoObserver``, with only weco-observe installed.

Scripts written from the official guide begin with that import. weco-observe
ships no ``weco`` package (it would collide with the official one, and the last
one installed would win). Instead ``weco_observe_alias.pth``, which the build
puts in site-packages (see ``setup.py``), imports the top-level module
``_weco_observe_alias`` at interpreter start-up and calls its ``install()``,
which appends one finder to the **end** of ``sys.meta_path``. Python asks a finder there only after every other finder,
the path finder included, has failed: so it answers ``import weco`` only when
no real ``weco`` package is anywhere on ``sys.path``. With the official package
installed, its import wins, untouched; with ours alone:

- ``weco`` is a stand-in package that holds nothing but ``weco.observe``;
- ``weco.observe`` gives ``weco_observe``'s public names, loaded on first use
  (``WecoObserver``, ``ObserveRun``, ``WecoObserveWarning``, ...).

**Start-up cost.** Every interpreter in the environment pays for the ``.pth``
line, so the finder is a top-level module of its own, a few lines that import
nothing (importing ``weco_observe`` would mean two modules, this one three): the
module is the finder, its ``find_spec`` compares a name with two strings and
returns for any other import, and only an ``import weco`` that got that far
imports this module for the spec. ``benchmarks/bench_import_alias.py`` measures
it; a finder defined inline in the ``.pth`` line cost more (it is compiled at
every start-up). ``python -S``/``-I`` skip ``.pth`` files, and with them the
alias. ``which()`` says what ``import weco.observe`` gives in this interpreter
(``weco observe status`` shows it).
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

PTH_NAME = "weco_observe_alias.pth"
#: The ``.pth`` line; ``setup.py`` reads it from here. ``site`` executes a line that starts with
#: ``import`` and prints a traceback for any error, at every start-up of every interpreter in the
#: environment: so a finder that is gone (an editable install whose checkout was deleted or moved)
#: must cost nothing but the alias, not a traceback. The inner ``exec`` of a three-line ``try`` adds
#: about 60 us of compiling to each start-up (``benchmarks/bench_import_alias.py`` measures the whole line).
PTH_LINE = (
    'import sys; exec("try: import _weco_observe_alias as a\\nexcept ImportError: a = None\\nif a: a.install()")\n'
)
#: The finder's module, at the top of site-packages beside the ``.pth`` file.
FINDER_MODULE = "_weco_observe_alias"
#: The alias modules' ``__spec__.origin``.
ORIGIN = "weco-observe alias"

_DOCS = {
    "weco": "weco-observe's stand-in for the official `weco` package, which is not installed: only `weco.observe`.",
    "weco.observe": "weco-observe's `weco.observe`: `from weco.observe import WecoObserver` gives weco_observe's.",
}


def _observe_getattr(name: str) -> object:
    import weco_observe

    try:
        return getattr(weco_observe, name)
    except AttributeError:
        raise AttributeError(f"module 'weco.observe' has no attribute {name!r}") from None


class _Loader:
    """Makes the two stand-in modules; ``weco.observe`` forwards every name to ``weco_observe``."""

    @staticmethod
    def create_module(spec: "ModuleSpec") -> None:
        return None  # the default module object

    @staticmethod
    def exec_module(module: "ModuleType") -> None:
        module.__doc__ = _DOCS[module.__name__]
        if module.__name__ == "weco.observe":
            # setattr: a module's __getattr__ is the PEP 562 hook, not an attribute mypy knows of
            setattr(module, "__all__", ["ObserveRun", "WecoObserver"])  # noqa: B010
            setattr(module, "__getattr__", _observe_getattr)  # noqa: B010


def spec(fullname: str) -> "ModuleSpec | None":
    """The spec of ``weco`` or ``weco.observe``, for the finder (``_weco_observe_alias.find_spec``)."""
    if fullname != "weco" and fullname != "weco.observe":
        return None
    from importlib.machinery import ModuleSpec

    # _Loader has the two methods of importlib.abc.Loader, without importing importlib.abc
    return ModuleSpec(fullname, _Loader, origin=ORIGIN, is_package=fullname == "weco")  # type: ignore[arg-type]


def which() -> "tuple[str | None, str | None]":
    """What ``import weco.observe`` gives here, without importing anything: ``("weco-observe", None)`` for
    ours, ``("official", path of weco/__init__.py)`` for an installed ``weco`` package, or ``(None, None)``
    when it cannot be imported (the alias is not installed: ``python -S``, or a checkout on ``PYTHONPATH``)."""
    from importlib.util import find_spec

    if "weco" in sys.modules:
        spec = getattr(sys.modules["weco"], "__spec__", None)
    else:
        try:
            spec = find_spec("weco")
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        return None, None
    if spec.origin == ORIGIN:
        return "weco-observe", None
    return "official", spec.origin
