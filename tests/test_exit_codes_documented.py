"""Every exit code in errors.py appears in the README's exit-code table."""

from __future__ import annotations

from pathlib import Path

from weco_observe import errors

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_exit_code_is_in_the_readme():
    table = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = {getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_")}
    assert {0, 2, 3, 4, 5, 6, 7, 8} <= codes
    missing = [code for code in sorted(codes) if f"\n| {code} |" not in table]
    assert not missing, f"exit codes missing from the README table: {missing}"
