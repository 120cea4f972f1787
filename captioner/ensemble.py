"""Several checkpoints that caption as one model: at every decoding step the next-token distribution is the mean
of the members' distributions.

Why: models trained from different seeds (or with different settings) make partly independent mistakes, and
averaging their probabilities keeps what they agree on. It is the usual way to trade decoding time for caption
quality once single models stop improving, and `evaluate`, `caption`, `serve` and `bleu-bench` take several
checkpoints for it (`--checkpoint A --checkpoint B`, bleu-bench's entry `A+B`).

An Ensemble offers what decoding asks of a Captioner (`encode`, `init_state`, `step`, `max_caption_len`), so
greedy decoding, sampling and beam search run on it unchanged. The members must share the vocabulary (their
token ids must mean the same pieces) and the image size (they read the same pixels); their architectures may
differ, a Transformer beside an LSTM, other widths or grids.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model
from .config import RunConfig
from .errors import CaptionerError
from .models.captioner import Captioner
from .models.state import DecoderState
from .text import Tokenizer


class Ensemble(nn.Module):
    """Captioners decoding together. Their memories travel through decoding as one (B, F) tensor: each member's
    (B, N_i, D_i) flattened and concatenated, so code that slices, batches or moves memory rows needs no change.
    Each member's decoder state lives in the ensemble's state under the prefix "<member index>."."""

    def __init__(self, members: list[Captioner], image_size: int):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.max_caption_len = min(member.max_caption_len for member in members)
        self.memory_shapes = self._memory_shapes(image_size)  # per member (N_i, D_i)

    @torch.inference_mode()
    def _memory_shapes(self, image_size: int) -> list[tuple[int, int]]:
        """Each member's memory shape (tokens, width) for images of `image_size`, from one blank image."""
        shapes = []
        for member in self.members:
            device = next(member.parameters()).device
            blank = torch.zeros(1, 3, image_size, image_size, device=device)
            was_training = member.training
            memory = member.eval().encode(blank)  # (1, N_i, D_i)
            member.train(was_training)
            shapes.append((memory.shape[1], memory.shape[2]))
        return shapes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) normalised -> (B, sum of N_i * D_i): every member's memory tokens, flattened."""
        return torch.cat([member.encode(images).flatten(1) for member in self.members], dim=1)

    def member_memories(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """(B, F) from `encode` -> per member its memory (B, N_i, D_i)."""
        sizes = [n * d for n, d in self.memory_shapes]
        if memory.shape[1] != sum(sizes):
            raise ValueError(f"ensemble memory has {memory.shape[1]} values per image, its members make {sum(sizes)}")
        parts = memory.split(sizes, dim=1)
        return [part.reshape(part.shape[0], n, d) for part, (n, d) in zip(parts, self.memory_shapes)]

    def init_state(self, memory: torch.Tensor, memory_mask=None, attention_layer: int | None = None) -> DecoderState:
        """One state holding every member's. `memory_mask` and `attention_layer` are refused: the members' memory
        tokens differ, so neither a mask nor an attention map means one thing across them."""
        if memory_mask is not None or attention_layer is not None:
            raise ValueError("an ensemble decodes without memory masks or attention maps")
        tensors, per_image = {}, set()
        for i, part in enumerate(self.member_memories(memory)):
            state = self.members[i].init_state(part)
            tensors.update({f"{i}.{key}": value for key, value in state.tensors.items()})
            per_image.update(f"{i}.{key}" for key in state.per_image)
        return DecoderState(position=0, tensors=tensors, per_image=frozenset(per_image))

    def _member_state(self, state: DecoderState, i: int) -> DecoderState:
        prefix = f"{i}."
        tensors = {key[len(prefix):]: value for key, value in state.tensors.items() if key.startswith(prefix)}
        per_image = frozenset(key[len(prefix):] for key in state.per_image if key.startswith(prefix))
        return DecoderState(position=state.position, tensors=tensors, per_image=per_image)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """tokens (R,) -> log of the members' mean next-token probability (R, V), and the advanced state."""
        log_probs, tensors = [], {}
        for i, member in enumerate(self.members):
            member_log_probs, member_state = member.step(tokens, self._member_state(state, i))
            log_probs.append(member_log_probs.float())  # (R, V)
            tensors.update({f"{i}.{key}": value for key, value in member_state.tensors.items()})
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))  # (R, V)
        return mean, DecoderState(position=state.position + 1, tensors=tensors, per_image=state.per_image)


def _same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    return a.vocab_size == b.vocab_size and a.pieces(range(a.vocab_size)) == b.pieces(range(b.vocab_size))


def load_models(paths: list[str | Path], device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer, RunConfig]:
    """One checkpoint -> (its Captioner, tokenizer, run config), as `load_model`; several -> (their Ensemble, the
    shared tokenizer, the first one's run config). Checkpoints that cannot decode together are an error that
    names the one that differs from the first and how."""
    if not paths:
        raise CaptionerError("give at least one checkpoint")
    first, tokenizer, cfg = load_model(paths[0], device)
    if len(paths) == 1:
        return first, tokenizer, cfg
    members = [first]
    for path in paths[1:]:
        model, other_tokenizer, other_cfg = load_model(path, device)
        if not _same_vocabulary(tokenizer, other_tokenizer):
            raise CaptionerError(f"ensemble: {path} has another vocabulary than {paths[0]} "
                                 f"({other_tokenizer.vocab_size} and {tokenizer.vocab_size} pieces, or the same "
                                 "number spelled differently); members must share their tokenizer, e.g. runs "
                                 "trained on the same captions")
        if other_cfg.data.image_size != cfg.data.image_size:
            raise CaptionerError(f"ensemble: {path} reads {other_cfg.data.image_size} px images and {paths[0]} "
                                 f"{cfg.data.image_size} px; members must share the image size")
        members.append(model)
    return Ensemble(members, cfg.data.image_size).eval(), tokenizer, cfg
