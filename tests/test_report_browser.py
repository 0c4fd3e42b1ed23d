"""The report and the local UI in real headless Chromium: the tree, the chart and a diff render.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``). Without them these tests skip, unless
``WECO_OBSERVE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
Screenshots land in each test's tmp dir.

One Chromium serves the whole module (starting it costs seconds); each test
takes it through the ``browser`` fixture, which starts from a blank page with
an empty console log: a UI page left open by an earlier test would otherwise
keep polling its stopped server and log errors into the next test's check.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ui import UI
from test_views import import_run_without_goal

from weco_observe import WecoObserver

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
]


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    paths = _browser_paths()
    if paths is None:
        message = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("WECO_OBSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _blank(driver) -> None:
    """Leave whatever page is open (stopping its timers and fetches) and drop the console log so far."""
    driver.get("about:blank")
    driver.get_log("browser")  # reading the log empties it


@pytest.fixture
def browser(chromium) -> Iterator[object]:
    """The module's Chromium on a blank page, its console log empty; left blank again afterwards."""
    _blank(chromium)
    yield chromium
    _blank(chromium)


def _wait(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _count(driver, selector: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", selector)


def _text(driver, selector: str) -> str:
    return driver.execute_script(
        "var n = document.querySelector(arguments[0]); return n ? n.textContent : ''", selector
    )


def _severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _guide_run(cli, tmp_path: Path) -> str:
    src = tmp_path / "train.py"
    src.write_text("lr = 0.1\nbatch = 16\ndepth = 4\n")
    run_id = cli.ok(
        "observe", "init", "--name", "nanogpt speedrun", "--metric", "val_bpb", "--source", "train.py"
    ).stdout.strip()
    steps = [
        (0, "completed", {"val_bpb": 2.366, "memory_gb": 10.2}, "baseline", None, None),
        (
            1,
            "completed",
            {"val_bpb": 2.261, "memory_gb": 12.0},
            "increase batch size to 32K",
            None,
            "lr = 0.1\nbatch = 32768\ndepth = 4\n",
        ),
        (
            2,
            "completed",
            {"val_bpb": 2.2, "memory_gb": 12.0},
            "halve the learning rate",
            None,
            "lr = 0.05\nbatch = 32768\ndepth = 4\n",
        ),
        (
            3,
            "failed",
            {"val_bpb": 0.0, "memory_gb": 0.0},
            "double model depth (OOM)",
            None,
            "lr = 0.05\nbatch = 32768\ndepth = 8\n",
        ),
        (
            4,
            "completed",
            {"val_bpb": 2.1, "memory_gb": 12.5},
            "add a warmup instead",
            "2",
            "lr = 0.05\nbatch = 32768\ndepth = 4\nwarmup = 100\n",
        ),
    ]
    for step, status, metrics, description, parent, code in steps:
        args = [
            "observe",
            "log",
            "--run-id",
            run_id,
            "--step",
            str(step),
            "--status",
            status,
            "--metrics",
            json.dumps(metrics),
            "--description",
            description,
        ]
        if parent:
            args += ["--parent-step", parent]
        if code:
            src.write_text(code)
            args += ["--source", "train.py"]
        cli.ok(*args)
    return run_id


def test_report_renders_tree_chart_and_diff_offline(browser, cli, tmp_path):
    run_id = _guide_run(cli, tmp_path)
    out = tmp_path / "report.html"
    cli.ok("observe", "report", run_id, "-o", str(out))
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#tree-svg circle.node") == 5, what="the tree")

    # The tree: five nodes, the failed one hollow, step 4 in the main lane and marked best.
    assert _count(browser, ".row") == 5
    assert _count(browser, "#tree-svg circle.node.failed") == 1
    assert _count(browser, "#tree-svg circle.node.best") == 1
    assert "from 2" in _text(browser, '.row[data-step="4"]')
    # The chart: four kept points, one failed cross, the best-so-far line.
    assert _count(browser, "#chart-svg circle.pt") == 4
    assert _count(browser, "#chart-svg path.fail") == 1
    assert _count(browser, "#best-line") == 1
    # The best step is selected, with its diff against its parent.
    assert _text(browser, "#detail-title").startswith("Step 4 · best")
    assert "+warmup = 100" in _text(browser, "#diff .diff .a")
    assert "2.1" in _text(browser, "#best-card") and "+11.2%" in _text(browser, ".cards")
    browser.save_screenshot(str(tmp_path / "report.png"))

    # Selecting another step shows its own diff; another metric redraws the chart.
    browser.find_element("css selector", '.row[data-step="2"]').click()
    _wait(lambda: "-lr = 0.1" in _text(browser, "#diff"), what="step 2's diff")
    assert "+lr = 0.05" in _text(browser, "#diff")
    browser.execute_script(
        "var s = document.getElementById('metric-select'); s.value = 'memory_gb'; s.dispatchEvent(new Event('change'))"
    )
    _wait(
        lambda: (
            browser.execute_script("return document.getElementById('chart-svg').getAttribute('aria-label')")
            == "chart of memory_gb"
        ),
        what="the memory_gb chart",
    )
    assert _count(browser, "#best-line") == 0  # best-so-far is for the primary metric
    browser.save_screenshot(str(tmp_path / "report-step2-memory.png"))

    # Nothing was fetched from anywhere, and the page logged no error.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert _severe_logs(browser) == []


def test_a_1000_step_report_renders(browser, cli, tmp_path, journal_path):
    lines = [f"w{i} = {i}" for i in range(100)]
    with WecoObserver(journal_path=journal_path) as obs:
        run = obs.create_run(
            source_code={"model.py": "\n".join(lines)}, primary_metric="accuracy", maximize=True, name="1,000 steps"
        )
        parent = 0
        for step in range(1000):
            lines[(step * 7) % 100] = f"w{(step * 7) % 100} = {step}"
            failed = step % 9 == 5
            branch = parent if step % 50 == 25 else None
            run.log_step(
                step,
                metrics={"accuracy": 0.5 + step / 4000 + (step % 13) / 200},
                status="failed" if failed else "completed",
                description=f"idea {step}",
                code={"model.py": "\n".join(lines)},
                parent_step=branch if branch and branch < step else None,
            )
            if not failed and step % 100 == 0:
                parent = step
    out = tmp_path / "big.html"
    cli.ok("observe", "report", run.run_id, "-o", str(out))
    start = time.monotonic()
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#tree-svg circle.node") == 1000, timeout=30, what="1,000 nodes")
    assert _count(browser, ".row") == 1000
    assert _count(browser, "#chart-svg circle.pt") + _count(browser, "#chart-svg path.fail") == 1000
    assert _text(browser, "#diff .file .fh").startswith("model.py")
    elapsed = time.monotonic() - start
    browser.save_screenshot(str(tmp_path / "report-1000.png"))
    assert _severe_logs(browser) == []
    print(f"1,000-step report rendered in {elapsed:.2f} s")


def test_ui_lists_runs_and_updates_live(browser, cli, tmp_path):
    run_id = _guide_run(cli, tmp_path)
    server = UI(tmp_path)
    try:
        browser.get(server.url)
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 5, what="the run in the UI")
        assert _count(browser, ".runlink") == 1 and "nanogpt speedrun" in _text(browser, ".runlink")
        assert _count(browser, "#chart-svg circle.pt") == 4
        _wait(lambda: "+warmup = 100" in _text(browser, "#diff"), what="the diff, fetched from the API")
        browser.save_screenshot(str(tmp_path / "ui.png"))

        (tmp_path / "train.py").write_text("lr = 0.05\nbatch = 32768\ndepth = 4\nwarmup = 200\n")
        cli.ok(
            "observe",
            "log",
            "--run-id",
            run_id,
            "--step",
            "5",
            "--metrics",
            '{"val_bpb": 2.05}',
            "--description",
            "longer warmup",
            "--source",
            "train.py",
        )
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 6, timeout=15, what="the live update")
        assert "2.05" in _text(browser, "#best-card")
        browser.find_element("css selector", '.row[data-step="5"]').click()
        _wait(lambda: "+warmup = 200" in _text(browser, "#diff"), what="the new step's diff")
        browser.save_screenshot(str(tmp_path / "ui-live.png"))
        assert _severe_logs(browser) == []
    finally:
        _blank(browser)  # leave the page before its server goes, or it polls a closed port
        server.stop()


def test_report_of_a_remote_only_run_without_metrics(browser, cli, tmp_path):
    server_id = "5b7e0c1a-2222-4333-8444-555566667777"
    cli.ok("observe", "log", "--run-id", server_id, "--step", "1", "--description", "first seen by its server id")
    cli.ok("observe", "log", "--run-id", server_id, "--step", "2")
    out = tmp_path / "remote.html"
    cli.ok("observe", "report", server_id, "-o", str(out))
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#tree-svg circle.node") == 2, what="the tree")
    assert _text(browser, "#chart-svg text.nodata") == "No metrics logged yet"
    assert _text(browser, "#best-card .k") == "Best ? (?)" and _text(browser, "#best-card .s") == "goal unknown"
    assert _severe_logs(browser) == []


def test_a_ui_page_outliving_its_server_leaks_no_error_into_the_next_test(browser, cli, tmp_path):
    """How this module used to flake: the UI page kept polling its stopped server, and the refused
    connections were logged as errors that the next test's log check found. The fixture's reset
    (``_blank``) is what every test now starts with."""
    server = UI(tmp_path)
    browser.get(server.url)
    _wait(lambda: "No runs" in _text(browser, "#main"), what="the UI")
    server.stop()
    _wait(lambda: _count(browser, "#live.off") == 1, what="a refused poll")
    assert any("ERR_CONNECTION_REFUSED" in e["message"] for e in _severe_logs(browser))
    time.sleep(3.2)  # two more polls (every 1.5 s) are refused and logged, unread
    _blank(browser)
    assert _severe_logs(browser) == []


def _log(cli, run_id: str, step: int, metrics: dict, *extra: str) -> None:
    cli.ok("observe", "log", "--run-id", run_id, "--step", str(step), "--metrics", json.dumps(metrics), *extra)


def _select(driver, step: int) -> None:
    driver.find_element("css selector", f'.row[data-step="{step}"]').click()
    _wait(lambda: _text(driver, "#detail-title").startswith(f"Step {step} "), what=f"step {step}'s details")


def _metric_rows(driver) -> list[list[str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#detail-body table.metrics tr'))"
        ".map(function (tr) { return Array.from(tr.cells).map(function (td) { return td.textContent; }); })"
    )


def test_a_step_is_compared_with_its_nearest_ancestor_that_has_a_value(browser, cli, tmp_path):
    """A failed parent's placeholder (0.0) is no reference: each metric is compared with the nearest
    ancestor that is not failed and reports it, and the page says which step that is."""
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run_id = cli.ok("observe", "init", "--metric", "val_bpb", "--source", "train.py").stdout.strip()
    _log(cli, run_id, 0, {"val_bpb": 2.366, "memory_gb": 10.0})
    _log(cli, run_id, 1, {"val_bpb": 2.261, "memory_gb": 12.0})
    _log(cli, run_id, 2, {"val_bpb": 0.0, "memory_gb": 0.0}, "--status", "failed")
    _log(cli, run_id, 3, {"val_bpb": 2.2, "memory_gb": 12.5}, "--parent-step", "2")  # fixes the failed step
    _log(cli, run_id, 4, {"memory_gb": 13.0})  # parent 3; no val_bpb
    _log(cli, run_id, 5, {"val_bpb": 2.15, "memory_gb": 13.5})  # parent 4
    out = tmp_path / "report.html"
    cli.ok("observe", "report", run_id, "-o", str(out))
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#tree-svg circle.node") == 6, what="the tree")

    _select(browser, 3)
    assert _metric_rows(browser) == [
        ["val_bpb ★", "2.2", "-0.061 vs step 1"],
        ["memory_gb", "12.5", "+0.5 vs step 1"],
    ]
    _select(browser, 5)
    assert _metric_rows(browser) == [
        ["val_bpb ★", "2.15", "-0.05 vs step 3"],
        ["memory_gb", "13.5", "+0.5 vs step 4"],
    ]
    _select(browser, 1)  # an ordinary step: its parent is the reference, named as such
    assert _metric_rows(browser)[0] == ["val_bpb ★", "2.261", "-0.105 vs step 0"]
    assert _severe_logs(browser) == []


_AXIS_JS = """
var svg = document.getElementById('chart-svg');
function all(sel) { return Array.from(svg.querySelectorAll(sel)); }
function marks(sel) {
  return all(sel).map(function (n) {
    var b = n.getBBox(), t = n.querySelector('title');
    return {step: +n.getAttribute('data-step'), y: b.y + b.height / 2, top: b.y, bottom: b.y + b.height,
            off: n.classList.contains('off'), title: t ? t.textContent : ''};
  });
}
return {
  ticks: all('.axis line.grid').map(function (l) { return +l.getAttribute('y1'); }),
  labels: all('.axis text[text-anchor="end"]').map(function (t) { return +t.textContent; }),
  kept: marks('circle.pt'),
  failed: marks('path.fail'),
  edges: all('line.offedge').map(function (l) { return +l.getAttribute('y1'); })
};
"""


def test_failed_steps_are_drawn_at_their_value_or_marked_off_the_scale(browser, cli, tmp_path):
    """The y-range follows the kept steps (a failed step's 0.0 placeholder must not flatten them), so a
    failed value outside it cannot be drawn at its value: it is marked off the scale, beyond a dashed edge,
    never pinned to the edge as if it were the edge's value. Positions are read back through the axis."""
    (tmp_path / "train.py").write_text("lr = 0.1\n")
    run_id = cli.ok("observe", "init", "--metric", "val_bpb", "--source", "train.py").stdout.strip()
    values = {0: 2.366, 1: 2.261, 2: 2.2, 3: 2.25, 4: 2.1, 5: 2.5, 6: 0.0}
    failed = {3, 5, 6}
    for step, value in values.items():
        _log(cli, run_id, step, {"val_bpb": value}, *(["--status", "failed"] if step in failed else []))
    out = tmp_path / "report.html"
    cli.ok("observe", "report", run_id, "-o", str(out))
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#chart-svg path.fail") == 3, what="the chart")
    chart = browser.execute_script(_AXIS_JS)
    ticks, labels = chart["ticks"], chart["labels"]
    assert len(ticks) == len(labels) >= 2

    def value_at(y: float) -> float:  # the axis is linear: read it through its first and last tick
        return labels[0] + (y - ticks[0]) * (labels[-1] - labels[0]) / (ticks[-1] - ticks[0])

    for mark in chart["kept"]:
        assert value_at(mark["y"]) == pytest.approx(values[mark["step"]], abs=0.002), mark
    top, bottom = min(ticks), max(ticks)
    for mark in chart["failed"]:
        value = values[mark["step"]]
        if not mark["off"]:
            assert value_at(mark["y"]) == pytest.approx(value, abs=0.002), mark
            continue
        assert "off the scale" in mark["title"] and f"val_bpb {value:g}" in mark["title"], mark
        if value > max(labels):  # above the scale: past its dashed edge, above the top tick (SVG y grows down)
            assert mark["bottom"] < min(chart["edges"]) < top, mark
        else:
            assert value < min(labels) and mark["top"] > max(chart["edges"]) > bottom, mark
    assert sorted(m["step"] for m in chart["failed"] if m["off"]) == [5, 6]
    browser.save_screenshot(str(tmp_path / "off-scale.png"))
    assert _severe_logs(browser) == []


def test_the_ui_shows_a_runs_metric_and_goal_as_the_cli_does(browser, cli, tmp_path):
    """A run first seen by its server id has no known metric or goal: "?" in `runs`, so "?" in the UI
    too, never a guessed "min"."""
    known = _guide_run(cli, tmp_path)
    remote = "5b7e0c1a-2222-4333-8444-555566667777"
    _log(cli, remote, 3, {"loss": 1.5})
    _log(cli, remote, 4, {"loss": 1.2})
    table = cli.ok("observe", "runs").stdout.splitlines()
    metric_column = table[0].index("METRIC")
    cli_goal = {line.split()[0]: line[metric_column:].split(")")[0] + ")" for line in table[1:]}
    runs = {r["id"]: r for r in json.loads(cli.ok("observe", "runs", "--json").stdout)}
    remote_id = next(i for i, r in runs.items() if r["server_id"] == remote)
    assert cli_goal == {known: "val_bpb (min)", remote_id: "? (?)"}

    server = UI(tmp_path)
    try:
        for run_id in (known, remote_id):
            browser.get(f"{server.url}#run={run_id}")
            _wait(lambda run_id=run_id: _count(browser, f'.runlink.active[data-run="{run_id}"]') == 1, what=run_id)
            _wait(lambda: _count(browser, "#best-card") == 1, what="the summary cards")
            assert _text(browser, "#best-card .k") == f"Best {cli_goal[run_id]}"
        assert _text(browser, "#best-card .s") == "goal unknown"
        assert _severe_logs(browser) == []
    finally:
        _blank(browser)
        server.stop()


def test_a_run_without_a_goal_has_no_best_in_the_report(browser, cli, tmp_path):
    run_id = import_run_without_goal(cli, tmp_path)
    out = tmp_path / "report.html"
    cli.ok("observe", "report", run_id, "-o", str(out))
    browser.get(out.as_uri())
    _wait(lambda: _count(browser, "#chart-svg circle.pt") == 3, what="the chart")
    assert _text(browser, "#best-card .k") == "Best loss (?)" and _text(browser, "#best-card .s") == "goal unknown"
    assert _count(browser, "#best-line") == 0 and _count(browser, "#tree-svg circle.node.best") == 0
    assert browser.execute_script("return getComputedStyle(document.getElementById('legend-best')).display") == "none"
    assert _severe_logs(browser) == []
