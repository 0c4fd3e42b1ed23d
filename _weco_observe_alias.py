"""The finder behind the official guide's ``from weco.observe import WecoObserver`` (weco-observe).

``weco_observe_alias.pth`` imports this at every interpreter start-up, so it is
small and imports nothing: see ``weco_observe/_weco_alias.py``. The module is
the finder, appended to the end of ``sys.meta_path``.
"""


def find_spec(fullname: str, path: object = None, target: object = None) -> object:
    """``weco`` and ``weco.observe`` when no finder before this one found them; None for anything else."""
    if fullname != "weco" and fullname != "weco.observe":
        return None
    from weco_observe._weco_alias import spec

    return spec(fullname)


def install() -> None:
    """Append this finder to ``sys.meta_path`` (once): after the path finder, so a real ``weco`` wins."""
    import sys

    module = sys.modules[__name__]
    if module not in sys.meta_path:
        sys.meta_path.append(module)  # type: ignore[arg-type]
