"""Cross-attention maps per prompt word (issue 17, DAAM): the observer leaves the image
bit-identical and registers nothing when off, its probabilities are the ones SDPA uses, the
words map back to the context positions (emphasis, BREAK, long prompts), the CLI writes the
pictures, and on the shipped mini SD the digit's map covers the ink better than "a"'s."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import noisecraft
from helpers import narrow_sd15_model
from noisecraft.api import Observer, Pipeline
from noisecraft.cli.main import main
from noisecraft.errors import ConfigError
from noisecraft.metrics.attention_overlap import ink_mask, top_overlap
from noisecraft.models.prompt_tokens import words_of_tokenizer
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.nn.attention import CrossAttention
from noisecraft.pipelines import generate
from noisecraft.pipelines.observe import (
    AttentionRecorder,
    attention_probs,
    cross_attention_modules,
    word_maps,
)

STEPS = 6

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import attention_overlap  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return noisecraft.load("mnist-text")


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


def _hooks(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


# ---------------------------------------------------------------------------- numbers


def test_probabilities_are_the_ones_sdpa_applies():
    """softmax(q k^T / sqrt(d)) per head, times v, is the module's SDPA output (before
    to_out): the observer reads the attention the U-Net computes."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    probs = attention_probs(attn, x, ctx, mean_heads=False)  # (2, 4, 10, 7)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    v = attn.to_v(ctx).unflatten(-1, (4, -1)).transpose(1, 2)
    q = attn.to_q(x).unflatten(-1, (4, -1)).transpose(1, 2)
    k = attn.to_k(ctx).unflatten(-1, (4, -1)).transpose(1, 2)
    assert torch.allclose(probs @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert torch.allclose(attention_probs(attn, x, ctx), probs.mean(1))


def test_recorder_sums_layers_upsampled_and_word_maps_normalise():
    rec = AttentionRecorder(batch=1, size=(4, 4))
    probs = torch.zeros(1, 4, 3)  # a 2x2 map, 3 positions
    probs[0, 0, 1] = 1.0  # position 1 attended from the top-left pixel only
    rec.add(probs, (2, 2))
    rec.add(torch.full((1, 16, 3), 0.5), (4, 4))
    assert rec.sums.shape == (1, 3, 4, 4) and rec.calls == 2
    assert torch.allclose(rec.sums[0, 2], torch.full((4, 4), 0.5))  # same size: no resampling
    up = F.interpolate(probs.transpose(1, 2).reshape(1, 3, 2, 2), size=(4, 4), mode="bicubic")
    assert torch.allclose(rec.sums[0, 1], up[0, 1] + 0.5)
    maps = word_maps(rec.sums[0], [(1,), (0, 2)])
    assert maps.shape == (2, 4, 4)
    assert float(maps[0].max()) == 1.0 and float(maps[0].min()) == 0.0
    assert float(maps[0, 0, 0]) == 1.0  # the top-left pixel is the hot one
    assert torch.equal(maps[1], torch.zeros(4, 4))  # a flat map stays 0


def test_top_overlap_closed_form():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:5] = True  # top half inked
    heat = torch.arange(100.0).reshape(10, 10).flip(0)  # hottest at the top
    assert top_overlap(heat, mask, 0.2) == 1.0
    assert top_overlap(heat.flip(0), mask, 0.2) == 0.0
    assert top_overlap(heat, mask, 1.0) == 0.5
    assert torch.equal(ink_mask(torch.tensor([[[-1.0, 0.5]]])), torch.tensor([[False, True]]))


# ---------------------------------------------------------------------------- words


def _words(tok, prompt, weighted=True):
    if weighted:
        ids, weights = tok.encode_weighted(prompt)
    else:
        ids, weights = tok.encode_chunks(prompt), None
    return words_of_tokenizer(ids, weights, tok)


def test_words_join_bpe_pieces_and_skip_start_end_padding(tok):
    words = _words(tok, "a photo of noisecraft", weighted=False)
    assert [w.text for w in words] == ["a", "photo", "of", "noisecraft"]
    assert [w.positions for w in words[:3]] == [(1,), (2,), (3,)]
    n = len(tok.encode("noisecraft"))
    assert n > 1 and words[3].positions == tuple(range(4, 4 + n))


def test_words_carry_weights_and_break_moves_to_the_next_chunk(tok):
    words = _words(tok, "a (red:1.2) cube BREAK on [a] table")
    assert [w.text for w in words] == ["a", "red", "cube", "on", "a", "table"]
    assert [w.weight for w in words] == pytest.approx([1, 1.2, 1, 1, 1 / 1.1, 1], rel=1e-6)
    assert [w.positions for w in words] == [(1,), (2,), (3,), (78,), (79,), (80,)]


def test_long_prompt_words_cover_every_chunk(tok):
    prompt = " ".join(["xylophonist"] * 30)  # 4 pieces each: 120 tokens
    ids = tok.encode_chunks(prompt)
    assert ids.shape[0] >= 2
    words = _words(tok, prompt)
    assert [w.text for w in words] == prompt.split()
    flat = [p for w in words for p in w.positions]
    assert flat == sorted(flat) and len(flat) == len(tok.encode(prompt))
    for p in flat:  # every position is a prompt token, never start / end / padding
        assert p % 77 not in (0, 76) and int(ids.flatten()[p]) != tok.eos_token_id
    assert any(p >= 77 for p in words[-1].positions)
    # no comma to back-track to: the 75th token ends chunk 0 inside a word, which goes on
    assert any(min(w.positions) < 77 < max(w.positions) for w in words)


# ---------------------------------------------------------------------------- the pipeline


def test_observer_on_is_bit_identical_and_leaves_no_hook(pipe):
    unet = pipe.model.unet
    assert _hooks(unet) == 0
    off = pipe("a handwritten 7", seed=3, n=2, steps=STEPS)
    req = pipe.request("a handwritten 7", seed=3, n=2, steps=STEPS)
    core = generate(pipe.model, req)  # the core called directly, as before this feature
    on = pipe("a handwritten 7", seed=3, n=2, steps=STEPS, observe=Observer(attention=True))
    assert torch.equal(off.tensors, core) and torch.equal(on.tensors, off.tensors)
    assert _hooks(unet) == 0  # removed after the call
    assert off.observed is None
    maps = on.observed.attention
    assert len(maps) == 2 and maps[0].tokens == ["a", "handwritten", "7"]
    assert maps[0].maps.shape == (3, 8, 8) and maps[0].maps.dtype == np.float32
    assert maps[0].maps.min() == 0.0 and maps[0].maps.max() == 1.0
    assert not np.array_equal(maps[0].maps, maps[1].maps)  # each image its own maps
    assert maps[0].overlays[0].size == (32, 32) and maps[0].grid.width > 4 * 32


def test_observer_off_registers_no_hook(pipe, monkeypatch):
    """With no observer the U-Net's modules get no hook: its forward runs as on main."""
    calls = []
    unet_modules = set(map(id, pipe.model.unet.modules()))
    originals = {
        n: getattr(torch.nn.Module, n)
        for n in ("register_forward_pre_hook", "register_forward_hook")
    }

    def spy(name):
        def register(self, *a, **kw):
            if id(self) in unet_modules:
                calls.append(type(self).__name__)
            return originals[name](self, *a, **kw)

        return register

    for name in originals:
        monkeypatch.setattr(torch.nn.Module, name, spy(name))
    pipe("a handwritten 1", seed=0, steps=2)
    assert calls == []
    pipe("a handwritten 1", seed=0, steps=2, observe=Observer(attention=True))
    n = len(cross_attention_modules(pipe.model.unet))
    assert calls.count("CrossAttention") == n and n == 7


def test_step_range_and_cfg_one(pipe):
    full = pipe("a handwritten 3", seed=0, steps=4, observe=Observer(attention=True))
    part = pipe("a handwritten 3", seed=0, steps=4, observe=Observer(attention=True, steps=(1, 3)))
    assert not np.array_equal(full.observed.attention[0].maps, part.observed.attention[0].maps)
    past = pipe("a handwritten 3", seed=0, steps=4, observe=Observer(attention=True, steps=(9, 10)))
    assert past.observed.attention == [None]
    one = pipe("a handwritten 3", seed=0, steps=2, cfg=1.0, observe=Observer(attention=True))
    assert one.observed.attention[0].tokens == ["a", "handwritten", "3"]


def test_weighted_break_and_long_prompt_in_the_pipeline(pipe):
    prompt = "a (handwritten:1.3) 7 BREAK " + ", ".join(["a digit"] * 30)
    r = pipe(prompt, seed=0, steps=2, observe=Observer(attention=True))
    m = r.observed.attention[0]
    assert m.tokens[:3] == ["a", "handwritten", "7"] and m.weights[1] == pytest.approx(1.3)
    assert len(m.tokens) == 3 + 30 * 2 + 29 and m.maps.shape[0] == len(m.tokens)
    assert np.isfinite(m.maps).all()


@pytest.mark.parametrize(
    ("observe", "message"),
    [
        ("yes", "observe must be an Observer"),
        (None, None),
    ],
)
def test_bad_observe_is_refused(pipe, observe, message):
    if message is None:
        with pytest.raises(ConfigError, match="step range of observe"):
            Observer(attention=True, steps=(3, 1))
        return
    with pytest.raises(ConfigError, match=message):
        pipe("a 7", steps=1, observe=observe)


def test_mini_sd_digit_map_covers_the_ink_better_than_a(pipe):
    """Over the ten digits, seeds 0 and 1, 10 steps (bench/attention_overlap.py's code; the
    full table is in docs/seeing-inside.md): the digit's map puts more of its top 20 % on
    the ink than the map of "a", and more than a map blind to the image would (the ink's
    area). Per digit it does not always: for "7" the mini SD's text encoder gives "a",
    "handwritten" and "7" the same context vector, so their maps are the same."""
    rows: dict[str, list[float]] = {}
    wins = 0
    for digit in range(10):
        r = attention_overlap.measure(pipe, digit, seeds=2, steps=10)
        wins += sum(d > a for d, a in zip(r["digit"], r["a"], strict=True))
        for k, v in r.items():
            rows.setdefault(k, []).extend(v)
    mean = {k: sum(v) / len(v) for k, v in rows.items()}
    assert mean["digit"] > mean["ink"] > mean["a"], mean
    assert wins >= 12, wins  # measured: 14 of 20


# ---------------------------------------------------------------------------- CLI


def test_cli_writes_one_overlay_per_word_and_a_grid(tmp_path, capsys):
    out = tmp_path / "maps"
    args = ["generate", "a red cube, (table:1.2)", "--steps", "2", "--out", str(tmp_path / "x")]
    rc = main([*args, "--attention-maps", str(out), "--attention-steps", "0:2"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "00_a.png",
        "01_red.png",
        "02_cube.png",
        "03__.png",
        "04_table.png",
        "grid.png",
    ]
    assert Image.open(out / "01_red.png").size == (32, 32)
    assert Image.open(out / "grid.png").width > 6 * 32
    rc = main([*args, "--overwrite", "--attention-steps", "0:2"])
    assert rc == 2 and "--attention-steps needs --attention-maps" in capsys.readouterr().err
    rc = main([*args, "--overwrite", "--attention-maps", str(out), "--attention-steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--attention-steps must be START:END" in err and "\n" not in err.strip()
    rc = main([*args, "--overwrite", "--attention-maps", str(out), "--attention-steps", "3:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--attention-steps" in err


# ---------------------------------------------------------------------------- SD 1.5 layout


def test_sd15_layout_with_random_weights_shapes():
    """SD 1.5's U-Net layout (16 cross-attention modules over 3 levels, 8 heads), narrow and
    random, at 64x64: maps at the latent size, one per word; image unchanged by observing."""
    model = narrow_sd15_model()
    unet = model.unet
    assert len(cross_attention_modules(unet)) == 16
    p = Pipeline(model)
    off = p("a red cube", steps=2)
    on = p("a red cube", steps=2, observe=Observer(attention=True))
    assert torch.equal(on.tensors, off.tensors)
    m = on.observed.attention[0]
    assert m.tokens == ["a", "red", "cube"] and m.maps.shape == (3, 8, 8)
    assert m.overlays[0].size == (64, 64)
