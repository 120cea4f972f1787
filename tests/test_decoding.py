import torch

from captioner.decoding import beam_search, decode, greedy_decode
from captioner.text import BOS_ID, EOS_ID
from conftest import tiny_model


def _memory(model, batch=3, seed=1):
    torch.manual_seed(seed)
    return model.encode(torch.randn(batch, 3, 64, 64))


def test_cached_steps_equal_full_forward():
    model = tiny_model()
    memory = _memory(model, batch=2)
    tokens = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 40, (2, 8))], dim=1)
    full = torch.log_softmax(model.decoder(memory, tokens), dim=-1)  # (B, T, V)
    state = model.init_state(memory)
    for t in range(tokens.shape[1]):
        step, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=0)


def test_beam_size_one_equals_greedy():
    model = tiny_model()
    memory = _memory(model, batch=4)
    greedy = greedy_decode(model, memory, max_len=12)
    beam = beam_search(model, memory, beam_size=1, max_len=12)
    assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]


def test_batched_beam_equals_per_image_beam():
    model = tiny_model()
    memory = _memory(model, batch=4)
    batched = beam_search(model, memory, beam_size=3, max_len=10, num_return=3)
    for i in range(4):
        alone = beam_search(model, memory[i : i + 1], beam_size=3, max_len=10, num_return=3)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert abs(a.score - b.score) < 1e-4


def test_n_best_sorted_and_distinct():
    model = tiny_model()
    for per_image in beam_search(model, _memory(model), beam_size=4, max_len=8, num_return=4):
        scores = [h.score for h in per_image]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in per_image}) == 4


class NeverEnds(torch.nn.Module):
    """A decoder stub whose distribution puts no mass on eos: beams must still return max_len captions."""

    def __init__(self, vocab=12):
        super().__init__()
        self.vocab = vocab
        self.decoder = self
        self.max_len = 50

    def init_state(self, memory, memory_mask=None):
        from captioner.models.state import DecoderState

        return DecoderState(0, {"m": memory[:, 0, :1]})

    def step(self, tokens, state):
        logits = torch.zeros(tokens.shape[0], self.vocab)
        logits[:, EOS_ID] = float("-inf")
        logits[:, 5] = 1.0
        state.position += 1
        return torch.log_softmax(logits, -1), state


def test_model_that_never_emits_eos_still_returns_captions():
    stub = NeverEnds()
    memory = torch.zeros(2, 3, 4)
    for per_image in beam_search(stub, memory, beam_size=3, max_len=7, num_return=2):
        assert all(len(h.tokens) == 7 for h in per_image)
    assert all(len(h.tokens) == 7 for h in greedy_decode(stub, memory, max_len=7))


def test_decode_respects_decoder_max_len():
    model = tiny_model(max_len=6)
    out = decode(model, _memory(model), beam_size=2, max_len=100)
    assert all(len(per_image[0].tokens) <= 6 for per_image in out)
