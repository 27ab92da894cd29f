"""Tokenizers behind one small interface: sentencepiece models (the embedded dataset's, Llama/Vicuna's)."""
from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.image_token_id = self.sp.piece_to_id(IMAGE_TOKEN)
        if self.sp.id_to_piece(self.image_token_id) != IMAGE_TOKEN:
            raise ValueError(f"tokenizer {path} has no '{IMAGE_TOKEN}' piece: train it with "
                             f"user_defined_symbols=['{IMAGE_TOKEN}']")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        """The id of a piece that is one token (a user-defined symbol), else None."""
        idx = self.sp.piece_to_id(piece)
        return idx if self.sp.id_to_piece(idx) == piece and idx != self.sp.unk_id() else None


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path)
