"""Fuzzing the readers of a training recipe: ``--set`` values and TOML files.

Whatever the text, the only allowed outcomes are a config or a :class:`NoisecraftError`
(the CLI's one ``error:`` line) -- never another exception, which would be a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noisecraft.errors import NoisecraftError
from noisecraft.training.config import (
    TASK_SECTIONS,
    ExperimentConfig,
    load_config,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)

_DEFAULTS = {
    task: ExperimentConfig.from_dict({"task": {"name": task}}).to_dict() for task in TASK_SECTIONS
}
SECTIONS = sorted({s for d in _DEFAULTS.values() for s in d} | {"nosuch"})
KEYS = sorted({k for d in _DEFAULTS.values() for sec in d.values() for k in sec} | {"nokey"})
PAIRS = sorted({(s, k) for d in _DEFAULTS.values() for s, sec in d.items() for k in sec})

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["mnist", "digits", "cosine", "eps", "pixel", "vae", "cpu", "euler"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


def _toml_value(v) -> str:
    """A TOML literal for a Python value (the strategies' own tiny writer)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("-inf" if v < 0 else "inf") if math.isinf(v) else "nan" if v != v else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def _check(fn, *args):
    with contextlib.suppress(NoisecraftError):  # our error is an allowed outcome
        fn(*args)


@FUZZ
@given(st.text(max_size=80))
def test_any_set_text_is_a_config_or_our_error(item):
    _check(load_config, None, [item])


@pytest.mark.parametrize("section, key", PAIRS)
@settings(FUZZ, max_examples=12)
@given(st.one_of(values.map(_toml_value), st.text(max_size=30)))
def test_any_set_value_of_every_key_is_a_config_or_our_error(section, key, raw):
    task = next(t for t, d in _DEFAULTS.items() if section in d)
    _check(load_config, None, [f"task.name='{task}'", f"{section}.{key}={raw}"])


@FUZZ
@given(
    st.sampled_from(sorted(TASK_SECTIONS)),
    st.dictionaries(
        st.sampled_from(SECTIONS),
        st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
        max_size=4,
    ),
)
def test_any_toml_document_is_a_config_or_our_error(task, doc):
    lines = [f'[task]\nname = "{task}"'] if "task" not in doc else []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_text("\n".join(lines) + "\n")
        _check(load_config, path)


@FUZZ
@given(st.binary(max_size=300))
def test_any_file_bytes_are_a_config_or_our_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_bytes(data)
        _check(load_config, path)


@FUZZ
@given(st.data())
def test_mutated_shipped_recipe_is_a_config_or_our_error(data):
    text = Path("configs/mnist.toml").read_text().splitlines()
    assignments = [i for i, line in enumerate(text) if " = " in line and not line.startswith("#")]
    i = data.draw(st.sampled_from(assignments))
    key = text[i].split(" = ", 1)[0]
    text[i] = f"{key} = {_toml_value(data.draw(values))}"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_text("\n".join(text) + "\n")
        _check(load_config, path)
