"""Caption text: the one normalisation used for training, decoding and scoring, and the SentencePiece vocabulary.

Why one normalisation: BLEU is only comparable when references and hypotheses are tokenised the same way.
We follow the coco-caption convention (PTB-style): lowercase, punctuation removed, whitespace-split words.
The tokenizer is trained on normalised captions, so the model writes normalised text and nothing is lost
between what it generates and what is scored.
"""

from __future__ import annotations

import io
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .errors import CaptionerError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Candidates for a space: any character that is not a letter, digit or whitespace (apostrophes too, as
# coco-caption's PTB tokenizer splits them off and then removes punctuation tokens) and the underscore.
_PUNCTUATION = re.compile(r"[^\w\s]|_", flags=re.UNICODE)


def _space_unless_mark(match: re.Match) -> str:
    """Combining marks (Unicode category M: Devanagari and Tamil vowel signs and viramas, accents NFC cannot
    compose) are parts of their words, though `\\w` does not match them; other candidates become a space."""
    return match.group() if unicodedata.category(match.group())[0] == "M" else " "


def normalize_caption(text: str) -> str:
    """NFC, lowercase, strip punctuation, collapse whitespace: 'A dog, running.' -> 'a dog running'; an 'e' followed
    by a combining acute accent is 'é', as a composed one is, and 'हिन्दी' stays one word."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join(_PUNCTUATION.sub(_space_unless_mark, text).split())


def caption_words(text: str) -> list[str]:
    """The word list BLEU scores: the normalised caption split on whitespace."""
    return normalize_caption(text).split()


class Tokenizer:
    """A SentencePiece model over normalised captions with fixed special ids (pad 0, unk 1, bos 2, eos 3).

    The serialized model bytes are what a checkpoint stores, so a checkpoint alone can caption.
    """

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"SentencePiece model has special ids {ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of the normalised caption, without bos/eos."""
        return self._sp.encode(normalize_caption(text), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; stops at the first eos and skips pad/bos."""
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The SentencePiece piece of each id, e.g. ['▁two', '▁small', '▁st', 'ar']: a piece that starts with
        '▁' begins a word. Used to group subword tokens into the words a person reads."""
        return [self._sp.id_to_piece(int(i)) for i in ids]

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 4000, model_type: str = "unigram") -> "Tokenizer":
        """Train on normalised captions. `vocab_size` is an upper bound: a dataset with few distinct words
        (the synthetic scenes have ~50) gets a smaller vocabulary instead of a SentencePiece error."""
        lines = [normalize_caption(c) for c in captions]
        lines = [line for line in lines if line]
        if not lines:
            raise ValueError("cannot train a vocabulary: no non-empty captions")
        distinct_words = {word for line in lines for word in line.split()}
        if len(distinct_words) + 4 <= vocab_size:
            # Every word fits: a word vocabulary gives the shortest sequences and no subword fragments
            # (a unigram model on ~50 words falls back to characters).
            model_type, vocab_size = "word", len(distinct_words) + 4
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "captions.txt"
            corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
            model = io.BytesIO()
            needed = len(set("".join(lines))) + 4  # every character (the space included) and pad/unk/bos/eos
            if model_type != "word" and vocab_size < needed:  # SentencePiece's refusal is an internal-error traceback
                raise CaptionerError(f"--vocab-size {vocab_size} cannot hold these captions: their {needed - 4} "
                                     f"distinct characters and 4 special tokens need at least {needed}")
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                hard_vocab_limit=False,
                character_coverage=1.0,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                num_threads=1,
                minloglevel=2,
            )
        return cls(model.getvalue())
