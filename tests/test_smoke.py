"""A first end-to-end pass through the real CLI: init, log, status."""

import json


def test_init_log_status(cli, tmp_path):
    (tmp_path / "train.py").write_text("x = 1\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    assert run_id.startswith("local-")
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 0.5}')
    status = json.loads(cli.ok("observe", "status", "--json").stdout)
    assert status["runs"] == 1
    assert status["steps"] == 2
    assert status["events"]["pending"] == 2
