"""Property-based tests (hypothesis) of metrics and step parsing (`validate.parse_metrics/parse_step`)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from weco_observe import validate
from weco_observe.errors import InvalidInput

finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(10**300), max_value=10**300)
names = st.text(min_size=1, max_size=20)
metrics = st.dictionaries(names, finite, max_size=8)


@given(metrics)
def test_metrics_round_trip(value):
    assert validate.parse_metrics(json.dumps(value)) == value


@given(metrics, names, st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_metric_is_refused(value, name, bad):
    value = {**value, name: bad}
    with pytest.raises(InvalidInput, match="--metrics"):
        validate.parse_metrics(json.dumps(value))  # json.dumps writes NaN/Infinity
    with pytest.raises(InvalidInput, match="finite"):
        validate.check_metrics(value)


@given(
    metrics,
    names,
    st.one_of(
        st.booleans(), st.none(), st.text(), st.lists(finite, max_size=2), st.dictionaries(names, finite, max_size=2)
    ),
)
def test_non_number_metric_is_refused(value, name, bad):
    with pytest.raises(InvalidInput, match="--metrics"):
        validate.parse_metrics(json.dumps({**value, name: bad}))


@given(st.one_of(st.lists(finite), finite, st.text(), st.booleans(), st.none()))
def test_metrics_must_be_an_object(value):
    with pytest.raises(InvalidInput, match="object"):
        validate.parse_metrics(json.dumps(value))


@given(st.text(max_size=40))
@example("{")
@example('{"a": 1e999}')
@example('{"a": 1' + "0" * 400 + "}")
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_parse_metrics_never_crashes(text):
    """Any text is either a valid metrics object or one InvalidInput — never another exception."""
    try:
        out = validate.parse_metrics(text)
    except InvalidInput as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(out, dict)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in out.values())


@given(
    st.integers(min_value=0, max_value=validate.MAX_STEP),
    st.sampled_from(["", " ", "\t", "+"]),
    st.sampled_from(["", " ", "\n"]),
)
def test_step_round_trip(step, lead, trail):
    assert validate.parse_step(f"{lead}{step}{trail}") == step


@given(st.integers(max_value=-1))
def test_negative_step_is_refused(step):
    with pytest.raises(InvalidInput, match="0 or more"):
        validate.parse_step(str(step))


@given(st.integers(min_value=validate.MAX_STEP + 1, max_value=10**40))
def test_huge_step_is_refused(step):
    with pytest.raises(InvalidInput, match="too large"):
        validate.parse_step(str(step))


@given(st.text(max_size=12))
@example("²")
@example("++3")
@example("١")
@example("1_000")
@example("0x10")
@example("1e3")
def test_parse_step_accepts_exactly_ascii_integers(text):
    stripped = text.strip()
    digits = stripped[1:] if stripped[:1] in ("+", "-") else stripped
    valid = digits.isascii() and digits.isdigit() and not stripped.startswith("-")
    valid = valid and int(stripped) <= validate.MAX_STEP
    if valid:
        assert validate.parse_step(text) == int(stripped)
    else:
        with pytest.raises(InvalidInput, match="--step"):
            validate.parse_step(text)


@given(st.one_of(st.floats(), st.text(), st.booleans(), st.none(), st.integers(max_value=-1)))
def test_check_step_refuses_non_steps(value):
    with pytest.raises(InvalidInput):
        validate.check_step(value)


# -- the tree rule, against a model of the documented rule ---------------------

log_calls = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from(["completed", "failed"]), st.none() | st.integers(0, 12)),
    min_size=1,
    max_size=25,
)


@given(log_calls)
@settings(max_examples=60, deadline=None)
def test_tree_rule_matches_the_model(calls):
    """Any sequence of logs (re-logs, gaps, failures, explicit parents) gives the parents the rule says."""
    import tempfile
    from pathlib import Path

    from weco_observe.journal import Journal

    with tempfile.TemporaryDirectory() as tmp, Journal(Path(tmp) / "journal.db") as j:
        run = j.create_run(source_code={"a.py": "a"}, metric="loss")
        model: dict[int, tuple[str, int | None]] = {0: ("completed", None)}
        for step, status, parent_step in calls:
            if parent_step is not None and (parent_step >= step or parent_step not in model):
                with pytest.raises(InvalidInput, match="parent.step"):
                    j.log_step(run, step, status=status, parent_step=parent_step)
                continue
            if parent_step is not None:
                parent = parent_step
            elif step == 0:
                parent = None
            elif step in model:
                parent = model[step][1]  # a re-log keeps its parent
            else:
                below = [s for s, (st_, _) in model.items() if s < step and (st_ != "failed" or s == 0)]
                parent = max(below) if below else None
            result = j.log_step(run, step, status=status, parent_step=parent_step)
            assert result["parent_step"] == parent
            model[step] = (status, parent)
        stored = {s["step"]: (s["status"], s["parent_step"]) for s in j.steps(run)}
        assert stored == model
