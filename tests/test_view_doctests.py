"""The examples in the view modules' docstrings run, against a real journal.

Doctests are collected for these modules only (not ``--doctest-modules`` for
the whole package, whose other modules keep illustrative, skipped examples).
Examples that need data use two names given here: ``journal``, an open
:class:`Journal` holding the guide's example run written through the SDK, and
``run_id``, that run's id. An example marked ``+SKIP`` would prove nothing, so
none may be.
"""

from __future__ import annotations

import doctest
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from weco_observe import WecoObserver, diffs, export, formats, report, tree, views
from weco_observe.journal import Journal

MODULES = [views, tree, diffs, formats, export, report]


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


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module: ModuleType, guide, tmp_path, monkeypatch):
    journal, run_id = guide
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    tests = doctest.DocTestFinder().find(module, extraglobs={"journal": journal, "run_id": run_id})
    skipped = [t.name for t in tests for e in t.examples if e.options.get(doctest.SKIP)]
    assert skipped == [], "an example marked +SKIP is never checked"
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0, "".join(out)
