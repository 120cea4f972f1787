import pytest
import torch

from captioner.feature_cache import tensors_digest
from captioner.models.bridges import BRIDGES, sincos_2d_positions
from captioner.models.captioner import DECODERS
from captioner.models.encoder import ResNet18Trunk
from captioner.models.lstm import doubly_stochastic_penalty
from conftest import tiny_model


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_for_each_bridge_and_decoder(bridge, batch, decoder):
    model = tiny_model(bridge=bridge, decoder=decoder)
    images = torch.randn(batch, 3, 64, 64)
    memory = model.encode(images)
    assert memory.shape[0] == batch and memory.shape[2] == 32 and memory.shape[1] >= 4
    tokens = torch.randint(4, 40, (batch, 7))
    logits = model(images, tokens)
    assert logits.shape == (batch, 7, 40)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("bridge", BRIDGES)
def test_several_captions_share_one_image_pass(bridge, decoder):
    model = tiny_model(bridge=bridge, decoder=decoder)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(4, 40, (5, 6))
    index = torch.tensor([0, 0, 1, 1, 1])
    logits = model(images, tokens, index)
    one_by_one = torch.cat([model(images[i : i + 1], tokens[j : j + 1]) for j, i in enumerate(index.tolist())])
    torch.testing.assert_close(logits, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("trunk_stages,trainable_layers,grid_convs,bow_weight",
                         [(5, 5, 0, 0.0), (5, 1, 0, 0.0), (5, 2, 0, 0.5), (3, 0, 2, 0.5), (3, 1, 1, 0.0)])
def test_gradients_reach_every_trainable_parameter(bridge, trunk_stages, trainable_layers, grid_convs, bow_weight,
                                                   decoder):
    model = tiny_model(bridge=bridge, trunk_stages=trunk_stages, trainable_layers=trainable_layers,
                       grid_convs=grid_convs, bow_weight=bow_weight, decoder=decoder).train()
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(4, 40, (2, 6))
    out = model.forward_train(images, tokens)
    logits, bow_logits = out.logits, out.bow_logits
    loss = logits.logsumexp(-1).mean()
    if bow_weight:
        loss = loss + bow_logits.logsumexp(-1).mean()
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "model has no trainable parameters"
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient for {no_grad}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith("encoder.prefix") for n in frozen)
    assert (len(frozen) > 0) == (trainable_layers < trunk_stages)


def test_frozen_prefix_keeps_its_batchnorm_statistics_in_train_mode():
    model = tiny_model(trainable_layers=1).train()
    before = {k: v.clone() for k, v in model.encoder.prefix.state_dict().items()}
    model(torch.randn(2, 3, 64, 64), torch.randint(4, 40, (2, 5)))
    after = model.encoder.prefix.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_measures_prefix_statistics():
    model = tiny_model(trainable_layers=1)
    batches = [torch.randn(4, 3, 64, 64) * 3 + 1 for _ in range(2)]
    model.encoder.calibrate_prefix(batches)
    bn1 = model.encoder.prefix[0][1]
    assert not torch.allclose(bn1.running_var, torch.ones_like(bn1.running_var))
    assert not model.encoder.prefix.training


def test_calibrated_statistics_do_not_depend_on_the_thread_count():
    """The feature cache's key holds them: a 1-thread process (torchrun's default) and a 2-thread one must agree,
    or `train` under torchrun misses the cache `extract-features` filled."""
    trunk = ResNet18Trunk("none", trainable_layers=0, stages=3).to(memory_format=torch.channels_last)
    untouched = {name: value.clone() for name, value in trunk.state_dict().items()}
    initial = tensors_digest(trunk.prefix.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 160, 160, generator=generator) * 2 - 1).contiguous(memory_format=torch.channels_last)
               for _ in range(4)]
    threads, measured = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            trunk.load_state_dict(untouched)
            trunk.calibrate_prefix(batches)
            measured.append(tensors_digest(trunk.prefix.state_dict()))
    finally:
        torch.set_num_threads(threads)
    assert measured[0] == measured[1] != initial
    assert all(value.dtype == untouched[name].dtype for name, value in trunk.state_dict().items())


def test_positions_distinguish_every_cell():
    codes = sincos_2d_positions(4, 5, 32)
    assert codes.shape == (20, 32)
    assert torch.cdist(codes, codes).add(torch.eye(20) * 10).min() > 1e-3


def test_lstm_attention_is_a_distribution_over_memory_tokens():
    model = tiny_model(decoder="lstm")
    images = torch.randn(2, 3, 64, 64)
    out = model.forward_train(images, torch.randint(4, 40, (3, 5)), torch.tensor([0, 1, 1]))
    memory_tokens = model.encode(images).shape[1]
    assert out.attention.shape == (3, 5, memory_tokens)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 5))
    assert tiny_model().forward_train(images, torch.randint(4, 40, (2, 5))).attention is None


def test_doubly_stochastic_penalty_hand_computed():
    # Two memory tokens, three steps of which the last is padding (ignored).
    attention = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])  # (C=1, T=3, N=2)
    mask = torch.tensor([[True, True, False]])
    # token 0 receives 1.5, token 1 receives 0.5: (1 - 1.5)^2 + (1 - 0.5)^2 = 0.5
    assert doubly_stochastic_penalty(attention, mask).item() == pytest.approx(0.5)
    # attention spread so each token gets exactly one unit costs nothing
    even = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert doubly_stochastic_penalty(even, torch.ones(1, 2, dtype=torch.bool)).item() == 0.0


def test_grid_summary_reaches_every_memory_token():
    """With the summary on, what the whole grid detected changes every token; without it, a token sees only its
    cell (the conv bridge has no attention to spread it)."""
    images = torch.randn(1, 3, 64, 64)
    for summary in (True, False):
        model = tiny_model(bridge="conv", grid_summary=summary, dropout=0.0)
        grid = model.encoder(images)
        changed = grid.clone()
        changed[..., 0, 0] += 5.0  # one cell responds more strongly
        far_token = -1  # the opposite corner
        moved = (model.memory(changed)[0, far_token] - model.memory(grid)[0, far_token]).abs().max()
        assert (moved > 1e-4) == summary


def test_bag_of_words_head_reads_the_grid_or_the_memory():
    for source, width in (("grid", 48), ("memory", 32)):
        model = tiny_model(bow_input=source, bow_weight=0.5, trunk_stages=3, trainable_layers=0, grid_convs=1,
                           grid_width=48)
        assert model.bow_head.in_features == width
        out = model.forward_train(torch.randn(2, 3, 64, 64), torch.randint(4, 40, (2, 5)))
        assert out.bow_logits.shape == (2, 40)


def _right_padded(captions: list[list[int]]) -> torch.Tensor:
    """bos + caption, PAD after: the teacher-forcing input collation builds."""
    from captioner.text import BOS_ID, PAD_ID

    tokens = torch.full((len(captions), max(map(len, captions)) + 1), PAD_ID)
    for row, ids in enumerate(captions):
        tokens[row, : len(ids) + 1] = torch.tensor([BOS_ID] + ids)
    return tokens


def test_padding_changes_nothing_at_real_positions_and_costs_no_logits():
    """Teacher forcing skips padded positions in its position-wise layers (TokenPacking): each caption's logits and
    each weight's gradient must be what the caption alone, unpadded, gives; padded positions hold zero logits."""
    model = tiny_model()
    images = torch.randn(2, 3, 64, 64)
    captions = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
    index = torch.tensor([0, 0, 1, 1])
    tokens = _right_padded(captions)  # (4, 7)

    logits = model(images, tokens, index)
    model.zero_grad()
    lengths = [len(c) + 1 for c in captions]
    sum(logits[row, :n].logsumexp(-1).sum() for row, n in enumerate(lengths)).backward()
    batched_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    for row, (ids, image) in enumerate(zip(captions, index.tolist())):
        alone = model(images[image : image + 1], _right_padded([ids]))  # (1, n, V): no padding at all
        torch.testing.assert_close(logits[row, : lengths[row]], alone[0], atol=1e-5, rtol=1e-5)
        assert not logits[row, lengths[row] :].any(), "padded positions should get zero logits"
        alone[0].logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(batched_grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_a_pad_token_inside_a_caption_is_still_a_real_position():
    """Only the padding after a caption's last non-PAD token is skipped: a PAD id in the middle (as a scored caption
    may contain) is computed like any token, so the logits match the dense computation of that row alone."""
    from captioner.text import PAD_ID

    model = tiny_model()
    images = torch.randn(1, 3, 64, 64)
    with_inner_pad = _right_padded([[5, PAD_ID, 7]])  # (1, 4)
    batched = model(images.expand(2, -1, -1, -1), torch.cat([_right_padded([[5, PAD_ID, 7, 8, 9]])[:, :4],
                                                             with_inner_pad]))
    alone = model(images, with_inner_pad)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    assert alone[0].abs().sum(-1).gt(0).all(), "every position up to the last real token has logits"


@pytest.mark.parametrize("index", [[0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
def test_captions_read_their_image_keys_in_place_or_copied_with_the_same_result(index):
    """Consecutive, equally many captions per image read the image's cross-attention keys in place (one attention
    call per image); any other layout copies them per caption. Both must equal giving each caption its own
    copy of the memory, attention maps included."""
    from captioner.models.transformer import captions_per_image

    model = tiny_model()
    decoder = model.decoder
    memory = model.encode(torch.randn(2, 3, 64, 64))  # (2, N, D)
    tokens = _right_padded([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    index = torch.tensor(index)
    logits, attention = decoder(memory, tokens, caption_image_index=index, return_attention=True)
    own_logits, own_attention = decoder(memory.index_select(0, index), tokens, return_attention=True)
    torch.testing.assert_close(logits, own_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, own_attention, atol=1e-5, rtol=1e-5)
    assert captions_per_image(index, 2) == (2 if index.tolist() == [0, 0, 1, 1] else 0)
    assert captions_per_image(None, 2) == 1


@pytest.mark.parametrize("index", [[0, 0, 1, 1], [0, 1, 0, 1]])
def test_a_caption_layout_worked_out_beforehand_gives_the_same_logits(index):
    """The training step works out the captions' layout on the host (CaptionLayout) and hands it to forward_train;
    the decoder's own working-out from its inputs must give the same logits and gradients."""
    from captioner.models import transformer
    from captioner.models.transformer import CaptionLayout

    model = tiny_model().train()
    images, index = torch.randn(2, 3, 64, 64), torch.tensor(index)
    tokens = _right_padded([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    layout = CaptionLayout.of(tokens, index, 2)
    assert layout.groups == (2 if index.tolist() == [0, 0, 1, 1] else 0) and layout.rows.numel() == 4 + 3 + 5 + 2  # bos and the words
    results = []
    for given in (None, layout):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        with pytest.MonkeyPatch.context() as patch:
            if given is not None:  # the decoder must use the layout it is given, not work it out again
                for name in ("real_rows", "captions_per_image"):
                    patch.setattr(transformer, name, lambda *args: pytest.fail("layout worked out again"))
            logits = model.forward_train(images, tokens, index, layout=given).logits
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.decoder.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for own, given in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(own, given, atol=0, rtol=0)


@pytest.mark.parametrize("index", [[0, 0, 1, 1], [0, 1, 1, 1]])
def test_packed_logits_are_the_real_positions_logits_and_train_the_same(index):
    """What the training loss reads (forward_train(..., packed_logits=True)): the (R, V) logits of the real
    positions, in the order of `rows`, equal to those positions of the (C, T, V) logits, with the same loss and
    the same gradients; the LSTM, which does not pack, keeps (C, T, V)."""
    from captioner.data.collate import Batch, teacher_forcing_tensors
    from captioner.engine import caption_loss_of

    model = tiny_model().train()
    images, index = torch.randn(2, 3, 64, 64), torch.tensor(index)
    tokens, targets = teacher_forcing_tensors([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], ended=[True] * 4)
    batch = Batch(images, tokens, targets, index, [["x"]] * 2, [0, 1], ["a.jpg", "b.jpg"], [0, 1], 0)
    results = []
    for packed in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        out = model.forward_train(images, tokens, index, packed_logits=packed)
        loss = caption_loss_of(out.logits, batch, 0.1, out.rows)
        loss.backward()
        results.append((out, loss.detach(), [p.grad.clone() for p in model.decoder.parameters()]))
    (full, full_loss, full_grads), (packed, packed_loss, packed_grads) = results
    assert full.rows is None and packed.logits.shape == (packed.rows.numel(), full.logits.shape[-1])
    assert packed.rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16]  # bos and words of each caption
    torch.testing.assert_close(packed.logits, full.logits.flatten(0, 1)[packed.rows])
    torch.testing.assert_close(packed_loss, full_loss)
    for a, b in zip(full_grads, packed_grads):
        torch.testing.assert_close(a, b)
    lstm = tiny_model(decoder="lstm").forward_train(images, tokens, index, packed_logits=True)
    assert lstm.rows is None and lstm.logits.shape[:2] == tokens.shape
