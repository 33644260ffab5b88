"""Tokenizers for the loaders: one class over Hugging Face ``tokenizers`` or SentencePiece.

What it is: :class:`Tokenizer` (encode, decode, streaming decode, chat templates) and the
builders the loaders call: :func:`tokenizer_from_gguf_vocab` for the vocabulary a GGUF
file stores in its metadata, :func:`tokenizer_from_hf_directory` for ``tokenizer.json`` or
``tokenizer.model`` next to a Hugging Face checkpoint. What it is not: a tokenizer
implementation. The ids come from ``tokenizers`` or ``sentencepiece``.

Conventions, the same for every backend:

- ``encode`` parses special tokens written in the text (``<|im_start|>``, ``<s>``) into
  their ids, as Hugging Face tokenizers do. This is what a rendered chat template needs;
  it also means user text that spells a special token becomes that token.
- ``encode`` never appends EOS, and adds BOS only when asked or when the model's
  default says so (``add_bos=None``). SmolLM2 adds no BOS; LLaMA SentencePiece models do.
- ``decode(ids, skip_special=False)`` writes special tokens as their text.

GGUF vocabularies (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE rebuilt with ``tokenizers`` from the token list and merges.
  ``tokenizer.ggml.pre`` picks the pre-tokenizer: ``smollm`` splits digits one by one and
  then applies the GPT-2 regex (llama.cpp's and SmolLM2's own rule); ``llama-bpe`` /
  ``llama3`` use the LLaMA-3 split regex, ``qwen2`` the same with digits one by one;
  ``gpt-2`` the GPT-2 regex; every other value (llama.cpp knows dozens) falls back to the
  GPT-2 regex, which may split text differently, and ``Tokenizer.approximate`` says so.
- ``llama``: SentencePiece BPE. The file keeps pieces, scores and piece types but not the
  SentencePiece model itself, so an equivalent model (BPE, byte fallback, identity
  normalizer, dummy prefix as ``tokenizer.ggml.add_space_prefix`` says) is serialized and
  handed to ``sentencepiece``; this reproduces its merge order exactly, ties included,
  which a ``tokenizers`` BPE rebuilt from the scores does not (runs of spaces differ).
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import FormatError
from .base import read_json_object

__all__ = ["Tokenizer", "StreamDecoder", "CHATML_TEMPLATE", "GEMMA_TEMPLATE", "tokenizer_from_gguf_vocab",
           "tokenizer_from_hf_directory"]

#: Used when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turns, for Gemma files without a template: roles user and model, a system message
# joined to the first user turn. (No BOS in the text: the tokenizer adds it.)
GEMMA_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ ((first if loop.first else '') + message['content']) | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# GGUF / SentencePiece piece types (the two use the same numbers).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# LLaMA-3's split regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose split is implemented exactly (others: the GPT-2 regex).
_EXACT_PRE = ("gpt-2", "smollm", "llama-bpe", "llama3", "llama-v3", "qwen2")
# Qwen2's: LLaMA-3's with digits one by one (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


class _Backend(Protocol):
    """What :class:`Tokenizer` needs from a tokenizer library."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...


class _HFBackend:
    """A ``tokenizers.Tokenizer``; its post-processor (BOS/EOS templates) is bypassed."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        # A tokenizer.json may leave gaps in its ids: the size is the largest id + 1.
        ids = tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


class _SentencePieceBackend:
    """A ``SentencePieceProcessor`` plus the splitting on special pieces that it lacks.

    SentencePiece never matches control pieces (``<s>``, ``</s>``) in text. To give the
    Hugging Face semantics, text is cut at control and unknown pieces first and each
    remaining fragment is encoded on its own, so a fragment after a special token gets the
    dummy-prefix space again: the rule of llama.cpp and of Hugging Face's legacy LLaMA
    tokenizer. Decoding inverts it, fragment by fragment. ``user_defined`` pieces (Gemma's
    runs of spaces and newlines, HTML tags) are cut out the same way, as llama.cpp does:
    SentencePiece would look for them in its whitespace-escaped text, where a piece spelled
    with spaces never occurs. They decode as text, never as special tokens.
    """

    def __init__(self, sp: Any, user_defined: Iterable[int] = ()) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.special = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        cut = self.special | set(user_defined)
        pieces = sorted((sp.id_to_piece(i) for i in cut), key=len, reverse=True)
        pieces = [p for p in pieces if p]
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, fragment in enumerate(self._split.split(text)):
            if k % 2:  # odd positions are the captured special pieces
                ids.append(self.sp.piece_to_id(fragment))
            elif fragment:
                ids.extend(self.sp.encode(fragment))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in self.special:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # SentencePiece answers unk for a piece it does not know.
        return i if i != self.sp.unk_id() or piece == self.sp.id_to_piece(i) else None


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """GPT-2's byte alphabet (:func:`_bytes_to_unicode`) inverted: character -> byte."""
    return {c: b for b, c in _bytes_to_unicode().items()}


class StreamDecoder:
    """Turns generated token ids into text piece by piece, for streaming output.

    ``push(id)`` returns only text that is final: an incomplete UTF-8 sequence (a byte
    token that is half a character decodes to U+FFFD) is held back until the next tokens
    complete it. It decodes a short window of recent ids and returns the difference, so
    spaces that depend on the neighbouring token come out as a full ``decode`` writes them.
    Joining every ``push`` result and ``flush()`` gives ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoded text before read is already emitted
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special=self._skip)
        text = self._tok.decode(self._ids[self._prefix:], skip_special=self._skip)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Returns whatever is held back (invalid UTF-8 as U+FFFD) and resets the decoder."""
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special=self._skip)
        text = self._tok.decode(self._ids[self._prefix:], skip_special=self._skip)
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done):]


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build it with :func:`tokenizer_from_gguf_vocab`, :func:`tokenizer_from_hf_directory`,
    or :meth:`from_tokenizers` / :meth:`from_sentencepiece` around a library object.

    Attributes:
        bos_id: the BOS token id, or None.
        eos_ids: every id that ends generation (EOS, end-of-turn), a frozenset; the first
            id passed in is the main EOS (``eos_token`` in chat templates).
        add_bos: whether ``encode`` adds BOS by default.
        chat_template: the model's Jinja chat template, or None (ChatML is used then).
    """

    def __init__(self, backend: _Backend, *, bos_id: int | None = None,
                 eos_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: str | None = None, source: str = "") -> None:
        self._backend = backend
        self.vocab_size = backend.vocab_size
        eos_ids = list(eos_ids)
        for t in ([bos_id] if bos_id is not None else []) + eos_ids:
            if not 0 <= int(t) < self.vocab_size:
                raise FormatError(f"{source or 'tokenizer'}: special token id {t} is outside the "
                                  f"vocabulary (size {self.vocab_size})")
        self.bos_id = None if bos_id is None else int(bos_id)
        eos_list = [int(t) for t in eos_ids]
        self.eos_ids = frozenset(eos_list)
        self._eos_main = eos_list[0] if eos_list else None
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.source = source
        #: Why token ids may differ from the model's own tokenizer (None: they do not), e.g.
        #: a GGUF pre-tokenizer this package does not implement.
        self.approximate: str | None = None
        self._template = _compile_template(chat_template or CHATML_TEMPLATE, source)

    @classmethod
    def from_tokenizers(cls, tok: Any, **kwargs: Any) -> Tokenizer:
        """Wraps a ``tokenizers.Tokenizer``; ``kwargs`` as for the constructor."""
        return cls(_HFBackend(tok), **kwargs)

    @classmethod
    def from_sentencepiece(cls, sp: Any, user_defined: Iterable[int] = (), **kwargs: Any) -> Tokenizer:
        """Wraps a ``sentencepiece.SentencePieceProcessor`` whose ``user_defined`` piece ids are
        matched in the text before it encodes; ``kwargs`` as for the constructor."""
        return cls(_SentencePieceBackend(sp, user_defined), **kwargs)

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer`` or ``SentencePieceProcessor``."""
        b = self._backend
        return b.tok if isinstance(b, _HFBackend) else b.sp

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        """The text of the main EOS token, or ''."""
        return "" if self._eos_main is None else self.id_to_piece(self._eos_main)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens in the text are parsed (see module doc).

        ``add_bos=None`` follows the model's default (``self.add_bos``).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos):
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token to add")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless ``skip_special``."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as the library spells it (``Ġ``, ``▁``...)."""
        return self._backend.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None when there is none."""
        return self._backend.piece_to_id(piece)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes ``token_id`` stands for, also when they are part of a character, with the
        space a SentencePiece piece starts with: a byte-fallback piece (``<0xE2>``) is its
        byte; a piece with ``▁`` is its text with spaces; another is the UTF-8 of its text when
        that decodes whole, else a byte-level BPE piece read through GPT-2's byte alphabet;
        None when none of these applies."""
        piece = self.id_to_piece(token_id)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if "\u2581" in piece:
            return piece.replace("\u2581", " ").encode("utf-8")
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        table = _byte_level_decoding()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return None

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Renders a conversation with the model's template (ChatML when it has none).

        ``messages`` are dicts with at least ``role`` and ``content`` strings. The template
        sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, a
        ``raise_exception(msg)`` helper and ``kwargs``, as in Hugging Face. The result is
        text to pass to :meth:`encode` (which parses the special tokens in it).
        """
        if not isinstance(messages, list):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{k}] must be a dict with 'role' and 'content' strings, got {m!r}")
        from jinja2 import TemplateError

        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **context)
        except TemplateError as e:
            raise ValueError(f"chat template of {self.source or 'the model'} failed: {e}") from e


def _compile_template(template: str, source: str) -> Any:
    """A Jinja template in a sandbox, with the helpers Hugging Face templates use."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime
        return datetime.now().strftime(fmt)

    # Same environment settings as transformers, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise FormatError(f"{source or 'tokenizer'}: the chat template does not compile: {e}") from e


# --------------------------------------------------------------------------------------
# GGUF vocabularies


def tokenizer_from_gguf_vocab(*, model: str, tokens: Sequence[str], token_types: Sequence[int] | None,
                              merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                              pre: str | None = None, bos_id: int | None = None,
                              eos_ids: Iterable[int] = (), add_bos: bool | None = None,
                              add_space_prefix: bool | None = None, chat_template: str | None = None,
                              source: str = "", unk_id: int | None = None) -> Tokenizer:
    """Builds the tokenizer a GGUF file describes (keys ``tokenizer.ggml.*``).

    Args:
        model: ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece).
        tokens, token_types, merges, scores, pre: the vocabulary arrays and pre-tokenizer name.
        add_bos: ``tokenizer.ggml.add_bos_token``; None means llama.cpp's default (yes for
            ``llama``, no for ``gpt2``).
        add_space_prefix: ``tokenizer.ggml.add_space_prefix`` (``llama`` only; default yes).
        unk_id: ``tokenizer.ggml.unknown_token_id`` (``llama`` only): the unknown token when
            no token is typed as one.
        source: the file, for error messages.

    Raises:
        FormatError: an unsupported vocabulary type or inconsistent arrays.
    """
    if token_types is not None and len(token_types) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries "
                          f"for {len(tokens)} tokens")
    kwargs = dict(bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template, source=source)
    if model == "gpt2":
        tok = Tokenizer.from_tokenizers(_byte_level_bpe(tokens, token_types, merges, pre, source),
                                        add_bos=bool(add_bos), **kwargs)
        if pre not in _EXACT_PRE:
            tok.approximate = (f"pre-tokenizer {pre!r} is not implemented: the GPT-2 split is used, so "
                               f"token ids may differ from llama.cpp's")
        return tok
    if model == "llama":
        sp = _sentencepiece_from_vocab(tokens, token_types, scores,
                                       True if add_space_prefix is None else add_space_prefix, source, unk_id)
        user_defined = [i for i, t in enumerate(token_types or ()) if t == _USER_DEFINED]
        return Tokenizer.from_sentencepiece(sp, user_defined, add_bos=True if add_bos is None else add_bos, **kwargs)
    raise FormatError(f"{source}: tokenizer model {model!r} is not supported yet "
                      f"(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(tokens: Sequence[str], token_types: Sequence[int] | None,
                    merges: Sequence[str] | None, pre: str | None, source: str) -> Any:
    """A ``tokenizers`` byte-level BPE equal to llama.cpp's ``gpt2`` vocabulary type."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if merges is None:
        raise FormatError(f"{source}: a gpt2 (byte-level BPE) vocabulary needs tokenizer.ggml.merges")
    types = list(token_types) if token_types is not None else [_NORMAL] * len(tokens)
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        # Some converters store ordinary tokens as raw text; respell them in the byte alphabet.
        if kind == _NORMAL and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = []
    for k, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise FormatError(f"{source}: tokenizer.ggml.merges[{k}] = {m!r} is not two tokens "
                              f"separated by one space")
        pairs.append((parts[0], parts[1]))
    try:
        tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise FormatError(f"{source}: the BPE vocabulary does not build: {e}") from e

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3", "qwen2"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>...) become special; user-defined ones are matched whole too.
    specials = [AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise FormatError(f"{source}: control / user-defined tokens are not all in the vocabulary "
                          f"({tok.get_vocab_size(with_added_tokens=True)} entries for {len(vocab)} tokens)")
    return tok


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int32 fields are written as 10-byte varints
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_field(number: int, value: int | float | bytes | str) -> bytes:
    """One protobuf field: varint for int/bool, fixed32 for float, bytes for str/bytes."""
    if isinstance(value, float):
        return _pb_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data
    return _pb_varint(number << 3 | 0) + _pb_varint(int(value))


def _sentencepiece_from_vocab(tokens: Sequence[str], token_types: Sequence[int] | None,
                              scores: Sequence[float] | None, add_dummy_prefix: bool,
                              source: str, unk_id: int | None = None) -> Any:
    """A SentencePiece BPE model rebuilt from a GGUF ``llama`` vocabulary.

    The model is serialized by hand (protobuf wire format; ``sentencepiece`` needs no
    ``protobuf`` package to load it). Fields of sentencepiece_model.proto used:
    ModelProto{pieces=1 {piece=1, score=2, type=3}, trainer_spec=2 {model_type=3 (BPE=2),
    byte_fallback=35, unk_id=40, bos_id=41, eos_id=42, pad_id=43}, normalizer_spec=3
    {name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}}.
    The normalizer is the identity, as llama.cpp applies none.
    """
    import sentencepiece

    if scores is None or token_types is None:
        raise FormatError(f"{source}: a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores "
                          f"and tokenizer.ggml.token_type")
    if len(scores) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk = [i for i, t in enumerate(token_types) if t == _UNKNOWN]
    if not unk and unk_id is not None and 0 <= unk_id < len(tokens):
        # (Gemma files type their <unk> as a control token and name it by
        # tokenizer.ggml.unknown_token_id; SentencePiece needs it typed as unknown.)
        unk = [unk_id]
        token_types = [_UNKNOWN if i == unk_id else t for i, t in enumerate(token_types)]
    if len(unk) != 1:
        raise FormatError(f"{source}: a SentencePiece vocabulary needs exactly one unknown token, "
                          f"found {len(unk)}")
    proto = bytearray()
    for piece, score, kind in zip(tokens, scores, token_types):
        if kind not in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
            raise FormatError(f"{source}: token {piece!r} has unknown token type {kind}")
        proto += _pb_field(1, _pb_field(1, piece) + _pb_field(2, float(score)) + _pb_field(3, int(kind)))
    byte_fallback = any(t == _BYTE for t in token_types)
    proto += _pb_field(2, _pb_field(3, 2) + _pb_field(35, byte_fallback) + _pb_field(40, unk[0])
                       + _pb_field(41, -1) + _pb_field(42, -1) + _pb_field(43, -1))
    proto += _pb_field(3, _pb_field(1, "identity") + _pb_field(3, add_dummy_prefix)
                       + _pb_field(4, False) + _pb_field(5, True))
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(bytes(proto))
    except (RuntimeError, OSError) as e:
        raise FormatError(f"{source}: the SentencePiece vocabulary is invalid: {e}") from e
    return sp


# --------------------------------------------------------------------------------------
# Hugging Face directories


def _token_text(value: Any) -> str | None:
    """``bos_token`` in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    template_file = directory / "chat_template.jinja"  # transformers >= 4.51 writes it apart
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise FormatError(f"{directory / 'tokenizer_config.json'}: chat_template is not a string")
    return template


def tokenizer_from_hf_directory(directory: str | Path, *, bos_id: int | None = None,
                                eos_ids: Iterable[int] = ()) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint directory.

    Reads ``tokenizer.json`` (``tokenizers``) or else ``tokenizer.model`` (SentencePiece),
    and ``tokenizer_config.json`` / ``chat_template.jinja`` for the chat template, the BOS
    and EOS tokens and ``add_bos_token``. ``bos_id`` (from config.json) wins over the BOS
    named in tokenizer_config.json; EOS ids from both are kept, the named one first.

    Whether BOS is added by default: ``add_bos_token`` when given; otherwise, for
    ``tokenizer.json``, whether its post-processor prepends BOS; for SentencePiece, yes.
    """
    directory = Path(directory)
    tcfg_path = directory / "tokenizer_config.json"
    tcfg = read_json_object(tcfg_path) if tcfg_path.is_file() else {}
    json_path, spm_path = directory / "tokenizer.json", directory / "tokenizer.model"
    if json_path.is_file():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(json_path))
        except Exception as e:  # tokenizers raises plain Exception from Rust
            raise FormatError(f"{json_path}: not a valid tokenizer.json: {e}") from e
        backend: _Backend = _HFBackend(tok)
        source = str(json_path)
    elif spm_path.is_file():
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.load(str(spm_path))
        except (RuntimeError, OSError) as e:
            raise FormatError(f"{spm_path}: not a valid SentencePiece model: {e}") from e
        for i in range(sp.get_piece_size()):  # the file does not guarantee it; decode() needs it
            try:
                sp.id_to_piece(i)
            except UnicodeDecodeError as e:
                raise FormatError(f"{spm_path}: piece {i} is not valid UTF-8: {e}") from e
        backend = _SentencePieceBackend(sp)
        source = str(spm_path)
    else:
        raise FormatError(f"{directory}: no tokenizer.json or tokenizer.model")

    def named_id(key: str) -> int | None:
        text = _token_text(tcfg.get(key))
        return None if text is None else backend.piece_to_id(text)

    if bos_id is None:
        bos_id = named_id("bos_token")
    named = named_id("eos_token")
    eos = ([named] if named is not None else []) + [t for t in eos_ids if t != named]

    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        if isinstance(backend, _HFBackend):
            with_special = backend.tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_special[:1] == [bos_id]
        else:
            add_bos = bos_id is not None
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos, add_bos=add_bos,
                     chat_template=_hf_chat_template(directory, tcfg), source=source)
