"""Tokenizers: the default GGUF vocabulary against transformers' GGUF tokenizer, SentencePiece
(a real LLaMA-layout model) directly and rebuilt from GGUF metadata, chat templates, and
streaming decode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
from pathlib import Path

import pytest

from dovetail_ext.formats import ModelSource, load_gguf, load_hf
from dovetail_ext.formats.tokenizer import CHATML_TEMPLATE, Tokenizer, tokenizer_from_gguf_vocab

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n\nclass X:\n\tpass\n",
    "12345 and 3.14159 and 1,000,000 and x1y22z333",
    "  two leading spaces and two trailing  ",
    " leading space",
    "trailing space ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "日本語のテキストと中文和한국어",
    "naïve café résumé Ångström façade Œuvre",
    "Привет, мир! Γειά σου Κόσμε",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "",
    " ",
    "\n",
    "a" * 300,
    "don't won't I'm we'll they've",
]

# Numbers after two or more spaces, and numeric symbols (½, ①): transformers' GGUF tokenizer
# applies the GPT-2 regex alone, while SmolLM2's own tokenizer.json and llama.cpp's "smollm"
# rule first split every \p{N} character off. Ours follows the latter.
DIGIT_SPLIT_TEXTS = ["   \n  12 34  \n", "mixed 12abc34 ½ ⅔ ①②", "a  1"]


@pytest.fixture(scope="module")
def ours(default_source: ModelSource) -> Tokenizer:
    return default_source.tokenizer


@pytest.fixture(scope="module")
def theirs(default_gguf_path: Path):
    """transformers' tokenizer built from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf_path.parent),
                                                      gguf_file=default_gguf_path.name)


@pytest.fixture(scope="module")
def theirs_digits(theirs):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (digits split first)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers
    tok = HFTokenizer.from_str(theirs.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


@pytest.mark.parametrize("text", TEXTS + DIGIT_SPLIT_TEXTS)
def test_default_matches_transformers(ours: Tokenizer, theirs, theirs_digits, text: str) -> None:
    ids = ours.encode(text)
    assert ids == theirs_digits.encode(text, add_special_tokens=False).ids
    if text in DIGIT_SPLIT_TEXTS:
        assert ids != theirs.encode(text, add_special_tokens=False)  # the known difference
    else:
        assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == theirs.decode(ids)


def test_default_vocab_and_specials(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_id == 1 and ours.eos_ids == frozenset({2}) and not ours.add_bos
    assert ours.id_to_piece(1) == "<|im_start|>" and ours.id_to_piece(2) == "<|im_end|>"
    assert ours.piece_to_id("<|endoftext|>") == 0 and ours.piece_to_id("no such piece!") is None
    assert ours.encode("hi", add_bos=True)[0] == 1
    assert ours.encode("<|im_start|>")[0] == 1  # specials in text are parsed
    # Digits are split one by one (SmolLM2 / llama.cpp "smollm" rule)
    assert [ours.decode([i]) for i in ours.encode("12345")] == list("12345")
    assert ours.decode(ours.encode("<|im_end|>x"), skip_special=True) == "x"


def test_digits_after_spaces_follow_llama_cpp(ours: Tokenizer) -> None:
    """Digits are split off before the GPT-2 regex, as llama.cpp's smollm rule does: the two
    spaces before a digit stay one pre-token ("ĠĠ") instead of "Ġ" + "Ġ1"."""
    pieces = [ours.id_to_piece(i) for i in ours.encode("a  1")]
    assert pieces == ["a", "ĠĠ", "1"]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours: Tokenizer, theirs, messages, add_generation_prompt) -> None:
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ours.encode(text).count(1) == len(messages) + (messages[0]["role"] != "system") + add_generation_prompt


def test_chatml_default_and_template_errors(ours: Tokenizer) -> None:
    plain = Tokenizer.from_tokenizers(ours.backend, bos_id=1, eos_ids=[2])
    assert plain.chat_template is None
    msgs = [{"role": "user", "content": "Hi"}]
    assert plain.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert plain.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert "<|im_start|>" in CHATML_TEMPLATE

    strict = Tokenizer.from_tokenizers(ours.backend, chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
        "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"), bos_id=1, eos_ids=[2])
    assert strict.apply_chat_template(msgs) == "<|im_start|>Hi<|im_end|>"
    with pytest.raises(ValueError, match="first message must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        plain.apply_chat_template([{"role": "user"}])
    from dovetail_ext.errors import FormatError
    with pytest.raises(FormatError, match="does not compile"):
        Tokenizer.from_tokenizers(ours.backend, chat_template="{% for %}")
    with pytest.raises(FormatError, match="outside the vocabulary"):
        Tokenizer.from_tokenizers(ours.backend, eos_ids=[49152])
    # The sandbox refuses attribute access to Python internals.
    evil = Tokenizer.from_tokenizers(ours.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        evil.apply_chat_template(msgs)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_stream_decoder_equals_decode(ours: Tokenizer, text: str) -> None:
    ids = ours.encode(text)
    parts = _stream(ours, ids)
    assert "".join(parts) == ours.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)


def test_stream_decoder_holds_back_partial_utf8(ours: Tokenizer) -> None:
    ids = ours.encode("😀")
    assert len(ids) > 1, "the emoji must span several byte tokens for this test"
    dec = ours.stream_decoder()
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "😀"
    # A sequence cut inside a character comes out, replaced, only at flush.
    dec = ours.stream_decoder()
    assert dec.push(ids[0]) == "" and dec.flush() == "\ufffd"


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_to_the_text(ours: Tokenizer, text: str) -> None:
    """Byte-level BPE: every token's bytes, parts of characters too, join to the text."""
    ids = ours.encode(text)
    assert b"".join(ours.token_bytes(i) for i in ids).decode("utf-8") == text
    emoji = ours.encode("😀")
    assert len(emoji) > 1 and all(ours.decode([i]) == "\ufffd" for i in emoji)
    assert b"".join(ours.token_bytes(i) for i in emoji) == "😀".encode()


# ------------------------------------------------------------------ SentencePiece

def _spm_path() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "mistral-common (test dependency) ships the SentencePiece model"
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def sp():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(_spm_path()))


@pytest.fixture(scope="module")
def spm_hf_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA checkpoint (safetensors written by hand) with the real model."""
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("spm_hf")
    V, D, F, L = 32000, 32, 64, 1
    rng = np.random.default_rng(0)
    KV = D // 2  # 2 heads of 16, 1 key/value head
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D), np.float32),
         "model.norm.weight": np.ones(D, np.float32)}
    for name, shape in [("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
                        ("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (KV, D)), ("self_attn.v_proj", (KV, D)),
                        ("self_attn.o_proj", (D, D)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                        ("mlp.down_proj", (D, F))]:
        for i in range(L):
            t[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape, np.float32)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2}))
    (d / "tokenizer.model").write_bytes(_spm_path().read_bytes())
    return d


SPM_TEXTS = [t for t in TEXTS if "<|" not in t] + [
    "    indented code\n        more", "a   b    c", "ūnĭcōdé ǅ ǈ", "\u200bzero width\u200d",
    "ｆｕｌｌｗｉｄｔｈ", "rare chars: ꙮ 𓀀 𝔘𝔫𝔦",
]


@pytest.fixture(scope="module")
def spm_tok(spm_hf_dir: Path) -> Tokenizer:
    return load_hf(spm_hf_dir).tokenizer


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_directory_matches_sentencepiece(spm_tok: Tokenizer, sp, text: str) -> None:
    tok = spm_tok
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == frozenset({2})
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert "".join(_stream(tok, sp.encode(text))) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_token_bytes(spm_tok: Tokenizer, sp, text: str) -> None:
    """SentencePiece: byte-fallback pieces are their bytes and ▁ a space, so the tokens' bytes
    join to SentencePiece's own decoding, with the space of its dummy prefix in front."""
    ids = sp.encode(text)
    joined = b"".join(spm_tok.token_bytes(i) for i in ids).decode("utf-8")
    assert joined == (" " + sp.decode(ids) if ids else "")
    assert spm_tok.token_bytes(1) == b"<s>"


def test_sentencepiece_specials_in_text(spm_tok: Tokenizer, sp) -> None:
    tok = spm_tok
    ids = tok.encode("<s>[INST] Hi [/INST] Hello</s>", add_bos=False)
    # Specials are parsed; each fragment after one is encoded alone (dummy prefix again).
    assert ids == [1] + sp.encode("[INST] Hi [/INST] Hello") + [2]
    assert tok.decode(ids) == "<s>[INST] Hi [/INST] Hello</s>"
    assert tok.decode(ids, skip_special=True) == "[INST] Hi [/INST] Hello"
    assert tok.id_to_piece(2) == "</s>" and tok.piece_to_id("▁Hello") == sp.piece_to_id("▁Hello")
    assert tok.piece_to_id("no-such-piece") is None
    # byte fallback: a character missing from the vocabulary is held back until complete
    ids = tok.encode("𓀀", add_bos=False)
    assert [tok.id_to_piece(i)[:3] for i in ids][-4:] == ["<0x"] * 4
    assert _stream(tok, ids)[-2:] == ["𓀀", ""]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, llama_gguf_writer, sp) -> Path:
    """A tiny GGUF carrying the real SentencePiece vocabulary the way llama.cpp writes it."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 5 if sp.is_unused(i) else 1 for i in range(n)]
    vocab = dict(model="llama", pre="default", tokens=[sp.id_to_piece(i) for i in range(n)], types=types,
                 scores=[sp.get_score(i) for i in range(n)], merges=None, bos=1, eos=2)
    path = tmp_path_factory.mktemp("spm_gguf") / "spm.gguf"
    llama_gguf_writer(path, vocab=vocab, dtype="f16", hidden=32, n_head=2, n_kv=1, ffn=64, n_layers=1)
    return path


def test_gguf_sentencepiece_vocab_matches_sentencepiece(spm_gguf: Path, sp) -> None:
    tok = load_gguf(spm_gguf).tokenizer
    assert tok.add_bos  # llama.cpp's default for a SentencePiece vocabulary without the flag
    for text in SPM_TEXTS:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.encode("<s>x</s>", add_bos=False) == [1] + sp.encode("x") + [2]


def test_gguf_sentencepiece_user_defined_pieces_and_unknown_id(sp) -> None:
    """Gemma's vocabulary: pieces typed user-defined (runs of spaces, newlines) are cut out of
    the text before SentencePiece encodes it, as llama.cpp does (SentencePiece itself never
    finds a piece spelled with spaces in its whitespace-escaped text), and decode as text;
    an <unk> typed as a control token is named by tokenizer.ggml.unknown_token_id."""
    from dovetail_ext.errors import FormatError
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)] + ["  ", "   ", "\n\n"]
    types = [3 if sp.is_unknown(i) or sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(n)] + [4, 4, 4]
    scores = [sp.get_score(i) for i in range(n)] + [0.0, 0.0, 0.0]
    with pytest.raises(FormatError, match="exactly one unknown token"):
        tokenizer_from_gguf_vocab(model="llama", tokens=tokens, token_types=types, scores=scores)
    tok = tokenizer_from_gguf_vocab(model="llama", tokens=tokens, token_types=types, scores=scores,
                                    add_space_prefix=False, add_bos=False, unk_id=sp.unk_id())
    two, three, nn = n, n + 1, n + 2
    ids = tok.encode("a   b  c\n\nd")
    assert [i for i in ids if i >= n] == [three, two, nn]
    assert tok.decode(ids) == tok.decode(ids, skip_special=True) == "a   b  c\n\nd"


def test_gguf_unsupported_vocab_type(sp) -> None:
    from dovetail_ext.errors import FormatError
    with pytest.raises(FormatError, match="tokenizer model 'bert' is not supported yet"):
        tokenizer_from_gguf_vocab(model="bert", tokens=["a"], token_types=[1], source="x.gguf")
    with pytest.raises(FormatError, match="exactly one unknown token"):
        tokenizer_from_gguf_vocab(model="llama", tokens=["a", "b"], token_types=[1, 1], scores=[0.0, 0.0])
    with pytest.raises(FormatError, match="needs tokenizer.ggml.merges"):
        tokenizer_from_gguf_vocab(model="gpt2", tokens=["a"], token_types=[1])
    with pytest.raises(FormatError, match="token_type has 1 entries for 2 tokens"):
        tokenizer_from_gguf_vocab(model="gpt2", tokens=["a", "b"], token_types=[1], merges=[])


@pytest.mark.parametrize("pre,arch,digits", [("llama-bpe", "llama", ["123", "456", "7"]),
                                             ("qwen2", "qwen2", list("1234567"))])
def test_gguf_split_pre_tokenizers_match_transformers(tmp_path: Path, default_source: ModelSource,
                                                      llama_gguf_writer, pre: str, arch: str,
                                                      digits: list[str]) -> None:
    """pre = "llama-bpe" (LLaMA-3 files) uses the LLaMA-3 split regex, "qwen2" the same with
    single digits; checked against transformers on a GGUF carrying the default vocabulary
    with that pre-tokenizer name."""
    transformers = pytest.importorskip("transformers")
    model = json.loads(default_source.tokenizer.backend.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    path = tmp_path / f"{pre}.gguf"
    llama_gguf_writer(path, arch=arch, dtype="f16", hidden=32, n_head=2, n_kv=1, ffn=32, n_layers=1, vocab=dict(
        model="gpt2", pre=pre, tokens=tokens, types=[3 if i <= 16 else 1 for i in range(len(tokens))],
        merges=[" ".join(m) for m in model["merges"]], bos=1, eos=2, add_bos=False))
    ours = load_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + DIGIT_SPLIT_TEXTS + ["I'M HERE, YOU'LL SEE", "1234567 89", "x\r\n\r\n  y"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    # LLaMA-3 groups digits by three (this vocabulary then spells each group digit by digit).
    assert [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("1234567")] == digits
    assert ours.approximate is None


@pytest.mark.parametrize("pre,approximate", [("gpt-2", False), ("smollm", False), ("tekken", True), (None, True)])
def test_unimplemented_pre_tokenizer_is_flagged(pre, approximate: bool) -> None:
    from dovetail_ext.formats.tokenizer import _bytes_to_unicode
    tokens = [_bytes_to_unicode()[b] for b in range(256)] + ["<|end|>"]
    tok = tokenizer_from_gguf_vocab(model="gpt2", tokens=tokens, token_types=[1] * 256 + [3], merges=[],
                                    pre=pre, eos_ids=[256])
    assert (tok.approximate is not None) == approximate
    if approximate:
        assert repr(pre) in tok.approximate and "GPT-2 split" in tok.approximate
    assert tok.decode(tok.encode("héllo 12")) == "héllo 12"
