"""BPE tokenizers for nanochat: train, encode/decode, chat rendering with a loss mask, persistence.

Two implementations share one API (the `Tokenizer` protocol):
- `RustBPETokenizer`: trains with the `rustbpe` package and encodes with `tiktoken`. This is the default and
  the original nanochat format: `<base>/tokenizer/tokenizer.pkl` holds a pickled `tiktoken.Encoding`.
- `HuggingFaceTokenizer`: the same byte-level BPE built on the `tokenizers` library (`tokenizer.json`).

In both, the 256 byte tokens and the merges come first and the 9 special tokens take the last ids.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import rustbpe
import tiktoken
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanochat.common import atomic_write, get_base_dir
from nanochat.safe_io import load_torch_file, read_bounded, short
from nanochat.tokenizer_pickle import (  # noqa: F401 - re-exported: the errors are part of this module's API
    HOW_TO_CREATE,
    MAX_TOKENIZER_BYTES,
    MAX_VOCAB,
    CorruptTokenizerFile,
    TokenizerFileError,
    UnsafeTokenizerPickle,
    as_tokenizer_error,
    load_encoding_pickle,
)

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the document delimiter and the eval pad token
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python (calculator) tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, forced into the stream, never trained on
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into runs of 1-2 digits (not 1-3): with a small vocab, fewer
# number tokens are wasted on 3-digit combinations.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

PKL_NAME = "tokenizer.pkl"
JSON_NAME = "tokenizer.json"
TOKEN_BYTES_NAME = "token_bytes.pt"
PROBE_TEXT = "Hello, world! 12345 naïve café — 東京 🙂\n\tend"  # a loaded tokenizer must round-trip this

Conversation = dict[str, Any]  # {"messages": [{"role": ..., "content": ...}, ...]}


@runtime_checkable
class Tokenizer(Protocol):
    def get_vocab_size(self) -> int: ...
    def get_special_tokens(self) -> list[str]: ...
    def id_to_token(self, id: int) -> str: ...
    def encode_special(self, name: str) -> int: ...
    def get_bos_token_id(self) -> int: ...
    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]: ...
    def __call__(self, *args: Any, **kwargs: Any) -> list[int] | list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, tokenizer_dir: str | os.PathLike) -> None: ...
    def render_conversation(
        self, conversation: Conversation, max_tokens: int = 2048
    ) -> tuple[list[int], list[int]]: ...
    def render_for_completion(self, conversation: Conversation) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------------
# What both implementations share: special-token lookups and chat rendering (written once, on top of encode)


class TokenizerBase:
    """Subclasses set `_special_ids` and `bos_token_id` and provide `_encode_text` and `_encode_batch` (ordinary
    text to ids: text that spells a special token never becomes its id); the rest is shared."""

    _special_ids: dict[str, int]  # special token name -> id
    bos_token_id: int

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Ids of a text, or of each text of a list, between optional special tokens (a name or an id)."""
        head, tail = self._special_id(prepend), self._special_id(append)
        if isinstance(text, str):
            return head + self._encode_text(text) + tail
        return [head + row + tail for row in self._encode_batch(text, num_threads)]

    def __call__(self, *args: Any, **kwargs: Any) -> list[int] | list[list[int]]:
        return self.encode(*args, **kwargs)

    def get_special_tokens(self) -> list[str]:
        return sorted(self._special_ids, key=self._special_ids.__getitem__)

    def encode_special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"{name!r} is not a special token of this tokenizer ({self.get_special_tokens()})")
        return self._special_ids[name]

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def _special_id(self, token: int | str | None) -> list[int]:
        """prepend/append arguments: a special token name, an id, or None (nothing)."""
        if token is None:
            return []
        return [self.encode_special(token) if isinstance(token, str) else token]

    def render_conversation(self, conversation: Conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation, and a mask that is 1 where the model is trained: the assistant's
        own output. Tool output (python_output) and everything outside assistant turns is mask 0.
        """
        messages = _merge_system_message(_check_shape(conversation))
        special = self.encode_special
        ids: list[int] = []
        mask: list[int] = []

        def add(token_ids: int | list[int], mask_value: int) -> None:
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        add(self.get_bos_token_id(), 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(
                    f"message {i} has role {message['role']!r} but {expected!r} was expected: messages must "
                    "alternate user/assistant, starting with user (after an optional system message)"
                )
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"user message {i} content must be a str, got {type(content).__name__}")
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            if not isinstance(content, str | list):
                raise ValueError(f"assistant message {i} content must be a str or a list of parts")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                part_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(part_ids, 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(part_ids, 1)
                    add(special("<|python_end|>"), 1)
                elif part["type"] == "python_output":
                    # Produced by the tool at inference time, so the model must not learn to predict it.
                    add(special("<|output_start|>"), 0)
                    add(part_ids, 0)
                    add(special("<|output_end|>"), 0)
                else:
                    raise ValueError(
                        f"unknown assistant content part type {part['type']!r} in message {i} "
                        "(expected 'text', 'python' or 'python_output')"
                    )
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Conversation) -> list[int]:
        """Prompt for the model's next reply: the conversation minus its last (assistant) message, then
        <|assistant_start|>. Used by RL and generative evals."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects a conversation whose last message is the assistant's")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]


def _num_ranks(vocab_size: int) -> int:
    """How many ids BPE training may fill (256 bytes + merges): the vocab less the special tokens."""
    num_ranks = vocab_size - len(SPECIAL_TOKENS)
    if num_ranks < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    return num_ranks


def _check_shape(conversation: Any) -> list[dict[str, Any]]:
    """
    The messages of a conversation, after checking every shape render_conversation relies on, so that bad input
    (from a data file, the app, a fuzzer) is a ValueError naming the message, never a TypeError/KeyError from
    deep inside, and never silently wrong ids (encode() would take a list of str for a batch).
    """
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation must be a dict with a "messages" list')
    messages = conversation["messages"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {message!r:.80}')
        content = message["content"]
        if message["role"] == "assistant" and isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str) or "type" not in part:
                    raise ValueError(f'message {i} part {j} must be a dict with "type" and a str "text", '
                                     f"got {part!r:.80}")
        elif not isinstance(content, str):
            what = "a str or a list of parts" if message["role"] == "assistant" else "a str"
            raise ValueError(f"message {i} ({message['role']}) content must be {what}, got {type(content).__name__}")
    return messages


def _merge_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat format has no system turn: fold a leading system message into the first user message."""
    if not messages:
        raise ValueError("conversation has no messages")
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("a system message must be followed by a user message")
    first_user = copy.deepcopy(messages[1])  # never mutate the caller's conversation
    first_user["content"] = messages[0]["content"] + "\n\n" + first_user["content"]
    return [first_user, *messages[2:]]


# ---------------------------------------------------------------------------------------------------------
# rustbpe + tiktoken


class RustBPETokenizer(TokenizerBase):
    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> RustBPETokenizer:
        """Train `vocab_size - 9` mergeable ranks (256 bytes + merges); the 9 specials take the last ids."""
        num_ranks = _num_ranks(vocab_size)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), num_ranks, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < num_ranks:
            warnings.warn(
                f"training text ran out of pairs to merge: the vocab has "
                f"{len(mergeable_ranks) + len(SPECIAL_TOKENS)} tokens, not the requested {vocab_size}",
                stacklevel=2,
            )
        enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=trainer.get_pattern(),
            mergeable_ranks=mergeable_ranks,
            special_tokens={name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)},
        )
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike) -> RustBPETokenizer:
        path = Path(tokenizer_dir) / PKL_NAME
        enc = load_encoding_pickle(path)
        with as_tokenizer_error(path, "is not a usable tokenizer"):
            tokenizer = cls(enc)
        return _probed(tokenizer, path)

    def save(self, tokenizer_dir: str | os.PathLike) -> None:
        """Pickle the tiktoken Encoding to `tokenizer.pkl` (the original nanochat format)."""
        atomic_write(Path(tokenizer_dir) / PKL_NAME, lambda f: pickle.dump(self.enc, f))

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def id_to_token(self, id: int) -> str:
        return self.enc.decode([id])

    # encode_ordinary never turns "<|bos|>" etc. in the text into special ids: text can't inject them.
    def _encode_text(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


# ---------------------------------------------------------------------------------------------------------
# HuggingFace tokenizers


class HuggingFaceTokenizer(TokenizerBase):
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str = "<|bos|>"):
        self.tokenizer = tokenizer
        # Added special tokens are matched in the input text by default; make them plain text instead.
        self.tokenizer.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {token.content: i for i, token in added.items() if token.special}
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> HuggingFaceTokenizer:
        num_ranks = _num_ranks(vocab_size)
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
        # Same regex split as rustbpe, then map each byte to a printable char (ByteLevel): no text is unknown.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=num_ranks,
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(iter(text_iterator), trainer)
        # Added after training so the specials take the last ids, as in RustBPETokenizer.
        tokenizer.add_special_tokens(SPECIAL_TOKENS)
        return cls(tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> HuggingFaceTokenizer:
        """A local directory holding tokenizer.json, else a HuggingFace Hub id (needs network access)."""
        if Path(path_or_hub_id).is_dir():
            return cls.from_directory(path_or_hub_id)
        return cls(tokenizers.Tokenizer.from_pretrained(str(path_or_hub_id)))

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike) -> HuggingFaceTokenizer:
        path = Path(tokenizer_dir) / JSON_NAME
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; save one with HuggingFaceTokenizer.save()")
        text = read_bounded(path, MAX_TOKENIZER_BYTES, TokenizerFileError, "tokenizer file")
        with as_tokenizer_error(path, "is not a valid tokenizers JSON file"):
            tokenizer = cls(tokenizers.Tokenizer.from_str(text.decode("utf-8")))
        return _probed(tokenizer, path)

    def save(self, tokenizer_dir: str | os.PathLike) -> None:
        text = self.tokenizer.to_str()
        atomic_write(Path(tokenizer_dir) / JSON_NAME, lambda f: f.write(text.encode("utf-8")))

    def get_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, id: int) -> str:
        return self.decode([id])

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # num_threads is accepted for API parity; `tokenizers` batches on its own Rust thread pool.
        return [row.ids for row in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _probed(tokenizer: TokenizerBase, path: Path) -> TokenizerBase:
    """Encode and decode a probe text once, so a tokenizer that panics or garbles text is refused at load, not in
    the middle of a chat; and check every special token the chat format needs is there."""
    with as_tokenizer_error(path, "cannot encode text"):
        missing = [t for t in SPECIAL_TOKENS if t not in tokenizer._special_ids]
        if missing:
            raise CorruptTokenizerFile(f"{path} lacks the special tokens {missing}; {HOW_TO_CREATE}")
        ids = tokenizer.encode(PROBE_TEXT)
        back = tokenizer.decode(ids)
    if back != PROBE_TEXT:
        raise CorruptTokenizerFile(f"{path} does not round-trip text: {PROBE_TEXT!r} decodes back as {short(back)}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# token_bytes.pt (for bits-per-byte) and loading from the base dir


def compute_token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """int32 (V,): UTF-8 byte length of each token's decoded string; 0 for special tokens (bpb skips them).

    As in the original, a token that is an incomplete UTF-8 sequence decodes to U+FFFD (3 bytes).
    """
    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    lengths = [
        0 if i in special_ids else len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.get_vocab_size())
    ]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(tokenizer: Tokenizer, tokenizer_dir: str | os.PathLike) -> torch.Tensor:
    token_bytes = compute_token_bytes(tokenizer)
    atomic_write(Path(tokenizer_dir) / TOKEN_BYTES_NAME, lambda f: torch.save(token_bytes, f))
    return token_bytes


def fingerprint(tokenizer: RustBPETokenizer | HuggingFaceTokenizer) -> str:
    """
    sha256 (hex) of what decides which ids a text becomes: for tiktoken, the split pattern, every mergeable token
    with its rank and every special token with its id; for `tokenizers`, its JSON with sorted keys. Not the hash of
    tokenizer.pkl's bytes: the same tokenizer re-pickled (another protocol, another Encoding name) or published again
    under another key keeps its fingerprint, while two tokenizers of the same vocab size never share one.
    Checkpoints record it (nanochat.checkpoint_manager.tokenizer_record) so a wrong tokenizer is refused at load.
    """
    digest = hashlib.sha256()
    if isinstance(tokenizer, RustBPETokenizer):
        enc = tokenizer.enc
        digest.update(json.dumps({"pattern": enc._pat_str, "special": enc._special_tokens}, sort_keys=True).encode())
        for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda item: item[1]):
            digest.update(b"%d:%d:" % (rank, len(token)) + token)  # length-prefixed: the stream parses one way only
    else:
        digest.update(json.dumps(json.loads(tokenizer.tokenizer.to_str()), sort_keys=True).encode())
    return digest.hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> RustBPETokenizer | HuggingFaceTokenizer:
    """The tokenizer saved in a directory: tokenizer.pkl (tiktoken, the original format), else tokenizer.json."""
    tokenizer_dir = Path(tokenizer_dir)
    # lexists, not is_file: a FIFO or device planted under the name is refused by the loader, not skipped.
    if os.path.lexists(tokenizer_dir / PKL_NAME):
        return RustBPETokenizer.from_directory(tokenizer_dir)
    if os.path.lexists(tokenizer_dir / JSON_NAME):
        return HuggingFaceTokenizer.from_directory(tokenizer_dir)
    raise FileNotFoundError(f"no tokenizer ({PKL_NAME} or {JSON_NAME}) in {tokenizer_dir}; {HOW_TO_CREATE}, or pass "
                            "--tokenizer-dir for a --checkpoint outside the standard <base dir> layout")


def get_tokenizer(base_dir: str | os.PathLike | None = None) -> RustBPETokenizer:
    """The tokenizer in `<base_dir>/tokenizer/` (base_dir: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)."""
    return RustBPETokenizer.from_directory(_tokenizer_dir(base_dir))


def get_token_bytes(device: str | torch.device = "cpu", base_dir: str | os.PathLike | None = None) -> torch.Tensor:
    path = _tokenizer_dir(base_dir) / TOKEN_BYTES_NAME
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no token bytes at {path}; {HOW_TO_CREATE}")
    token_bytes = load_torch_file(path, MAX_VOCAB * 8 + (1 << 20), TokenizerFileError, "token bytes file")
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1 or token_bytes.is_floating_point():
        raise TokenizerFileError(f"{path} must hold a 1-D integer tensor (bytes per token), got {short(token_bytes)}; "
                                 f"{HOW_TO_CREATE}")
    return token_bytes.to(device)


def _tokenizer_dir(base_dir: str | os.PathLike | None) -> Path:
    return Path(base_dir if base_dir is not None else get_base_dir()) / "tokenizer"
