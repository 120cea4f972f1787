"""Where the decoder looked: attention captured during decoding, its figures, and `caption --attention`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import visualize
from captioner.cli import main
from captioner.decoding import DecodeOptions, beam_search, decode
from captioner.models.captioner import DECODERS
from captioner.text import BOS_ID
from conftest import tiny_model


def _memory(model, batch=3, seed=1):
    torch.manual_seed(seed)
    return model.encode(torch.randn(batch, 3, 64, 64))


def _teacher_forced_attention(model, memory, tokens, layer):
    """Attention of the full (non-incremental) forward pass over bos + tokens: (B, T, N)."""
    tokens_in = torch.cat([torch.full((tokens.shape[0], 1), BOS_ID), tokens], dim=1)
    if model.cfg.decoder == "transformer":
        return model.decoder(memory, tokens_in, return_attention=True, attention_layer=layer)[1]
    return model.decoder(memory, tokens_in, return_attention=True)[1]


@pytest.mark.parametrize("decoder,layer", [("transformer", 0), ("transformer", -1), ("lstm", -1)])
def test_step_attention_is_a_distribution_equal_to_the_full_forward_pass(decoder, layer):
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=2)  # (2, N, D)
    tokens = torch.randint(4, 40, (2, 6))
    full = _teacher_forced_attention(model, memory, tokens, layer)  # (2, 7, N)
    assert full.shape == (2, 7, memory.shape[1])
    state = model.init_state(memory, attention_layer=layer)
    steps = torch.cat([torch.full((2, 1), BOS_ID), tokens], dim=1)
    for t in range(steps.shape[1]):
        _, state = model.step(steps[:, t], state)
        looked = state.tensors["attention"]  # (2, N)
        torch.testing.assert_close(looked.sum(-1), torch.ones(2))
        assert (looked >= 0).all()
        torch.testing.assert_close(looked, full[:, t], atol=1e-5, rtol=0)


def test_transformer_layers_attend_differently_and_bad_layers_are_refused():
    model = tiny_model(decoder_layers=2)
    memory = _memory(model, batch=1)
    tokens = torch.randint(4, 40, (1, 5))
    first, last = (_teacher_forced_attention(model, memory, tokens, layer) for layer in (0, 1))
    assert not torch.allclose(first, last)  # the layer argument is honoured
    torch.testing.assert_close(_teacher_forced_attention(model, memory, tokens, -1), last)
    with pytest.raises(ValueError, match="2 layers"):
        model.init_state(memory, attention_layer=2)
    with pytest.raises(ValueError, match="one soft attention"):
        tiny_model(decoder="lstm").init_state(memory, attention_layer=1)


def test_ordinary_decoding_keeps_no_attention():
    model = tiny_model()
    state = model.init_state(_memory(model, batch=1))
    _, state = model.step(torch.tensor([BOS_ID]), state)
    assert "attention" not in state.tensors
    assert all(h.attention is None for per_image in decode(model, _memory(model)) for h in per_image)


def test_forward_train_returns_attention_when_asked_and_only_the_lstm_regularises_it():
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(4, 40, (3, 5))
    index = torch.tensor([0, 1, 1])
    transformer = tiny_model()
    assert not transformer.regularises_attention
    assert transformer.forward_train(images, tokens, index).attention is None
    out = transformer.forward_train(images, tokens, index, return_attention=True)
    assert out.attention.shape == (3, 5, transformer.encode(images).shape[1])
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 5))
    lstm = tiny_model(decoder="lstm")
    assert lstm.regularises_attention and lstm.forward_train(images, tokens, index).attention is not None
    assert tiny_model(decoder="lstm", attention_reg=0.0).forward_train(images, tokens, index).attention is None


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoded_attention_matches_the_decoded_tokens(decoder, beam_size):
    """Each hypothesis' attention equals what a teacher-forced pass over its own tokens gives: for beam search
    this checks that a beam's attention history follows the beam through every reordering."""
    model = tiny_model(decoder=decoder)
    memory = _memory(model, batch=3)
    options = DecodeOptions(beam_size=beam_size, num_return=beam_size, max_len=10)
    plain = decode(model, memory, options)
    kept = decode(model, memory, options, attention_layer=-1)
    for i, (plain_image, kept_image) in enumerate(zip(plain, kept)):
        # watching changes nothing: same captions, bit for bit the same scores
        assert [(h.tokens, h.score) for h in plain_image] == [(h.tokens, h.score) for h in kept_image]
        for h in kept_image:
            assert h.attention.shape == (len(h.tokens), memory.shape[1])
            expected = _teacher_forced_attention(model, memory[i : i + 1], torch.tensor([h.tokens]), -1)[0]
            torch.testing.assert_close(h.attention, expected[: len(h.tokens)], atol=1e-5, rtol=0)


def test_beam_search_attention_argument_matches_decode():
    model = tiny_model()
    memory = _memory(model, batch=2)
    direct = beam_search(model, memory, beam_size=3, max_len=8, attention_layer=0)
    via_options = decode(model, memory, DecodeOptions(beam_size=3, max_len=8, attention_layer=0))
    for a, b in zip(direct, via_options):
        torch.testing.assert_close(a[0].attention, b[0].attention)


def test_word_attention_groups_subword_pieces():
    attention = torch.softmax(torch.randn(4, 9), dim=-1)  # 4 tokens over a 3x3 grid
    words = visualize.word_attention(["\u2581two", "\u2581st", "ar", "s"], attention)
    assert words.words == ["two", "stars"]
    assert words.maps.shape == (2, 3, 3)
    np.testing.assert_allclose(words.maps[1].ravel(), attention[1:].mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(words.maps.sum(axis=(1, 2)), [1.0, 1.0], rtol=1e-5)
    with pytest.raises(ValueError, match="square grid"):
        visualize.word_attention(["\u2581a"], torch.ones(1, 6) / 6)


def test_upsample_places_each_cell_where_the_trunk_centres_it():
    """A ResNet cell i is centred on input pixel 32 * i: on a 128px image, 4 cells at 0, 32, 64, 96."""
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[1, 2] = 1.0
    heat = visualize.upsample(grid, 128, 128)
    assert heat.shape == (128, 128)
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(row - 32) <= 1 and abs(col - 64) <= 1  # not at the block's middle (48, 80)
    assert heat[0, 0] == 0.0 and heat.max() == pytest.approx(1.0, abs=0.04)  # pixel centres miss it by half a pixel
    last = np.zeros((4, 4), dtype=np.float32)
    last[3, 3] = 1.0
    assert (visualize.upsample(last, 128, 128)[100:, 100:] == 1.0).all()  # beyond the last centre: held
    flat = visualize.upsample(np.full((4, 4), 1 / 16, dtype=np.float32), 50, 30)
    np.testing.assert_allclose(flat, 1 / 16, rtol=1e-5)


def test_highlight_keeps_the_peak_and_darkens_the_rest():
    pixels = np.full((2, 2, 3), 200, dtype=np.uint8)
    lit = visualize.highlight(pixels, np.array([[0.0, 1.0], [0.5, 0.0]]), floor=0.2)
    assert lit[0, 1].tolist() == [200, 200, 200] and lit[0, 0].tolist() == [40, 40, 40]
    assert lit[1, 0, 0] == 120


def test_attention_figure_has_a_panel_per_word():
    image = Image.new("RGB", (320, 240), (255, 255, 0))
    words = visualize.WordAttention(["a", "red", "star"], np.full((3, 4, 4), 1 / 16, dtype=np.float32))
    fig = visualize.attention_figure(image, "a red star", words)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["image", "a  (6%)", "red  (6%)", "star  (6%)"]
    png = visualize.figure_png(fig)
    assert png.startswith(b"\x89PNG") and len(png) < 1_000_000


def test_caption_attention_writes_one_png_per_image(trained_run, synthetic_dataset, tmp_path, capsys):
    sources = sorted(synthetic_dataset.val_images.iterdir())[:3]
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    for p in sources:
        (folders[0] / p.name).write_bytes(p.read_bytes())
    (folders[1] / sources[0].name).write_bytes(sources[1].read_bytes())  # same file name, different image
    out = tmp_path / "maps"
    code = main(["caption", "--checkpoint", str(trained_run / "best.pt"), str(folders[0]), str(folders[1]),
                 "--attention", str(out), "--beam-size", "2", "--json", "--device", "cpu"])
    assert code == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = sorted(out.iterdir())
    assert len(entries) == 4 and len(figures) == 4
    assert sorted(e["attention"] for e in entries) == [str(f) for f in figures]
    for entry in entries:
        with Image.open(entry["attention"]) as figure:
            assert figure.format == "PNG"
            # one panel per word plus the image: a caption of up to 4 words fits one row of 5 panels
            words = len(entry["captions"][0]["caption"].split())
            assert figure.height > (100 if words < 5 else 200)


def test_caption_attention_layer_out_of_range_is_a_usage_error(trained_run, synthetic_dataset, tmp_path, capsys):
    image = str(sorted(synthetic_dataset.val_images.iterdir())[0])
    code = main(["caption", "--checkpoint", str(trained_run / "best.pt"), image, "--attention", str(tmp_path),
                 "--attention-layer", "5", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--attention-layer 5" in err and "Traceback" not in err


def test_pooled_grid_cells_are_drawn_a_quarter_cell_on():
    """Layer2 cells (stride 8) are centred at 8j; max-pooled 2x2 at 128px, pooled cell i is centred at
    16i + 4, a quarter cell past 16i. The model says so, and upsample puts the peak there."""
    model = tiny_model(trunk_stages=3, grid_convs=1, grid_width=8, grid_pool=2)
    assert model.token_centres(128) == [16 * i + 4 for i in range(8)]
    assert tiny_model(trunk_stages=5, grid_convs=0).token_centres(128) == [0, 32, 64, 96]  # whole trunk
    grid = np.zeros((8, 8), dtype=np.float32)
    grid[2, 5] = 1.0
    placement = visualize.cell_placement(model, 128)
    row, col = np.unravel_index(visualize.upsample(grid, 128, 128, placement).argmax(), (128, 128))
    assert abs(row - 36) <= 1 and abs(col - 84) <= 1


def test_cells_that_reach_past_the_image_are_drawn_where_the_pool_centres_them():
    """160px through layer2 is a 20-cell side; the default 3x3 max pool in ceil mode makes 6 cells of 24 pixels
    and a 7th from the last two (centred at 144 and 152), 7 cells that span 168 pixels of 160. Pooled cell 5
    merges layer2 cells 15..17 (at 120, 128, 136): centred at 128, not where 7 cells tiling 160 pixels put it
    (160 / 7 * (5 + 1/3) = 122)."""
    model = tiny_model()  # the default encoder
    with torch.no_grad():
        assert model.encoder(torch.zeros(1, 3, 160, 160)).shape[-2:] == (7, 7)
    assert model.token_centres(160) == [8, 32, 56, 80, 104, 128, 148]
    for cell, pixel in [(5, 128), (6, 148)]:
        grid = np.zeros((7, 7), dtype=np.float32)
        grid[cell, cell] = 1.0
        heat = visualize.upsample(grid, 160, 160, visualize.cell_placement(model, 160))
        row, col = np.unravel_index(heat.argmax(), heat.shape)
        assert abs(row - pixel) <= 1 and abs(col - pixel) <= 1


def test_pool_bridge_tokens_are_drawn_at_their_pooling_windows():
    """The pool bridge averages the 7-cell grid into 4 overlapping windows (cells 0-1, 1-3, 3-5, 5-6), so its
    4x4 maps sit at those windows' centres, not at the encoder's first four cells."""
    model = tiny_model(bridge="pool")
    assert model.token_centres(160) == [20, 56, 104, 138]
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 160, 160)).shape[1] == 16
    placement = visualize.cell_placement(model, 160)
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[3, 3] = 1.0
    row, col = np.unravel_index(visualize.upsample(grid, 160, 160, placement).argmax(), (160, 160))
    assert row >= 137 and col >= 137
    with pytest.raises(ValueError, match="4 cell centres per side, the attention grid 7"):
        visualize.upsample(np.zeros((7, 7), dtype=np.float32), 160, 160, placement)
