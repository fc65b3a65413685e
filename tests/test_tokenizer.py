"""CLIP tokenizer (noisecraft.models.tokenizer) and A1111 prompt weighting.

What is compared with what:

- The real vocabulary (OpenAI's bpe_simple_vocab_16e6.txt.gz, shipped) against known ids
  and against transformers' CLIPTokenizer (>= 5: the Rust `tokenizers` backend, which
  never uses ftfy) loaded from the vocab.json / merges.txt that ``write_vocab_files``
  writes. With ``cleanup="transformers"`` every prompt must give the same ids. With the
  default ``cleanup="clip"`` (OpenAI's clean-up, ftfy switched off so that the result does
  not depend on whether ftfy is installed) the ids are the same except where OpenAI's
  clean-up differs on purpose: HTML entities ("&amp;" is unescaped), which are compared
  against transformers on the unescaped text.
- CLIP's pre-tokenizer pattern, written here with the stdlib ``re``, against the original
  ``\\p{L}``/``\\p{N}`` pattern in the ``regex`` module, on random text of assigned
  characters.
- A tiny vocabulary built in the test (with missing byte symbols) against transformers.
- ``parse_prompt_attention`` against the examples of A1111's docstring, to the last bit.
"""

from __future__ import annotations

import ast
import doctest
import gzip
import html
import random
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

from noisecraft.errors import (
    CheckpointError,
    ConfigError,
    NoisecraftError,
    OutputExistsError,
    PromptWarning,
    UnknownNameError,
)
from noisecraft.models import prompt_weights, tokenizer
from noisecraft.models.prompt_weights import parse_prompt_attention
from noisecraft.models.tokenizer import (
    CLIPTokenizer,
    _pretokenize,
    bytes_to_unicode,
    clean_text,
    write_vocab_files,
)

BOS, EOS, COMMA = 49406, 49407, 267
ASSET = Path(tokenizer.__file__).parent.parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"

PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "An Astronaut Riding A Horse On Mars, 4K, HDR",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k wallpaper",
    "pi is 3.14, not 1234567!",
    "don't stop, it's what we'll do; I'd say they're gone; I've I'm",
    "DON'T SHOUT'S",
    "café naïve résumé Zürich",
    "cafe\u0301 (decomposed accent)",
    "emoji 🐱🚀 and 👩‍👩‍👧 family",
    "multiple     spaces\tand\ttabs\nand newlines",
    "   leading and trailing   ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "hyphen-ated words, e-mail, state-of-the-art",
    "http://example.com/path?x=1&y=2",
    "#hashtag @user $100 50% a+b=c",
    "snake_case __init__ a_b_c",
    "...!!!???---",
    "日本語のテキスト and 中文",
    "русский текст и Ελληνικά",
    "x² + y³ = ½ Ⅻ ⅓",
    "٣ arabic digits ٤٥ and ０１２ fullwidth",
    "ﬁne ligature, ß straße",
    "quotes: “curly” ‘single’ don’t",
    "nbsp\u00a0and\u3000ideographic space",
    "İstanbul ΑΘΗΝΑ",
    "",
    "a <|endoftext|> b <|startoftext|>",
    "(((masterpiece))), [blurry], (cat:1.3)",
    "1girl, solo, long hair, looking at viewer, smile",
]
ENTITY_PROMPTS = ["tom &amp; jerry", "&lt;3 &quot;quoted&quot; &amp;amp; twice"]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default(use_ftfy=False)


@pytest.fixture(scope="module")
def tok_tr() -> CLIPTokenizer:
    return CLIPTokenizer.default(cleanup="transformers")


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("clip_vocab")
    write_vocab_files(tok, folder)
    return folder


@pytest.fixture(scope="module")
def hf(vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))


# ----------------------------------------------------------------------------- real vocab


def test_default_vocabulary(tok):
    assert tok.vocab_size == len(tok.vocab) == 49408
    assert len(tok.merges) == 49152 - 256 - 2
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert tok.comma_token_id == COMMA
    assert tok.vocab["<|startoftext|>"] == BOS and tok.vocab["<|endoftext|>"] == EOS
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_photo_of_a_cat(tok):
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids = tok("a photo of a cat")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ids[0, 7:].tolist() == [EOS] * 70
    assert tok.decode(ids[0]) == "a photo of a cat"
    assert tok.tokenize("a photo") == ["a</w>", "photo</w>"]


def test_batch_padding_and_sd2_pad(tok):
    batch = tok(["a cat", "a photo of a dog", ""])
    assert batch.shape == (3, 77)
    assert batch[2, :2].tolist() == [BOS, EOS] and (batch[2, 2:] == EOS).all()
    assert tok([]).shape == (0, 77)
    sd2 = CLIPTokenizer.default(pad_token_id=0)
    row = sd2("a photo of a cat")[0].tolist()
    assert row[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS] and row[7:] == [0] * 70


def test_long_prompt_is_never_cut_silently(tok):
    text = "cat " * 80
    with pytest.raises(ConfigError, match="truncation=True"):
        tok(text)
    cut = tok(text, truncation=True)[0].tolist()
    assert cut == [BOS] + [2368] * 75 + [EOS]


def test_parity_with_transformers(hf, tok, tok_tr):
    for text in PROMPTS + ENTITY_PROMPTS:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert tok_tr.encode(text) == expected, text
    for text in PROMPTS:  # no HTML entities: OpenAI's clean-up gives the same ids
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    for text in ENTITY_PROMPTS:  # OpenAI unescapes twice, transformers not at all
        unescaped = html.unescape(html.unescape(text))
        assert tok.encode(text) == hf(unescaped, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) != hf(text, add_special_tokens=False)["input_ids"]
    short = [t for t in PROMPTS if len(tok.encode(t)) <= 75]
    expected = hf(short, padding="max_length", max_length=77)["input_ids"]
    assert tok_tr(short).tolist() == expected


def test_cleanup_differences():
    assert clean_text("Tom &amp;amp; Jerry", use_ftfy=False) == "tom & jerry"
    assert clean_text("Tom &amp; Jerry", cleanup="transformers") == "tom &amp; jerry"
    assert clean_text("ΟΔΟΣ", use_ftfy=False) == "οδος"  # str.lower: final sigma
    assert clean_text("ΟΔΟΣ", cleanup="transformers") == "οδοσ"  # Rust: per character
    assert clean_text("cafe\u0301", use_ftfy=False) == "café"  # NFC, as ftfy does
    with pytest.raises(UnknownNameError, match="clip"):
        clean_text("x", cleanup="clips")  # type: ignore[arg-type]


def test_pretokenizer_matches_regex_pattern():
    regex = pytest.importorskip("regex")
    pattern = (
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
        r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    openai = regex.compile(pattern, regex.IGNORECASE)  # as clip/simple_tokenizer.py
    hf = regex.compile(pattern)  # as transformers (its Rust regex)
    rng = random.Random(0)
    pools = [
        range(0x21, 0x7F),
        range(0xA0, 0x250),
        range(0x370, 0x400),
        range(0x660, 0x670),
        range(0x2000, 0x2190),
        range(0x3000, 0x3100),
        range(0x1F300, 0x1F340),
        range(0xFF00, 0xFF70),
        [0x20, 0x20, 0x300, 0x301, 0x1C, 0x85, 0x5F, 0x27, 0x27, 0x17F, 0x53, 0x54],
    ]
    checked = 0
    for _ in range(3000):
        text = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 12)))
        if any(unicodedata.category(c) == "Cn" for c in text):  # Unicode versions differ
            continue
        assert _pretokenize(text, "clip") == openai.findall(text), ascii(text)
        assert _pretokenize(text, "transformers") == hf.findall(text), ascii(text)
        checked += 1
    assert checked > 2000


def test_small_vocabulary_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    symbols = list(bytes_to_unicode().values())
    merges = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("n", "e"), ("ne", "w"), ("a", "a")]
    merges += [("aa", "a</w>"), ("aa", "aa"), ("lo", "w"), ("t", "h"), ("th", "e</w>")]
    tokens = [*symbols, *(s + "</w>" for s in symbols)]
    tokens = [t for t in tokens if t not in ("z", "z</w>", "q</w>")]  # unknown symbols
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    small = CLIPTokenizer(vocab, merges, cleanup="transformers")
    write_vocab_files(small, tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert small.tokenize("lower aaaa the") == ["low", "er</w>", "aa", "a", "a</w>", "the</w>"]
    for text in ["lower newer aaaa aaa aaaaa low lowest the other", "zzz qq quiz", "a", ""]:
        assert small.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    unk = small.eos_token_id  # transformers' unk_token: "z", "z</w>", "q</w>" are missing
    assert small.encode("zq qz") == [unk, unk, vocab["q"], unk]


# ----------------------------------------------------------------------------- loading


def test_loaders_agree(tok, vocab_dir, tmp_path):
    from_files = CLIPTokenizer.from_files(vocab_dir / "vocab.json", vocab_dir / "merges.txt")
    from_gz = CLIPTokenizer.from_bpe_gz(ASSET)
    for other in (from_files, from_gz):
        assert dict(other.vocab) == dict(tok.vocab) and other.merges == tok.merges
    # a diffusers layout: the tokenizer in a tokenizer/ subfolder; SD 2.x pads with "!"
    sub = tmp_path / "tokenizer"
    write_vocab_files(CLIPTokenizer.default(pad_token_id=0), sub)
    sd2 = CLIPTokenizer.from_folder(tmp_path)
    assert sd2.pad_token_id == 0 and dict(sd2.vocab) == dict(tok.vocab)
    assert CLIPTokenizer.from_folder(sub, pad_token_id=EOS).pad_token_id == EOS
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_vocab_files(tok, sub)
    write_vocab_files(tok, sub, overwrite=True)
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == EOS


def test_module_imports_no_third_party_tokenizers():
    allowed = {"__future__", "gzip", "html", "json", "re", "unicodedata", "zlib", "collections"}
    allowed |= {"functools", "importlib", "pathlib", "types", "typing", "torch", "noisecraft"}
    allowed |= {"math", "warnings"}
    for module in (tokenizer, prompt_weights):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                top.add((node.module or "").split(".")[0])
        assert top <= allowed, top - allowed


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, NoisecraftError)
    return message


def test_errors(tmp_path):
    with pytest.raises(CheckpointError) as err:
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert "vocab.json" in _one_line(err) and "pass" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        CLIPTokenizer.from_folder(tmp_path)
    assert "tokenizer" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        CLIPTokenizer.from_bpe_gz(tmp_path / "bpe.txt.gz")
    assert "bpe_simple_vocab_16e6.txt.gz" in _one_line(err)

    (tmp_path / "vocab.json").write_text('{"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
    with pytest.raises(CheckpointError) as err:  # merges.txt missing
        CLIPTokenizer.from_folder(tmp_path)
    assert "merges.txt" in _one_line(err)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(CheckpointError, match="line 2"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(CheckpointError, match="not a gzip"):
        CLIPTokenizer.from_bpe_gz(tmp_path / "bad.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(b"header\ni n\nt h\n"))
    with pytest.raises(CheckpointError, match="num_merges=None"):
        CLIPTokenizer.from_bpe_gz(tmp_path / "short.gz")
    assert len(CLIPTokenizer.from_bpe_gz(tmp_path / "short.gz", num_merges=None).merges) == 2

    with pytest.raises(CheckpointError, match="start token"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ConfigError, match="pad_token_id"):
        CLIPTokenizer.default(pad_token_id=49408)
    with pytest.raises(UnknownNameError):
        CLIPTokenizer.default(cleanup="openai")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- chunking


def _inner(chunk: list[int]) -> list[int]:
    assert chunk[0] == BOS and chunk[-1] == EOS and len(chunk) == 77
    return chunk[1 : chunk.index(EOS, 1)]


def test_chunks_of_a_200_token_prompt(tok):
    words = ["cat", "dog", "red", "house", "tree", "blue", "sky", "photo"]
    text = " ".join(words[i % len(words)] for i in range(200))
    ids = tok.encode(text)
    assert len(ids) == 200
    chunks = tok.encode_chunks(text)
    assert chunks.shape == (3, 77)
    rows = chunks.tolist()
    assert all(r[0] == BOS and r[-1] == EOS for r in rows)
    assert [len(_inner(r)) for r in rows] == [75, 75, 50]
    assert sum((_inner(r) for r in rows), []) == ids
    assert tok.chunk_ids(ids).tolist() == rows


def test_chunk_boundaries(tok):
    cat = 2368
    assert tok.chunk_ids([]).tolist() == [[BOS] + [EOS] * 76]
    assert tok.chunk_ids([cat] * 75).shape == (1, 77)
    assert tok.chunk_ids([cat] * 76).shape == (2, 77)
    sd2 = CLIPTokenizer.default(pad_token_id=0).chunk_ids([cat] * 80).tolist()
    assert sd2[0] == [BOS] + [cat] * 75 + [EOS]
    assert sd2[1] == [BOS] + [cat] * 5 + [EOS] + [0] * 70


def test_comma_break(tok):
    cat, dog = 2368, 1929
    ids = [cat] * 70 + [COMMA] + [dog] * 10
    rows = tok.chunk_ids(ids).tolist()
    # the chunk is full at the 76th token; its last comma is 5 tokens back (<= 20),
    # so the 4 dogs after it move to the next chunk (A1111's comma_padding_backtrack)
    assert _inner(rows[0]) == [cat] * 70 + [COMMA]
    assert _inner(rows[1]) == [dog] * 10
    assert sum((_inner(r) for r in rows), []) == ids
    plain = tok.chunk_ids(ids, comma_backtrack=0).tolist()
    assert _inner(plain[0]) == [cat] * 70 + [COMMA] + [dog] * 4
    far = [cat] * 50 + [COMMA] + [dog] * 30  # the comma is 25 tokens back: no break
    assert _inner(tok.chunk_ids(far).tolist()[0]) == far[:75]
    # a prompt of "tag, tag, ..." keeps its tags whole across chunks
    text = ", ".join(f"tag{i}" for i in range(40))
    rows = tok.encode_chunks(text).tolist()
    assert len(rows) == 2 and _inner(rows[0])[-1] == COMMA
    assert sum((_inner(r) for r in rows), []) == tok.encode(text)


# ----------------------------------------------------------------------------- weighting


def test_parse_prompt_attention_a1111_examples():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [
        ("an ", 1.0),
        ("important", 1.1),
        (" word", 1.0),
    ]
    with pytest.warns(PromptWarning, match="unclosed"):  # A1111 would weight it by 1.1
        assert parse_prompt_attention("(unbalanced") == [("(unbalanced", 1.0)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    # A1111's own example has one "(" never closed; A1111 weights the rest of the prompt by
    # 1.1 ("house" 1.573, "sky" 1.4641), we keep that bracket as text and warn
    with pytest.warns(PromptWarning, match="1 unclosed"):
        got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert got == [
        ("a (", 1.0),
        ("house", 1.3 * 1.1),
        (" ", 1.0),
        ("on", 1 / 1.1),
        (" a ", 1.0),
        ("hill", 0.5),
        (", sun, ", 1.0),
        ("sky", 1.1 * 1.1 * 1.1),
        (".", 1.0),
    ]


def test_parse_prompt_attention_more():
    assert parse_prompt_attention("a (very beautiful:1.3) girl") == [
        ("a ", 1.0),
        ("very beautiful", 1.3),
        (" girl", 1.0),
    ]
    assert parse_prompt_attention("(word : 0.5 )") == [("word ", 0.5)]
    assert parse_prompt_attention("(((house)))") == [("house", 1.0 * 1.1 * 1.1 * 1.1)]
    assert parse_prompt_attention("((house))") == [("house", 1.2100000000000002)]
    assert parse_prompt_attention("[[[a]]]") == [("a", 1.0 * (1 / 1.1) * (1 / 1.1) * (1 / 1.1))]
    assert parse_prompt_attention("[[[a]]]")[0][1] == pytest.approx(1.1**-3)
    assert parse_prompt_attention(r"\(not emphasis\) \\ a\[b\]") == [
        (r"(not emphasis) \ a[b]", 1.0)
    ]
    assert parse_prompt_attention("a) b] c: d") == [("a) b] c: d", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("a cat BREAK a dog") == [
        ("a cat", 1.0),
        ("BREAK", -1.0),
        ("a dog", 1.0),
    ]
    assert parse_prompt_attention("BREAKING news") == [("BREAKING news", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    with pytest.raises(ConfigError, match=r"\(text:1.3\)"):
        parse_prompt_attention("(a:1.2.3)")


def test_prompt_weights_doctests():
    result = doctest.testmod(prompt_weights, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0


def test_encode_weighted(tok):
    ids, weights = tok.encode_weighted("a (cat:1.5) [dog] BREAK photo")
    assert ids.shape == weights.shape == (2, 77) and weights.dtype == torch.float32
    assert ids[0, :5].tolist() == [BOS, 320, 2368, 1929, EOS]
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert (weights[0, 5:] == 1.0).all() and (weights[1, 3:] == 1.0).all()
    assert ids[1, :3].tolist() == [BOS, 1125, EOS]
    # fragments are tokenized on their own, as in A1111
    split, _ = tok.encode_weighted("(ca)t")
    pieces = tok.encode("ca") + tok.encode("t")
    assert split[0, 1 : 2 + len(pieces)].tolist() == [*pieces, EOS]
    assert pieces != tok.encode("cat")
    # no emphasis: the same chunks as encode_chunks, weights all 1
    text = ", ".join(f"tag{i}" for i in range(40))
    plain_ids, plain_w = tok.encode_weighted(text)
    assert torch.equal(plain_ids, tok.encode_chunks(text)) and (plain_w == 1.0).all()
    # BREAK inside brackets still breaks
    assert tok.encode_weighted("(a BREAK b)").ids.shape == (2, 77)
    assert tok.encode_weighted("").ids.tolist() == [[BOS] + [EOS] * 76]


def test_unclosed_brackets_warn_and_stay_literal():
    with pytest.warns(PromptWarning, match="2 unclosed"):
        got = parse_prompt_attention("a (red [cat:1.2) (dog) (sky")
    # "(red [cat:1.2)": the explicit weight closes the round bracket; "[" is left open
    assert got == [
        ("a ", 1.0),
        ("red [cat", 1.2),
        (" ", 1.0),
        ("dog", 1.1),
        (" (sky", 1.0),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # balanced and escaped brackets: no warning
        assert parse_prompt_attention(r"a \(cat) ((dog))") == [
            ("a (cat) ", 1.0),
            ("dog", 1.1 * 1.1),
        ]
