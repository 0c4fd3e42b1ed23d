"""The relay's team dashboard in real headless Chromium: login, attribution, filters, live, revocation.

A real relay subprocess, real box journals that ``weco observe sync`` to it, keys made
and revoked by the CLI in other processes, and the page driven as a user drives it
(the login form, the filter menus, a click on a run). Chromium, the strictness about
console errors and the helpers are ``test_report_browser.py``'s. Screenshots land in
each test's tmp dir.
"""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from test_relay_dashboard import Box, RelayProcess, keys_add
from test_report_browser import _blank, _count, _severe_logs, _text, _wait, browser, chromium  # noqa: F401
from test_ui import UI

pytestmark = pytest.mark.browser

_RUNS_JS = """
return Array.from(document.querySelectorAll('#runs .runlink')).map(function (a) {
  return {run: a.getAttribute('data-run'), name: a.querySelector('.rn').textContent,
          who: (a.querySelector('.who') || {}).textContent || null,
          meta: Array.from(a.querySelectorAll('.rm:not(.who)')).map(function (d) { return d.textContent; })};
});
"""

_LABELS_JS = """
return Array.from(document.querySelectorAll('#filters select')).map(function (s) {
  return [s.id, s.labels.length === 1 ? s.labels[0].querySelector('span').textContent : null];
});
"""


def _runs(driver) -> list[dict]:
    return driver.execute_script(_RUNS_JS)


def _names(driver) -> list[str]:
    return [r["name"] for r in _runs(driver)]


def _choose(driver, which: str, text: str) -> None:
    """Pick a filter as a user does: open the menu and click the option whose label starts with ``text``."""
    from selenium.webdriver.support.ui import Select

    menu = Select(driver.find_element("id", f"filter-{which}"))
    matches = [o.text for o in menu.options if o.text.startswith(text + " (")]
    assert len(matches) == 1, (which, text, [o.text for o in menu.options])
    menu.select_by_visible_text(matches[0])


def _log_in(driver, key: str) -> None:
    field = driver.find_element("id", "key")
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "form button[type=submit]").click()


def _one_401(entries: list[dict], path: str) -> None:
    """The console error a refused request leaves, once: Chromium logs every 401 it is answered,
    so a page that kept asking without a session would leave more than one."""
    assert len(entries) == 1, entries
    assert entries[0]["message"].endswith(
        f"{path} - Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ), entries


def test_the_dashboard_shows_each_boxs_runs_filters_them_and_follows_them_live(browser, cli, tmp_path):
    data = tmp_path / "relay"
    keys = {name: keys_add(cli, data, name) for name in ("box-a", "box-b")}
    viewer = keys_add(cli, data, "viewer", read_only=True)
    relay = RelayProcess(data, tmp_path)
    started = time.monotonic()
    try:
        a, b = Box(cli, tmp_path, "box-a"), Box(cli, tmp_path, "box-b")
        # Three runs whose box, metric and goal partition them differently, so each filter is
        # seen to pick by its own field: box-a has two, val_bpb two, maximize two, none the same.
        speedrun = a.init("nanogpt speedrun", "val_bpb", code="lr = 0.1\nbatch = 16\n")
        a.log(speedrun, 0, {"val_bpb": 2.366}, "--description", "baseline")
        a.log(speedrun, 1, {"val_bpb": 2.261}, "--description", "bigger batch", code="lr = 0.1\nbatch = 32\n")
        a.log(speedrun, 2, {"val_bpb": 2.2}, "--description", "halve lr", code="lr = 0.05\nbatch = 32\n")
        a.sync(relay, keys["box-a"])
        compress = b.init("bpb probe", "val_bpb", "--goal", "maximize")
        b.log(compress, 0, {"val_bpb": 0.9})
        b.sync(relay, keys["box-b"])
        resnet = a.init("resnet tuning", "accuracy", "--goal", "max")
        a.log(resnet, 0, {"accuracy": 0.71})
        a.log(resnet, 1, {"accuracy": 0.74}, code="lr = 0.2\n")
        a.sync(relay, keys["box-a"])

        # No session: the login page. A wrong key brings it back with the error.
        browser.get(relay.url)
        _wait(lambda: _count(browser, "form input#key") == 1, what="the login page")
        assert browser.execute_script("return document.getElementById('key').labels[0].textContent") == "Key"
        _log_in(browser, "wor_not-a-key-of-this-relay")
        _wait(lambda: "That key is not valid here." in _text(browser, ".error"), what="the wrong key's error")
        _one_401(_severe_logs(browser), "/login")
        browser.save_screenshot(str(tmp_path / "1-wrong-key.png"))

        _log_in(browser, viewer)
        _wait(lambda: _count(browser, "#tree-svg circle.node") > 0, what="the dashboard")
        browser.execute_script("window.__sameDocument = true")  # gone if anything reloads the page
        _wait(lambda: _text(browser, "#viewer") == "Key: viewer", what="whose key the page is open with")

        # Every run of the site, newest activity first, each with the box that made it.
        runs = _runs(browser)
        assert [(r["name"], r["who"]) for r in runs] == [
            ("resnet tuning", "by box-a"),
            ("bpb probe", "by box-b"),
            ("nanogpt speedrun", "by box-a"),
        ]
        assert runs[0]["meta"][0] == "accuracy (max) · 2 steps · best 0.74 @1"
        assert runs[2]["meta"][0] == "val_bpb (min) · 3 steps · best 2.2 @2"
        assert browser.execute_script(_LABELS_JS) == [
            ["filter-key", "Box or user"],
            ["filter-metric", "Metric"],
            ["filter-goal", "Goal"],
        ]
        # The newest run is open, and says who made it and the id its box knows it by.
        assert _text(browser, "header.run h1") == "resnet tuning"
        relay_ids = {r["name"]: r["relay_id"] for r in browser.execute_async_script(_API_RUNS_JS)}
        assert _text(browser, "header.run .ids").startswith(f"by box-a  ·  relay id {relay_ids['resnet tuning']}")
        browser.save_screenshot(str(tmp_path / "2-dashboard.png"))

        _choose(browser, "key", "box-a")
        _wait(lambda: _names(browser) == ["resnet tuning", "nanogpt speedrun"], what="box-a's runs")
        assert _text(browser, "#run-count") == "2 of 3 runs"
        # The menu just used keeps the focus: a keyboard user goes on from where they were.
        assert browser.execute_script("return document.activeElement.id") == "filter-key"
        _choose(browser, "key", "All boxes and users")
        _choose(browser, "metric", "val_bpb")
        _wait(lambda: _names(browser) == ["bpb probe", "nanogpt speedrun"], what="the val_bpb runs")
        _choose(browser, "metric", "All metrics")
        _choose(browser, "goal", "maximize")
        _wait(lambda: _names(browser) == ["resnet tuning", "bpb probe"], what="the maximize runs")
        _choose(browser, "key", "box-b")
        _wait(lambda: _names(browser) == ["bpb probe"], what="box-b's maximize runs")
        _choose(browser, "metric", "accuracy")
        _wait(lambda: _count(browser, "#no-match") == 1, what="no run matching all three")
        assert _names(browser) == []
        browser.save_screenshot(str(tmp_path / "3-no-match.png"))
        _choose(browser, "metric", "All metrics")
        _choose(browser, "goal", "Any goal")
        _choose(browser, "key", "box-a")

        # Open a run: its tree, chart and diff, as the local ui draws them.
        browser.find_element("css selector", f'.runlink[data-run="{_id(browser, "nanogpt speedrun")}"]').click()
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 3, what="the speedrun's tree")
        assert _text(browser, "header.run h1") == "nanogpt speedrun"
        assert _count(browser, "#chart-svg circle.pt") == 3
        _wait(lambda: "+lr = 0.05" in _text(browser, "#diff"), what="step 2's diff")
        browser.save_screenshot(str(tmp_path / "4-run.png"))

        # A box logs a step and syncs: the list and the open run follow without a reload.
        a.log(speedrun, 3, {"val_bpb": 2.1}, "--description", "warmup", code="lr = 0.05\nbatch = 32\nwarmup = 1\n")
        a.sync(relay, keys["box-a"])
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 4, timeout=15, what="the live step")
        _wait(lambda: _names(browser) == ["nanogpt speedrun", "resnet tuning"], what="the list re-sorted")
        assert _runs(browser)[0]["meta"][0] == "val_bpb (min) · 4 steps · best 2.1 @3"
        assert "2.1" in _text(browser, "#best-card") and _text(browser, "#filter-key option:checked").startswith(
            "box-a"
        )
        assert browser.execute_script("return window.__sameDocument === true")
        assert _severe_logs(browser) == []
        browser.save_screenshot(str(tmp_path / "5-live.png"))

        # The viewer's key is revoked elsewhere: the next poll loses the session, and the site's runs go.
        cli.ok("observe", "serve", "keys", "revoke", "viewer", "--data", str(data))
        _wait(lambda: _count(browser, "#ended") == 1, timeout=10, what="the page to say it needs a key")
        assert _count(browser, ".runlink") == 0 and _count(browser, "#tree-svg") == 0
        assert _text(browser, "#live") == "signed out" and _text(browser, "#filters") == ""
        assert not browser.find_element("id", "logout").is_displayed()
        assert browser.execute_script("return window.__sameDocument === true")
        _one_401(_severe_logs(browser), "/api/state")
        time.sleep(2)  # it stops polling: a page without a session asks nothing more
        assert _severe_logs(browser) == []
        browser.save_screenshot(str(tmp_path / "6-signed-out.png"))
        browser.find_element("id", "login-again").click()
        _wait(lambda: "Your session has ended" in _text(browser, ".error"), what="the login page")
        assert _severe_logs(browser) == []
        print(f"dashboard test: {time.monotonic() - started:.1f} s")
    finally:
        _blank(browser)  # leave the page before its relay goes, or it polls a closed port
        relay.stop()


_API_RUNS_JS = """
var done = arguments[arguments.length - 1];
fetch('api/runs').then(function (r) { return r.json(); }).then(done);
"""


def _id(driver, name: str) -> str:
    return next(r["run"] for r in _runs(driver) if r["name"] == name)


def test_the_logout_button_ends_the_session(browser, cli, tmp_path):
    data = tmp_path / "relay"
    viewer = keys_add(cli, data, "viewer", read_only=True)
    relay = RelayProcess(data, tmp_path)
    try:
        browser.get(relay.url)
        _log_in(browser, viewer)
        _wait(lambda: "No runs on this relay yet" in _text(browser, "#main"), what="the empty dashboard")
        assert _count(browser, "#filters select") == 0  # nothing to filter yet
        browser.find_element("id", "logout").click()
        _wait(lambda: _count(browser, "form input#key") == 1, what="the login page")
        assert _count(browser, ".error") == 0  # logged out on purpose: no "session has ended"
        browser.get(relay.url + "api/state")
        assert '"open the dashboard with a key first"' in _text(browser, "body")
        _one_401(_severe_logs(browser), "/api/state")
    finally:
        _blank(browser)
        relay.stop()


_XSS = "<img src=x onerror='window.__xss=1'>"


def test_names_keys_and_metrics_are_text_in_the_dashboard_and_the_local_ui(browser, cli, tmp_path, journal_path):
    """Run names, metric names and descriptions come from any box with a key, and key names from
    whoever ran ``keys add``; none may become markup. The CLI refuses such a key name, so one is
    written straight into the relay's table, as an older or a careless tool might have."""
    data = tmp_path / "relay"
    key = keys_add(cli, data, "box-a")
    viewer = keys_add(cli, data, "viewer", read_only=True)
    (tmp_path / "train.py").write_text("x = 1\n")
    run = cli.ok("observe", "init", "--name", f"run {_XSS}", "--metric", f"m{_XSS}", "--source", "train.py")
    run_id = run.stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", json.dumps({f"m{_XSS}": 1}))
    relay = RelayProcess(data, tmp_path)
    server = None
    try:
        cli.ok("observe", "sync", env={"WECO_BASE_URL": relay.api, "WECO_API_KEY": key})
        with sqlite3.connect(data / "journal.db") as conn:
            conn.execute("UPDATE relay_runs SET key_name = ?", (f"box {_XSS}",))
        conn.close()
        browser.get(relay.url)
        _log_in(browser, viewer)
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 2, what="the run")
        assert _runs(browser)[0]["name"] == f"run {_XSS}" and _runs(browser)[0]["who"] == f"by box {_XSS}"
        _choose(browser, "key", f"box {_XSS}")
        _choose(browser, "metric", f"m{_XSS}")
        _wait(lambda: _text(browser, "#filter-metric option:checked") == f"m{_XSS} (1)", what="the metric filter")
        assert _names(browser) == [f"run {_XSS}"]
        assert _text(browser, "header.run .ids").startswith(f"by box {_XSS}")
        assert _count(browser, "img") == 0 and browser.execute_script("return window.__xss") is None
        assert _severe_logs(browser) == []

        # The local ui over the box's own journal: the same text, and no key line or filters at all.
        _blank(browser)
        server = UI(tmp_path)
        browser.get(server.url)
        _wait(lambda: _count(browser, "#tree-svg circle.node") == 2, what="the run in the local ui")
        assert _runs(browser) == [
            {"run": run_id, "name": f"run {_XSS}", "who": None, "meta": _runs(browser)[0]["meta"]}
        ]
        assert _runs(browser)[0]["meta"][0] == f"m{_XSS} · 2 steps · best 1 @1"  # no goal added: as before
        assert _count(browser, "#filters *") == 0 and _count(browser, "#viewer, #logout") == 0
        assert _text(browser, "header.run .ids").startswith(f"local {run_id}")
        assert _count(browser, "img") == 0 and browser.execute_script("return window.__xss") is None
        assert _severe_logs(browser) == []
        browser.save_screenshot(str(tmp_path / "local-ui.png"))
    finally:
        _blank(browser)
        if server is not None:
            server.stop()
        relay.stop()
