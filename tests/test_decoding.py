import pytest
import torch

from captioner.benchmarks.naive import naive_beam_search
from captioner.decoding import (DecodeOptions, _sampling_filter, ban_repeated_ngrams, beam_search, decode,
                                greedy_decode, length_normalise, sample_decode)
from captioner.models.captioner import DECODERS
from captioner.models.state import DecoderState
from captioner.text import BOS_ID, EOS_ID, PAD_ID
from conftest import tiny_model


def _memory(model, batch=3, seed=1):
    torch.manual_seed(seed)
    return model.encode(torch.randn(batch, 3, 64, 64))


@pytest.mark.parametrize("decoder", DECODERS)
def test_cached_steps_equal_full_forward(decoder):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=2)
    tokens = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 40, (2, 8))], dim=1)
    full = torch.log_softmax(model.decoder(memory, tokens), dim=-1)  # (B, T, V)
    state = model.init_state(memory)
    for t in range(tokens.shape[1]):
        step, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_size_one_equals_greedy(decoder):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=4)
    greedy = greedy_decode(model, memory, max_len=12)
    beam = beam_search(model, memory, beam_size=1, max_len=12)
    assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]


class PeakedDecoder(torch.nn.Module):
    """Wraps a real decoder and sharpens its distribution by a per-image factor taken from the memory, so a
    batch mixes images whose beams finish at different steps (easy) with ones that run long (hard)."""

    def __init__(self, model, sharpness):
        super().__init__()
        self.inner, self.sharpness = model, sharpness
        self.max_caption_len = model.max_caption_len

    def init_state(self, memory, memory_mask=None):
        state = self.inner.init_state(memory, memory_mask)
        state.tensors["sharpness"] = self.sharpness.to(memory.device)[: memory.shape[0], None]
        return state

    def step(self, tokens, state):
        log_probs, state = self.inner.step(tokens, state)
        logits = log_probs * state.tensors["sharpness"]
        logits[:, EOS_ID] += 2.0 * (state.position - 1)  # eos grows likelier with length: beams end at various steps
        return torch.log_softmax(logits, dim=-1), state


@pytest.mark.parametrize("decoder", DECODERS)
def test_batched_beam_equals_per_image_beam_on_mixed_difficulty(decoder):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=4)
    sharpness = torch.tensor([8.0, 0.5, 3.0, 1.0])
    batched = beam_search(PeakedDecoder(model, sharpness), memory, beam_size=3, max_len=10, num_return=3)
    lengths = {len(per_image[0].tokens) for per_image in batched}
    assert len(lengths) > 1, "the batch should mix captions of different lengths"
    for i in range(4):
        alone = beam_search(PeakedDecoder(model, sharpness[i : i + 1]), memory[i : i + 1], beam_size=3, max_len=10,
                            num_return=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert a.score == pytest.approx(b.score, abs=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_batched_cached_beam_equals_naive_per_image_full_recompute(decoder, length_penalty):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=3)
    batched = beam_search(model, memory, beam_size=3, max_len=9, length_penalty=length_penalty, num_return=3)
    for i in range(3):
        naive = naive_beam_search(model, memory[i : i + 1], beam_size=3, max_len=9, length_penalty=length_penalty,
                                  num_return=3)
        assert [h.tokens for h in naive] == [h.tokens for h in batched[i]]
        assert [h.score for h in naive] == pytest.approx([h.score for h in batched[i]], abs=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_n_best_sorted_and_distinct(decoder):
    model = tiny_model(decoder=decoder)
    for per_image in beam_search(model, _memory(model), beam_size=4, max_len=8, num_return=4):
        scores = [h.score for h in per_image]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in per_image}) == 4


class ScriptedDecoder(torch.nn.Module):
    """A decoder stub with a fixed next-token distribution `logits_fn(position) -> (V,)` for every row."""

    def __init__(self, logits_fn, vocab=12):
        super().__init__()
        self.logits_fn, self.vocab, self.max_caption_len = logits_fn, vocab, 50

    def init_state(self, memory, memory_mask=None):
        return DecoderState(0, {"m": memory[:, 0, :1]})

    def step(self, tokens, state):
        logits = self.logits_fn(state.position).expand(tokens.shape[0], -1).clone()
        state.position += 1
        return torch.log_softmax(logits, -1), state


def _never_ends(position):
    logits = torch.zeros(12)
    logits[EOS_ID] = float("-inf")
    logits[5] = 1.0
    return logits


def test_model_that_never_emits_eos_still_returns_captions():
    stub = ScriptedDecoder(_never_ends)
    memory = torch.zeros(2, 3, 4)
    for per_image in beam_search(stub, memory, beam_size=3, max_len=7, num_return=2):
        assert all(len(h.tokens) == 7 for h in per_image)
    assert all(len(h.tokens) == 7 for h in greedy_decode(stub, memory, max_len=7))
    for per_image in sample_decode(stub, memory, DecodeOptions(sample=True, max_len=7, num_return=2, seed=0)):
        assert all(len(h.tokens) == 7 for h in per_image)


def test_decode_respects_decoder_max_len():
    model = tiny_model(max_len=6)
    out = decode(model, _memory(model), beam_size=2, max_len=100)
    assert all(len(per_image[0].tokens) <= 6 for per_image in out)


def test_pad_and_bos_are_never_generated_and_captions_are_never_empty():
    def wants_pad_bos_eos(position):
        logits = torch.full((12,), -5.0)
        logits[[PAD_ID, BOS_ID, EOS_ID]] = 5.0
        return logits

    stub = ScriptedDecoder(wants_pad_bos_eos)
    memory = torch.zeros(2, 3, 4)
    for options in (DecodeOptions(), DecodeOptions(beam_size=3, num_return=3), DecodeOptions(sample=True, seed=1)):
        for per_image in decode(stub, memory, options):
            for h in per_image:
                assert len(h.tokens) >= 1 and not {PAD_ID, BOS_ID} & set(h.tokens)


# --- no-repeat n-gram -----------------------------------------------------------------------------------------

def test_ban_repeated_ngrams_hand_case():
    history = torch.tensor([[7, 8, 9, 7, 8], [7, 8, 9, 7, 5]])  # row 0 ends in "7 8": "9" would repeat "7 8 9"
    log_probs = torch.zeros(2, 12)
    ban_repeated_ngrams(log_probs, history, 3)
    assert log_probs[0].isinf().nonzero().flatten().tolist() == [9]
    assert not log_probs[1].isinf().any()  # "7 5" never occurred before
    log_probs = torch.zeros(2, 12)
    ban_repeated_ngrams(log_probs, history, 1)  # unigrams: every generated token is banned
    assert log_probs[0].isinf().nonzero().flatten().tolist() == [7, 8, 9]


def _repeats(position):
    """Prefers the cycle 5 6 5 6 ... forever, with 7 and 8 as runners-up and a little eos."""
    logits = torch.zeros(12)
    logits[5 if position % 2 == 0 else 6] = 4.0
    logits[7], logits[8] = 2.0, 1.0
    return logits


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("options", [DecodeOptions(max_len=12), DecodeOptions(beam_size=3, num_return=3, max_len=12),
                                     DecodeOptions(sample=True, num_return=4, seed=0, max_len=12)])
@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_holds_for_every_decoding_mode(options, n):
    stub = ScriptedDecoder(_repeats)
    memory = torch.zeros(2, 3, 4)
    unrestricted = decode(stub, memory, options)
    assert any(len(set(_ngrams(h.tokens, n))) < len(_ngrams(h.tokens, n)) for p in unrestricted for h in p)
    for per_image in decode(stub, memory, options, no_repeat_ngram=n):
        for h in per_image:
            assert len(set(_ngrams(h.tokens, n))) == len(_ngrams(h.tokens, n)), h.tokens


# --- sampling -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_with_a_seed_is_reproducible(decoder):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=3)
    options = DecodeOptions(sample=True, num_return=3, seed=123, temperature=1.5, top_p=0.95, max_len=10)
    first, again = sample_decode(model, memory, options), sample_decode(model, memory, options)
    assert [[h.tokens for h in p] for p in first] == [[h.tokens for h in p] for p in again]
    other = sample_decode(model, memory, DecodeOptions(sample=True, num_return=3, seed=7, temperature=1.5, max_len=10))
    assert [[h.tokens for h in p] for p in first] != [[h.tokens for h in p] for p in other]
    for per_image in first:
        scores = [h.score for h in per_image]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_from_the_top_token_only_is_greedy(decoder):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=4)
    greedy = [h.tokens for h in greedy_decode(model, memory, max_len=10)]
    for filters in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}):
        sampled = sample_decode(model, memory, DecodeOptions(sample=True, seed=3, max_len=10, **filters))
        assert [p[0].tokens for p in sampled] == greedy, filters


def test_sampling_filters_keep_the_right_tokens():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = _sampling_filter(log_probs, 1.0, 2, 1.0)
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = _sampling_filter(log_probs, 1.0, 0, 0.8)  # 0.5 + 0.3 reaches 0.8: two tokens stay
    assert (nucleus > 0).tolist() == [[True, True, False, False]]
    hot = _sampling_filter(log_probs, 2.0, 0, 1.0)  # temperature 2: p ** (1/2), renormalised
    expected = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).sqrt()
    torch.testing.assert_close(hot, expected / expected.sum())


def test_samples_follow_the_model_distribution():
    probs = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.1, 0.4])  # eos (3) half the time, else token 4 or 5

    def first_step(position):
        return probs.clamp(min=1e-12).log() if position == 0 else torch.tensor([0, 0, 0, 1.0, 0, 0]).log()

    stub = ScriptedDecoder(first_step, vocab=6)
    out = sample_decode(stub, torch.zeros(1, 1, 1), DecodeOptions(sample=True, num_return=4000, seed=0, min_len=0))
    first = [h.tokens[0] if h.tokens else EOS_ID for h in out[0]]
    for token, p in ((EOS_ID, 0.5), (4, 0.1), (5, 0.4)):
        assert first.count(token) / len(first) == pytest.approx(p, abs=0.03)


# --- options and scores ---------------------------------------------------------------------------------------

def test_average_length_norm_ranks_by_mean_log_prob():
    scores = length_normalise(torch.tensor([-6.0, -4.0]), torch.tensor([6, 2]), alpha=0.0, norm="average")
    assert scores.tolist() == [-1.0, -2.0]
    gnmt = length_normalise(torch.tensor([-6.0]), torch.tensor([7]), alpha=1.0)
    assert gnmt.item() == pytest.approx(-6.0 / 2.0)


@pytest.mark.parametrize("bad", [dict(beam_size=0), dict(num_return=3, beam_size=2), dict(sample=True, beam_size=3),
                                 dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(length_norm="x"),
                                 dict(no_repeat_ngram=-1), dict(length_penalty=-1.0),
                                 dict(length_penalty=float("nan"))])
def test_bad_decoding_options_are_refused(bad):
    with pytest.raises(ValueError):
        DecodeOptions(**bad)


@pytest.mark.parametrize("decoder", DECODERS)
def test_reordering_beams_within_images_equals_a_full_select(decoder):
    model = tiny_model(decoder=decoder)
    state = model.init_state(_memory(model, batch=2)).select(torch.tensor([0, 0, 0, 1, 1, 1]))
    state = model.step(torch.tensor([4, 5, 6, 7, 8, 9]), state)[1]
    within_images = torch.tensor([2, 2, 0, 4, 3, 3])
    fast, full = state.reorder_beams(within_images), state.select(within_images)
    assert state.per_image and set(fast.tensors) == set(full.tensors)
    for key in full.tensors:
        torch.testing.assert_close(fast.tensors[key], full.tensors[key], rtol=0, atol=0)


def test_sampling_a_row_with_every_token_forbidden_ends_the_caption():
    log_probs = torch.full((2, 6), float("-inf"))
    log_probs[1, 4] = 0.0
    probs = _sampling_filter(log_probs, 1.0, 0, 0.9)
    assert probs[0].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0] and probs[1, 4] == 1.0
