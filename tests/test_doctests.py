"""Every example in the package's docstrings runs, against real parts.

Every module of ``weco_observe`` is searched for examples. Examples that need
data or a server use names given here: ``journal``, an open :class:`Journal`
holding the guide's example run written through the SDK; ``run_id``, that run's
id; ``tmp``, an empty folder of the test's own; ``emulator``, a Weco API emulator
on loopback. An example marked ``+SKIP`` would prove nothing, so none may be.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import weco_observe
from emulator_fixtures import emulator  # noqa: F401
from weco_observe import WecoObserver
from weco_observe.journal import Journal

MODULES = [
    importlib.import_module(f"weco_observe.{m.name}")
    for m in pkgutil.iter_modules(weco_observe.__path__)
    if m.name != "__main__"
]
WITH_EXAMPLES = [m for m in MODULES if any(t.examples for t in doctest.DocTestFinder().find(m))]


@pytest.fixture
def guide(journal_path: Path) -> Iterator[tuple[Journal, str]]:
    """The guide's run: steps 0-2 kept, 3 failed, 4 branched from 2 and best."""
    code = "lr = 0.1\nbatch = 16\ndepth = 4\n"
    with WecoObserver(journal_path=journal_path) as obs:
        run = obs.create_run(source_code={"train.py": code}, primary_metric="val_bpb", name="my-experiment")
        assert run
        run.log_step(0, metrics={"val_bpb": 2.366}, description="baseline")
        code = code.replace("batch = 16", "batch = 32768")
        run.log_step(1, metrics={"val_bpb": 2.261}, description="increase batch size to 32K", code={"train.py": code})
        code = code.replace("lr = 0.1", "lr = 0.05")
        run.log_step(2, metrics={"val_bpb": 2.2}, description="halve the learning rate", code={"train.py": code})
        run.log_step(
            3,
            metrics={"val_bpb": 0.0},
            status="failed",
            description="double model depth (OOM)",
            code={"train.py": code.replace("depth = 4", "depth = 8")},
        )
        run.log_step(
            4,
            metrics={"val_bpb": 2.1},
            description="tried warmup instead",
            code={"train.py": code + "warmup = 100\n"},
            parent_step=2,
        )
        run_id = run.run_id
    assert run_id is not None
    with Journal(journal_path) as journal:
        yield journal, run_id


def test_the_library_modules_have_examples():
    assert len(WITH_EXAMPLES) >= 15, [m.__name__ for m in WITH_EXAMPLES]


@pytest.mark.parametrize("module", WITH_EXAMPLES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module: ModuleType, guide, tmp_path, monkeypatch, emulator):
    journal, run_id = guide
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # an example that writes a file writes it here
    names = {"journal": journal, "run_id": run_id, "tmp": work, "emulator": emulator}
    tests = doctest.DocTestFinder().find(module, extraglobs=names)
    skipped = [t.name for t in tests for e in t.examples if e.options.get(doctest.SKIP)]
    assert skipped == [], "an example marked +SKIP is never checked"
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0, "".join(out)
