"""Textual inversion: embedding files of every format, A1111's prompt rules, TI hashes,
replay, the CLI, and the same image as diffusers' ``load_textual_inversion``."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from noisecraft.adapters.embedding_set import EmbeddingSet
from noisecraft.adapters.embeddings import read_embedding
from noisecraft.api.pipeline import Pipeline
from noisecraft.cli.main import main
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.native import save_model
from noisecraft.pipelines import generate
from test_latent_pipeline import WIDTH, H, W, _diffusers_components, _req, tiny_model


def _vectors(n: int, d: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _a1111_pt(path, v):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(v.clone())},
            "name": "whatever",
            "step": 42,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "model",
        },
        path,
    )
    return path


def _short(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---------------------------------------------------------------------------- file formats


def test_every_format_reads_the_same_vectors(tmp_path):
    v = _vectors(3)
    files = {
        "a1111.pt": _a1111_pt(tmp_path / "a1111.pt", v),
        "kohya.safetensors": tmp_path / "kohya.safetensors",
        "learned_embeds.bin": tmp_path / "learned_embeds.bin",
        "learned_embeds.safetensors": tmp_path / "learned_embeds.safetensors",
    }
    save_file({"emb_params": v}, files["kohya.safetensors"])
    torch.save({"<cat-toy>": v}, files["learned_embeds.bin"])
    save_file({"<cat-toy>": v}, files["learned_embeds.safetensors"])
    for name, path in files.items():
        e = read_embedding(path)
        torch.testing.assert_close(e.vectors, v, rtol=0, atol=0)
        assert e.vectors.dtype == torch.float32
        # A1111 names an embedding by its file; a diffusers file names its own token
        assert e.name == ("<cat-toy>" if "learned" in name else path.stem)
    assert read_embedding(files["a1111.pt"]).step == 42
    assert read_embedding(files["learned_embeds.bin"], "mine").name == "mine"


def test_single_vector_diffusers_file_is_one_row(tmp_path):
    torch.save({"<tok>": torch.ones(WIDTH, dtype=torch.float16)}, tmp_path / "e.bin")
    e = read_embedding(tmp_path / "e.bin")
    assert e.vectors.shape == (1, WIDTH) and e.vectors.dtype == torch.float32


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_TI",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Payload()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load .*system") as err:
        read_embedding(path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED_TI").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": torch.zeros(2), "b": torch.zeros(2)}, "not a textual-inversion embedding"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
        ({"emb_params": torch.zeros(80, 8)}, "80 vectors"),
        ({"emb_params": torch.full((1, 8), float("nan"))}, "nan"),
        ({"emb_params": torch.zeros(2, 3, 4)}, "shape"),
    ],
)
def test_files_that_are_not_embeddings_are_refused(tmp_path, content, message):
    save_file(content, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_embedding(tmp_path / "x.safetensors")


def test_another_width_is_refused_naming_both(model, tmp_path):
    save_file({"emb_params": torch.zeros(2, 1024)}, tmp_path / "sd2.safetensors")
    pipe = Pipeline(model.replace(textual_inversion=None))
    with pytest.raises(CheckpointError) as err:
        pipe.load_embedding(tmp_path / "sd2.safetensors")
    text = str(err.value)
    assert "1024" in text and f"{WIDTH} wide" in text and "SD 2.x" in text and "\n" not in text


# ---------------------------------------------------------------------------- prompts


def _with(model, **embeddings) -> object:
    ti = EmbeddingSet.for_model(model)
    for name, v in embeddings.items():
        from noisecraft.adapters.embeddings import Embedding

        ti.add(Embedding(name, v))
    return model.replace(textual_inversion=ti)


def test_a_name_becomes_its_vectors_with_the_fragment_weight(model):
    m = _with(model, cat=_vectors(3))
    ids, weights = m.tokenize_prompt("the (cat:1.2) dog")
    v = m.text_encoder.config.vocab_size
    plain = model.tokenizer.encode("the")
    row = ids[0].tolist()
    assert row[1 : 1 + len(plain)] == plain
    k = 1 + len(plain)
    assert row[k : k + 3] == [v, v + 1, v + 2]
    assert weights[0, k : k + 3].tolist() == pytest.approx([1.2] * 3)
    assert weights[0, k + 3] == 1.0  # "dog"


def test_unknown_names_are_plain_words(model):
    m = _with(model, cat=_vectors(1))
    for prompt in ("the dog", "a (dog:1.3) BREAK the"):
        got, want = m.tokenize_prompt(prompt), model.tokenize_prompt(prompt)
        assert torch.equal(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)


def test_an_embedding_never_straddles_a_chunk(model):
    m = _with(model, cat=_vectors(4))
    tok = model.tokenizer
    filler = " ".join(["dog"] * 73)  # 73 tokens: the 4 vectors do not fit in the 2 left
    assert len(tok.encode(filler)) == 73
    ids, _ = m.tokenize_prompt(filler + " cat")
    v = m.text_encoder.config.vocab_size
    assert ids.shape[0] == 2
    assert (ids[0] >= v).sum() == 0
    assert ids[1, 1:5].tolist() == [v, v + 1, v + 2, v + 3]
    assert ids[0, 74].item() == tok.eos_token_id  # chunk 1 closed after 73 tokens


def test_longest_name_wins_and_renames_follow_the_file(model, tmp_path):
    save_file({"emb_params": _vectors(1, seed=1)}, tmp_path / "cat.safetensors")
    save_file({"emb_params": _vectors(2, seed=2)}, tmp_path / "catdog.safetensors")
    ti = EmbeddingSet.for_model(model, tmp_path)
    m = model.replace(textual_inversion=ti)
    ids, _ = m.tokenize_prompt("catdog")
    assert [e.name for e in ti.used(ids)] == ["catdog"]
    assert (ids[0] >= m.text_encoder.config.vocab_size).sum() == 2


def test_removing_the_set_restores_the_model_exactly(model):
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    base = generate(model, _req())
    m = _with(model, cat=_vectors(2))
    assert not torch.equal(generate(m, _req()), base)  # "a cat" now uses the vectors
    assert torch.equal(generate(m.replace(textual_inversion=None), _req()), base)
    after = model.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pooled_output_ignores_the_added_ids(model):
    te = model.text_encoder
    ids = torch.tensor([model.tokenizer.wrap(model.tokenizer.encode("the cat"))])
    ids[0, 2] = te.config.vocab_size  # an embedding id, larger than the end token
    out = te(ids, extra_tokens=torch.zeros(1, WIDTH))
    # the pooled token is still the (first) end token, not the largest id
    eos = int((ids[0] == model.tokenizer.eos_token_id).nonzero()[0])
    torch.testing.assert_close(out.pooled, out.last_hidden_state[:, eos], rtol=0, atol=0)


# ---------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("vectors, where", [(1, "prompt"), (3, "prompt"), (2, "negative")])
def test_same_image_as_diffusers_load_textual_inversion(vectors, where, tmp_path):
    """diffusers adds the token(s) to its tokenizer and text encoder; A1111's rule replaces
    the name's tokens. On the same weights and seed both give the same image."""
    import diffusers

    model = tiny_model()
    v = _vectors(vectors, seed=vectors) * 0.5
    path = _a1111_pt(tmp_path / "thick.pt", v)
    pipe = diffusers.StableDiffusionPipeline(**_diffusers_components(model, tmp_path))
    pipe.load_textual_inversion(str(path), token="thick")
    prompt, negative = ("the thick cat", "a dog") if where == "prompt" else ("the cat", "thick")
    steps, cfg, seed = 4, 5.0, 3
    with torch.no_grad():
        want = pipe(
            prompt=prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
            height=H,
            width=W,
        ).images
    ours = Pipeline(model)
    ours.load_embedding(path)
    req = _req(prompts=[prompt], negative_prompt=negative, steps=steps, cfg=cfg, seeds=[seed])
    got = (generate(ours.model, req) / 2 + 0.5).clamp(0, 1)
    without = (generate(model.replace(textual_inversion=None), req) / 2 + 0.5).clamp(0, 1)
    assert (got - without).abs().max() > 0.05  # the embedding changes the image
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)  # observed 1e-6


# ---------------------------------------------------------------------------- infotext, replay


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "emb"
    (d / "sub").mkdir(parents=True)
    save_file({"emb_params": _vectors(2, seed=5)}, d / "cat.safetensors")
    _a1111_pt(d / "sub" / "dog.pt", _vectors(1, seed=6))
    torch.save({"<x>": _vectors(1, seed=7)[0]}, d / "the.bin")  # not used below
    save_file({"emb_params": torch.zeros(1, 1024)}, d / "big.safetensors")  # other model
    return d


def test_ti_hashes_name_the_used_embeddings_positive_first(model, folder):
    pipe = Pipeline(model.replace(textual_inversion=None))
    from noisecraft.api.embeddings import embedding_set

    embedding_set(pipe.model, folder)
    r = pipe("a cat", negative_prompt="dog", steps=2, sampler="euler", width=W, height=H)
    text = r.infotexts[0]
    want = f'TI hashes: "cat: {_short(folder / "cat.safetensors")}, '
    want += f'dog: {_short(folder / "sub" / "dog.pt")}"'
    assert want in text
    r2 = pipe("a", steps=2, sampler="euler", width=W, height=H)
    assert "TI hashes" not in r2.infotexts[0]
    # the 1024-wide file in the folder is refused only when a prompt names it
    with pytest.raises(CheckpointError, match="1024-wide"):
        pipe("big", steps=2, sampler="euler", width=W, height=H)


def test_replay_finds_the_embeddings_by_name(model, folder):
    from noisecraft.api.embeddings import embedding_set

    pipe = Pipeline(model.replace(textual_inversion=None))
    embedding_set(pipe.model, folder)
    kw = dict(steps=2, sampler="euler", width=W, height=H, seed=4)
    r = pipe("a cat", negative_prompt="dog", **kw)
    again = pipe.replay(r.infotexts[0])
    assert torch.equal(again.tensors, r.tensors)
    bare = Pipeline(model.replace(textual_inversion=None))
    with pytest.raises(ConfigError, match="cat, dog; give the embedding_dir"):
        bare.replay(r.infotexts[0])


def test_folder_is_rescanned_and_name_clashes_are_refused(model, folder):
    ti = EmbeddingSet.for_model(model, folder)
    assert "new" not in ti.names
    import os
    import time

    time.sleep(0.01)
    save_file({"emb_params": _vectors(1)}, folder / "new.safetensors")
    os.utime(folder, None)
    ti(model.tokenizer.encode("new"))
    assert "new" in ti.names
    save_file({"emb_params": _vectors(1)}, folder / "sub" / "cat.safetensors")
    ti.rescan()
    with pytest.raises(ConfigError, match="two embedding files are named cat"):
        ti(model.tokenizer.encode("cat"))


def test_cli_embedding_dir_and_from_png(model, folder, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_model(model.replace(textual_inversion=None), path)
    out, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(path), "--steps", "2", "--sampler", "euler", "--size", "64x48"]
    args = ["generate", "a cat", "--negative", "dog", *common, "--out", str(out)]
    assert main([*args, "--embedding-dir", str(folder)]) == 0
    params = Image.open(out).text["parameters"]
    assert f"cat: {_short(folder / 'cat.safetensors')}" in params
    capsys.readouterr()
    replay = ["generate", "--from-png", str(out), "--model", str(path), "--out", str(again)]
    assert main(replay) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--embedding-dir" in err[0], err
    assert main([*replay, "--embeddings-dir", str(folder)]) == 0  # A1111's spelling
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main([*args, "--embedding-dir", str(tmp_path / "missing"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--embedding-dir" in err and "not a folder" in err


@pytest.mark.parametrize("mode", [{"low_memory": "fp16"}, {"fast": True}])
def test_embeddings_work_in_the_memory_and_speed_modes(model, folder, tmp_path, mode):
    import noisecraft

    path = tmp_path / "tiny.safetensors"
    save_model(model.replace(textual_inversion=None), path)
    kw = dict(negative_prompt="dog", steps=3, sampler="euler", width=W, height=H, seed=2)
    ref = noisecraft.load(path, embedding_dir=folder)("a cat", **kw).tensors
    pipe = noisecraft.load(path, embedding_dir=folder, **mode)
    got = pipe("a cat", **kw)
    plain = noisecraft.load(path, **mode)("a cat", **kw).tensors  # "cat", "dog": plain words
    assert "TI hashes" in got.infotexts[0]
    # the mode's own rounding is small next to what the embedding changes
    assert (got.tensors - ref).abs().max() < 0.5 * (ref - plain).abs().max()
