"""Inputs that used to end in a traceback: lone surrogates, JSON nested 60,000 deep, endless or
blocking source files, an empty ``--metadata``.

The CLI runs as a real subprocess: each case must exit 2 with one line, ``error: ...``, on
stderr and leave the journal exactly as it was. The SDK runs in-process: each case warns and
records nothing, or raises InvalidInput with ``strict=True``.

A lone surrogate reaches the CLI the way it does in life: as bytes in ``argv`` that are not
UTF-8 (a Latin-1 terminal, a file name from another system), which Python decodes with
``surrogateescape``; or as a ``\\udXXX`` escape inside JSON text.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import dump

from weco_observe import InvalidInput, WecoObserver, WecoObserveWarning, spill

#: "café" as Latin-1: the child's argv holds "caf\udce9"
LATIN1 = b"caf\xe9"
DEEP = '{"a": ' + "[" * 60_000 + "]" * 60_000 + "}"


def _limit_memory() -> None:
    # Without a read bound, `--source /dev/zero` reads until the OOM killer comes; here it fails at 2 GiB.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def weco(cwd: Path, *args: str | bytes, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The real CLI; ``args`` may be bytes (passed to the child's argv as they are)."""
    return subprocess.run(
        [sys.executable, "-m", "weco_observe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
        preexec_fn=_limit_memory,
    )


@pytest.fixture
def box(tmp_path: Path, journal_path: Path) -> dict:
    """A journal with one run, a source file, a FIFO and a source whose name is not UTF-8."""
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    os.mkfifo(tmp_path / "fifo.py")
    (tmp_path / os.fsdecode(b"bad-\xff.py")).write_text("x = 1\n")
    made = weco(tmp_path, "observe", "init", "--metric", "loss", "--source", "train.py")
    assert made.returncode == 0, made.stderr
    return {"dir": tmp_path, "run": made.stdout.strip()}


INIT = ["observe", "init", "--metric", "loss", "--source", "train.py"]
LOG = ["observe", "log", "--run-id", "{run}", "--step", "1"]

CASES = {
    "init --name Latin-1": [*INIT, "--name", LATIN1],
    "init --metric Latin-1": ["observe", "init", "--source", "train.py", "--metric", LATIN1],
    "init --additional-instructions Latin-1": [*INIT, "-i", LATIN1],
    "init --metadata key \\ud800": [*INIT, "--metadata", '{"\\ud800": 1}'],
    "init --metadata value \\udfff deep inside": [*INIT, "--metadata", '{"a": [{"b": "x\\udfff"}]}'],
    "init --metadata Latin-1 key": [*INIT, "--metadata", b'{"caf\xe9": 1}'],
    "init --metadata 60,000 deep": [*INIT, "--metadata", DEEP],
    "init --metadata ''": [*INIT, "--metadata", ""],
    "init --source /dev/zero": ["observe", "init", "--metric", "loss", "--source", "/dev/zero"],
    "init --source FIFO": ["observe", "init", "--metric", "loss", "--source", "fifo.py"],
    "init --source name not UTF-8": ["observe", "init", "--metric", "loss", "--source", b"bad-\xff.py"],
    "log --description Latin-1": [*LOG, "--description", LATIN1],
    "log --metrics name \\ud800": [*LOG, "--metrics", '{"\\ud800": 1}'],
    "log --metrics Latin-1 name": [*LOG, "--metrics", b'{"caf\xe9": 1}'],
    "log --metrics 60,000 deep": [*LOG, "--metrics", DEEP],
    "log --metadata value \\ud800": [*LOG, "--metadata", '{"note": "\\ud800"}'],
    "log --metadata 60,000 deep": [*LOG, "--metadata", DEEP],
    "log --metadata ''": [*LOG, "--metadata", ""],
    "log --metadata '  '": [*LOG, "--metadata", "  "],
    "log --run-id Latin-1": ["observe", "log", "--run-id", LATIN1, "--step", "1"],
    "log --source /dev/zero": [*LOG, "--source", "/dev/zero"],
    "log --source FIFO": [*LOG, "--sources", "train.py", "fifo.py"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_cli_refuses_with_one_line_and_exit_2(box, journal_path, case):
    args = [a.replace("{run}", box["run"]) if isinstance(a, str) else a for a in CASES[case]]
    before = dump(journal_path)
    result = weco(box["dir"], *args)
    assert result.returncode == 2, f"{case}: exit {result.returncode}\n{result.stderr[-2000:]}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert dump(journal_path) == before, f"{case}: the journal changed"


def test_the_messages_say_what_was_wrong(box):
    def error(*args: str | bytes) -> str:
        return weco(box["dir"], *args).stderr.strip()

    assert "--name is not valid UTF-8" in error(*INIT, "--name", LATIN1)
    assert "nested too deeply" in error(*INIT, "--metadata", DEEP)
    assert "--metadata is empty" in error(*INIT, "--metadata", "")
    assert "'/dev/zero' is a device" in error(*INIT[:4], "--source", "/dev/zero")
    assert "'fifo.py' is a FIFO" in error(*INIT[:4], "--source", "fifo.py")
    log = ["observe", "log", "--run-id", box["run"], "--step", "1"]
    assert "--metrics: a key" in error(*log, "--metrics", '{"\\ud800": 1}')


def test_a_source_file_is_capped_at_50_mib_unless_the_flag_raises_it(box, journal_path):
    d = box["dir"]
    with open(d / "big.py", "wb") as f:  # sparse: refused by its size before a byte is read
        f.truncate(51 << 20)
    refused = weco(d, *INIT[:4], "--source", "big.py")
    assert refused.returncode == 2 and "larger than 50 MiB" in refused.stderr and "--max-source-mb" in refused.stderr

    (d / "mid.py").write_text("x = 1\n" * 300_000)  # 1.7 MiB of text
    log = ["observe", "log", "--run-id", box["run"], "--step", "1", "--source", "mid.py"]
    small = weco(d, *log, "--max-source-mb", "1")
    assert small.returncode == 2 and "larger than 1 MiB" in small.stderr
    assert weco(d, *log, "--max-source-mb", "0").returncode == 2
    ok = weco(d, *log, "--max-source-mb", "2")
    assert ok.returncode == 0, ok.stderr
    conn = sqlite3.connect(journal_path)
    try:
        assert conn.execute("SELECT count(*) FROM steps WHERE step = 1 AND code IS NOT NULL").fetchone()[0] == 1
    finally:
        conn.close()


# -- the SDK ------------------------------------------------------------------------------------


def _deep_dict(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


SDK_RUN_CASES = {
    "name": {"name": "caf\udce9"},
    "primary_metric": {"primary_metric": "lo\ud800ss"},
    "additional_instructions": {"additional_instructions": "\udfff"},
    "metadata key": {"metadata": {"\ud800": 1}},
    "metadata value": {"metadata": {"a": ["ok", {"b": "\udc80"}]}},
    "metadata 60,000 deep": {"metadata": _deep_dict(60_000)},
    "source_code path": {"source_code": {"caf\udce9.py": "x = 1\n"}},
}

SDK_STEP_CASES = {
    "description": {"description": "tried \ud83d alone"},
    "metric name": {"metrics": {"lo\udcffss": 1.0}},
    "metadata key": {"metadata": {"k\udc00": 1}},
    "metadata 60,000 deep": {"metadata": _deep_dict(60_000)},
    "code path": {"code": {"\udcff.py": "x = 2\n"}},
}


@pytest.mark.parametrize("case", list(SDK_RUN_CASES))
def test_sdk_create_run_warns_and_records_nothing(journal_path, case):
    kwargs = {"source_code": {"train.py": "x = 1\n"}, "primary_metric": "loss", **SDK_RUN_CASES[case]}
    with WecoObserver() as obs:
        obs.create_run(source_code={"train.py": "x = 0\n"}, primary_metric="loss")  # the journal exists
        before = dump(journal_path)
        with pytest.warns(WecoObserveWarning, match="nothing recorded"):
            run = obs.create_run(**kwargs)
        assert not run and run.run_id is None
        assert dump(journal_path) == before
    with WecoObserver(strict=True) as strict, pytest.raises(InvalidInput):
        strict.create_run(**kwargs)
    assert dump(journal_path) == before


@pytest.mark.parametrize("case", list(SDK_STEP_CASES))
def test_sdk_log_step_warns_and_records_nothing(journal_path, case):
    with WecoObserver() as obs:
        run = obs.create_run(source_code={"train.py": "x = 1\n"}, primary_metric="loss")
        before = dump(journal_path)
        with pytest.warns(WecoObserveWarning, match="nothing recorded"):
            assert run.log_step(1, **SDK_STEP_CASES[case]) is None
        assert dump(journal_path) == before
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run.log_step(1, metrics={"loss": 0.5})["step"] == 1  # the run still works
    with WecoObserver(strict=True) as strict, pytest.raises(InvalidInput):
        strict.run(run.run_id).log_step(2, **SDK_STEP_CASES[case])


def test_sdk_refuses_a_run_id_that_is_not_text(journal_path):
    with WecoObserver() as obs, pytest.raises(InvalidInput, match="not valid UTF-8"):
        obs.run("local-\udce9")


def test_sdk_bad_input_is_refused_even_when_the_journal_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the spill fallback this call would use
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with WecoObserver(journal_path=blocked / "journal.db") as obs:  # its folder is a file: unwritable
        for bad in ({"metadata": _deep_dict(60_000)}, {"name": "caf\udce9"}):
            with pytest.warns(WecoObserveWarning, match="nothing recorded"):
                assert not obs.create_run(source_code={"a.py": "x"}, primary_metric="m", **bad)
    fallback = spill.spill_dirs(blocked / "journal.db")[1]
    assert fallback.parent == tmp_path / "tmp"
    assert not fallback.exists() or not list(fallback.iterdir())


def test_a_spill_file_nested_60000_deep_is_set_aside_not_a_crash(tmp_path, journal_path, cli):
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    folder = spill.spill_dirs(journal_path)[0]
    folder.mkdir(mode=0o700, exist_ok=True)
    planted = folder / "01J00000000000000000000000.json"
    fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'{{"op": "log_step", "kwargs": {{"run": "{run}", "step": 1, "metadata": {DEEP[6:-1]}}}}}')
    result = cli("observe", "log", "--run-id", run, "--step", "2", "--metrics", json.dumps({"loss": 0.1}))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "could not import spill file" in result.stderr
    assert (folder / (planted.name + ".bad")).exists() and not planted.exists()
