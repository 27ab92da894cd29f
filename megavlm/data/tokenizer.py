"""Tokenizers behind one small interface: sentencepiece models (the embedded dataset's, Llama-2 /
Vicuna's) and HF ``tokenizers`` files (tokenizer.json: Qwen2, Llama-3, ...).

Pretrained LLM tokenizers lack the markers a VLM adds (``<image>``, ``<|endofchunk|>``). As in
HF's added tokens, ``added_tokens`` are appended after the sentencepiece vocabulary, in order
(LLaVA-1.5: ``<image>`` = 32000 after Vicuna's 32000 pieces), and text is split at them before
sentencepiece sees it.
"""
from __future__ import annotations

import re
from pathlib import Path

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"   # Flamingo: closes the text that belongs to an image


class SentencePieceTokenizer:
    def __init__(self, path: str | Path, added_tokens: list[str] | tuple[str, ...] = (),
                 image_piece: str | None = None, require_image_token: bool = True):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        base = self.sp.get_piece_size()
        clashes = [t for t in added_tokens if self._piece_id(t) is not None]
        if clashes or len(set(added_tokens)) != len(added_tokens):
            raise ValueError(f"data.added_tokens {list(added_tokens)}: {clashes or 'duplicates'} "
                             f"{'are already pieces of' if clashes else 'in'} {path}")
        self.added = {token: base + i for i, token in enumerate(added_tokens)}
        self._added_by_id = {i: t for t, i in self.added.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, added_tokens)) + ")") if added_tokens else None
        image = self.token_id(image_piece or IMAGE_TOKEN)
        if image is None and require_image_token:
            raise ValueError(f"tokenizer {path} has no '{image_piece or IMAGE_TOKEN}' piece: list it in "
                             f"data.added_tokens (appended after the {base} pieces), or train the model with "
                             f"user_defined_symbols=['{IMAGE_TOKEN}']")
        self.image_token_id = image

    def _piece_id(self, piece: str) -> int | None:
        idx = self.sp.piece_to_id(piece)
        return idx if self.sp.id_to_piece(idx) == piece and idx != self.sp.unk_id() else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def bos_ids(self) -> list[int]:
        """What starts every sequence: [bos], or nothing for tokenizers without one (Qwen2)."""
        return [self.bos_id] if self.bos_id >= 0 else []

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in self._added_by_id:
                out += [self.sp.decode(run), self._added_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def encode_marker(self, text: str) -> list[int]:
        """A marker such as <|endofchunk|>: its one token when it is a piece of the vocabulary
        (encode() would put a word-start piece before it), else its encoding."""
        single = self.token_id(text)
        return [single] if single is not None else self.encode(text)

    def normalize(self, text: str) -> str:
        """The text as the tokenizer spells it (NFKC, whitespace runs collapsed): what a lossless
        encode/decode round trip gives back."""
        return self.sp.normalize(text).replace("\u2581", " ").strip()

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of ``text`` that encode to the unknown piece (none with byte fallback)."""
        unk = self.sp.unk_id()
        return sorted(c for c in set(text) if not c.isspace() and unk in self.sp.encode(c))

    def token_id(self, piece: str) -> int | None:
        """The id of a piece that is one token (a user-defined symbol or an added token), else None."""
        return self.added.get(piece, self._piece_id(piece))


class HFTokenizer:
    """A tokenizer.json (HF ``tokenizers``), with bos/eos/pad from the tokenizer_config.json beside
    it when there is one. ``added_tokens`` missing from the file are added after its vocabulary."""

    def __init__(self, path: str | Path, added_tokens: list[str] | tuple[str, ...] = (),
                 image_piece: str | None = None, require_image_token: bool = True):
        import json

        from tokenizers import Tokenizer

        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self.tk = Tokenizer.from_file(str(path))
        missing = [t for t in added_tokens if self.tk.token_to_id(t) is None]
        if missing:
            self.tk.add_special_tokens(missing)
        config_file = path.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self._bos = self._special(config, "bos_token")
        self._eos = self._special(config, "eos_token") or self.tk.token_to_id("<|endoftext|>")
        if self._eos is None:
            raise ValueError(f"{path}: no eos_token in {config_file.name} and no <|endoftext|> token")
        self._pad = self._special(config, "pad_token")
        image = self.token_id(image_piece or IMAGE_TOKEN)
        if image is None and require_image_token:
            raise ValueError(f"tokenizer {path} has no '{image_piece or IMAGE_TOKEN}' token: list it in "
                             f"data.added_tokens")
        self.image_token_id = image

    def _special(self, config: dict, key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        idx = self.tk.token_to_id(token)
        if idx is None:
            raise ValueError(f"{self.path}: {key} {token!r} is not in the vocabulary")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return -1 if self._bos is None else self._bos

    @property
    def bos_ids(self) -> list[int]:
        return [] if self._bos is None else [self._bos]

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self.eos_id if self._pad is None else self._pad

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_marker(self, text: str) -> list[int]:
        single = self.token_id(text)
        return [single] if single is not None else self.encode(text)

    def normalize(self, text: str) -> str:
        normalizer = self.tk.normalizer
        return (normalizer.normalize_str(text) if normalizer is not None else text).strip()

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of ``text`` that encode to the unknown token (none for byte-level BPE)."""
        unk_token = getattr(self.tk.model, "unk_token", None)
        unk = self.tk.token_to_id(unk_token) if unk_token else None
        if unk is None:
            return []
        return sorted(c for c in set(text) if not c.isspace() and unk in self.encode(c))

    def token_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)


def load_tokenizer(path: str | Path, added_tokens: list[str] | tuple[str, ...] = (), image_piece: str | None = None,
                   require_image_token: bool = True):
    """A sentencepiece model file, or a tokenizer.json (or a directory holding one). ``image_piece``:
    the tokenizer's own piece for image positions when it is not <image> (Fuyu-8B: |SPEAKER|).
    ``require_image_token``: a VLM's tokenizer must have it (a contrastive model's need not; its
    ``image_token_id`` is then None)."""
    path = Path(path)
    if path.suffix == ".json" or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return HFTokenizer(path, added_tokens, image_piece, require_image_token)
    return SentencePieceTokenizer(path, added_tokens, image_piece, require_image_token)
