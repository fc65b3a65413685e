"""Fuzzing the parsers that read user text (issue 13): random input either parses or raises
noisecraft's own error class (a one-line ``NoisecraftError``); prompts warn only with
``PromptWarning``. Nothing else -- no ValueError, OverflowError, TypeError -- may escape.

Parsers: A1111 ``parameters`` text (``parse_parameters``, then ``Pipeline._settings_of`` and
``Pipeline.replay`` on the shipped mnist-text model, steps and size capped small), prompt
weighting (``parse_prompt_attention`` and the tokenizer's ``encode_weighted``), and
``WIDTHxHEIGHT`` sizes (``cli.options.parse_size``). Example counts keep the file well
under 30 s on two cores.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from noisecraft.errors import NoisecraftError, NoisecraftWarning, PromptWarning

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _outcome(fn, *args, **kwargs):
    """fn's result, or None for our error class; our warnings only. Anything else fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args, **kwargs)
        except NoisecraftError as e:
            assert "\n" not in str(e), repr(str(e))  # one line
            result = None
    ours = [w for w in caught if issubclass(w.category, NoisecraftWarning)]
    others = [w for w in caught if not issubclass(w.category, NoisecraftWarning)]
    assert not others, [str(w.message) for w in others]
    return result, ours


# ------------------------------------------------------------------------------ WxH sizes


SIZE_TEXT = st.one_of(
    st.text(max_size=20),
    st.text(alphabet="0123456789²³¹٣xX× -+\n", max_size=12),
    st.from_regex(r"\A\s*[+-]?[0-9٠-٩²]{0,7}\s*[xX×*]\s*[+-]?[0-9٠-٩²]{0,7}\s*\Z"),
)


@FAST
@given(SIZE_TEXT)
@example("2²x3")  # "²".isdigit() is True, int("²") a ValueError
@example("\n")  # a message that quotes it stays one line
def test_parse_size_gives_two_positive_ints_or_our_error(text):
    from noisecraft.cli.options import parse_size

    size, _ = _outcome(parse_size, text)
    if size is not None:
        assert set(size) == {"width", "height"}
        assert all(type(v) is int and v > 0 for v in size.values())


# -------------------------------------------------------------------------- prompt weights

PROMPT_ALPHABET = "()[]:\\ ,.-+e0123456789abcxyz\n\t" + "BREAK"
PROMPTS = st.one_of(
    st.text(alphabet=PROMPT_ALPHABET, max_size=60),
    st.text(alphabet="0123456789.²٣", min_size=1, max_size=400).map(lambda w: f"(a:{w})"),
    st.one_of(st.integers(0, 40), st.sampled_from([930, 931, 7447, 7448])).map(
        lambda k: "(" * k + "a" + ")" * k
    ),
    st.text(max_size=40),
    st.builds(
        lambda w, n: f"a ({w}:{n}) cat",
        st.text(alphabet="abc ", max_size=5),
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True).map(repr),
            st.sampled_from(["nan", "inf", "-inf", "1e400", "1.2.3", "", "-", "1e-400", "+1"]),
        ),
    ),
)


@FAST
@given(PROMPTS)
@example("(a:" + "9" * 400 + ")")  # float() gives inf
@example("(" * 7448 + "a" + ")" * 7448)  # 1.1 ** 7448 overflows a float
@example("(a:²)")
def test_prompt_attention_gives_finite_weights_or_our_error(text):
    from noisecraft.models.prompt_weights import BREAK, parse_prompt_attention

    parts, warned = _outcome(parse_prompt_attention, text)
    assert all(issubclass(w.category, PromptWarning) for w in warned)
    if parts is not None:
        assert parts and all(isinstance(t, str) and isinstance(w, float) for t, w in parts)
        assert all(math.isfinite(w) for _, w in parts)  # 0 and negative weights: as A1111
        assert all(w == -1.0 * abs(w) for t, w in parts if t == BREAK and w < 0)


@pytest.fixture(scope="module")
def tokenizer():
    from noisecraft.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer.default()


@FAST
@given(text=PROMPTS)
@example(text="(" * 931 + "a" + ")" * 931)  # 1.1 ** 931 is a float64, but inf in float32
def test_weighted_encode_gives_aligned_finite_chunks_or_our_error(tokenizer, text):
    out, warned = _outcome(tokenizer.encode_weighted, text)
    assert all(issubclass(w.category, PromptWarning) for w in warned)
    if out is not None:
        ids, weights = out
        assert ids.shape == weights.shape and ids.ndim == 2 and ids.shape[1] == 77
        assert torch.isfinite(weights).all()


# ------------------------------------------------------------------ A1111 parameters text

KEYS = [
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model",
    "Denoising strength",
    "Clip skip",
    "Guidance rescale",
    "Eta",
    "Discard penultimate sigma",
    "Version",
    "Class",
    "Hires upscale",
]
VALUES = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "DPM++ 2M Karras",
            "Euler a",
            "DDIM",
            "Karras",
            "Exponential",
            "nonsense",
            "True",
            "false",
            "32x32",
            "16x24",
            "0x0",
            "9x9",
            "100000x100000",
            "-1",
            "noisecraft 0.1.0",
            '"quoted, with: colon"',
            "",
        ]
    ),
    st.text(max_size=12),
)
PARAM_LINE = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=0, max_size=8).map(
    lambda pairs: ", ".join(f"{k}: {v}" for k, v in pairs)
)
INFOTEXT = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda p, neg, line: f"{p}\nNegative prompt: {neg}\n{line}" if neg else f"{p}\n{line}",
        PROMPTS,
        st.one_of(st.just(""), PROMPTS),
        PARAM_LINE,
    ),
)


@pytest.fixture(scope="module")
def pipe():
    import noisecraft

    return noisecraft.load("mnist-text")


def _capped(pipe, params: dict) -> dict:
    """Overrides that keep a replay small: at most 2 steps, 32x32 pixels, one image (values
    that are already small, or wrong, are left for the request to judge)."""
    out = {}
    steps = params.get("steps")
    if isinstance(steps, int) and steps > 2:
        out["steps"] = 2
    w, h = params.get("width"), params.get("height")
    if isinstance(w, int) and isinstance(h, int) and w * h > 32 * 32:
        out["width"] = out["height"] = 32
    return out


def _settings_of(pipe, params: dict) -> dict:
    """The call settings of a parsed infotext (Pipeline._settings_of; on main it moved to
    api.infotext.settings_of)."""
    try:
        from noisecraft.api.infotext import settings_of
    except ImportError:
        return pipe._settings_of(params)
    return settings_of(params, pipe.kind == "latent")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(text=INFOTEXT)
def test_infotext_parses_and_replays_or_gives_our_error(pipe, text):
    from noisecraft.pipelines.png_params import parse_parameters

    params, _ = _outcome(parse_parameters, text)
    if params is None:
        return
    assert isinstance(params["prompt"], str) and isinstance(params["extra"], dict)
    settings_, _ = _outcome(_settings_of, pipe, params)
    if settings_ is None:
        return
    result, warned = _outcome(pipe.replay, text, **_capped(pipe, params))
    assert all(issubclass(w.category, PromptWarning) for w in warned)
    if result is not None:
        assert len(result.images) == 1 and torch.isfinite(result.tensors).all()


def test_emphasis_that_overflows_the_encoder_is_our_error_not_a_nan_image(pipe):
    """3e38 fits float32, the hidden states times it do not (found by the fuzz above: the
    image came out all NaN)."""
    from noisecraft.errors import ConfigError

    with pytest.raises(ConfigError, match="overflow the text encoder's torch.float32"):
        pipe("a handwritten (7:3" + "0" * 38 + ")", steps=1)
    result = pipe("a handwritten (7:1" + "0" * 30 + ")", steps=1)  # large, but finite
    assert torch.isfinite(result.tensors).all()
