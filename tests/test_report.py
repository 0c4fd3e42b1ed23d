"""``weco observe report``: one self-contained HTML file (browser rendering is in test_report_browser.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from weco_observe import WecoObserver


def _island(html: str) -> dict:
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.DOTALL)
    assert match, "no data island"
    return json.loads(match.group(1))


def _make_run(cli, tmp_path: Path) -> str:
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run_id = cli.ok(
        "observe", "init", "--name", "report <demo>", "--metric", "loss", "--source", "train.py"
    ).stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "0", "--metrics", '{"loss": 1.0}')
    (tmp_path / "train.py").write_text("lr = 0.05\n")
    cli.ok(
        "observe",
        "log",
        "--run-id",
        run_id,
        "--step",
        "1",
        "--metrics",
        '{"loss": 0.8, "acc": 0.5}',
        "--description",
        "</script><script>alert(1)</script> halve lr",
        "--source",
        "train.py",
    )
    cli.ok(
        "observe",
        "log",
        "--run-id",
        run_id,
        "--step",
        "2",
        "--metrics",
        '{"loss": 0.0}',
        "--status",
        "failed",
        "--description",
        "diverged",
    )
    return run_id


def test_report_is_one_self_contained_file(cli, tmp_path):
    run_id = _make_run(cli, tmp_path)
    out = tmp_path / "report.html"
    result = cli.ok("observe", "report", run_id[:10], "-o", str(out))
    assert result.stdout == "" and f"wrote {out}" in result.stderr
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>")
    # The browser may fetch nothing: the policy allows inline style and script only.
    assert "default-src 'none'" in html and "connect-src" not in html
    # No external reference of any kind (the SVG namespace is a name, not a request).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}
    # User text cannot close the data island or the page's script.
    assert html.count("</script>") == 2 and "alert(1)" in html
    assert "<title>report &lt;demo&gt; · weco-observe report</title>" in html

    data = _island(html)
    steps = data["view"]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert steps[1]["description"].startswith("</script>")
    assert data["view"]["best"]["step"] == 1 and data["view"]["metrics"] == ["loss", "acc"]
    assert data["diffs"]["1"] == [
        {
            "path": "train.py",
            "status": "modified",
            "lines": ["--- step0/train.py", "+++ step1/train.py", "@@ -1 +1 @@", "-lr = 0.1", "+lr = 0.05"],
        }
    ]
    assert data["diffs"]["2"] == []  # no code of its own: same code as its parent
    assert "0" not in data["diffs"]  # the baseline has no parent


def test_report_errors_are_one_line(cli, tmp_path):
    run_id = _make_run(cli, tmp_path)
    result = cli("observe", "report", run_id)
    assert result.returncode == 2 and "--output" in result.stderr
    result = cli("observe", "report", run_id, "-o", str(tmp_path / "missing" / "r.html"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write ")
    result = cli("observe", "report", "local-nope", "-o", str(tmp_path / "r.html"))
    assert result.returncode == 2 and "no run 'local-nope'" in result.stderr


def test_a_1000_step_report_stays_small(cli, tmp_path, journal_path):
    lines = [f"w{i} = {i}" for i in range(200)]
    with WecoObserver(journal_path=journal_path) as obs:
        run = obs.create_run(source_code={"train.py": "\n".join(lines)}, primary_metric="loss")
        for step in range(1000):
            lines[step % 200] = f"w{step % 200} = {step} * 2"
            run.log_step(
                step,
                metrics={"loss": 1 / (step + 1)},
                status="failed" if step % 7 == 3 else "completed",
                description=f"experiment {step}",
                code={"train.py": "\n".join(lines)},
            )
    out = tmp_path / "big.html"
    cli.ok("observe", "report", run.run_id, "-o", str(out))
    size = out.stat().st_size
    assert size < 5_000_000
    data = _island(out.read_text(encoding="utf-8"))
    assert len(data["view"]["steps"]) == 1000 and len(data["diffs"]) == 999
    assert data["view"]["best"]["step"] == 999
