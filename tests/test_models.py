"""Transducer models: shapes, loss cross-check, batched greedy decoding, streaming, config round trip, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchaudio.functional

from sub8.models import PRESETS, TransducerConfig, build_model, count_parameters
from sub8.models.conformer import attention_mask

ENCODERS = ("lstm", "conformer")


def tiny_config(encoder: str, **overrides) -> TransducerConfig:
    sizes = dict(
        vocab_size=7,
        input_dim=16,
        lstm_layers=2,
        lstm_hidden=16,
        conformer_dim=16,
        conformer_layers=2,
        conformer_heads=2,
        conformer_ffn_dim=32,
        conformer_conv_kernel=3,
        conformer_chunk_frames=2,
        conformer_subsampling_channels=4,
        pred_embed_dim=8,
        pred_hidden=16,
        joiner_dim=16,
        dropout=0.0,
    )
    return TransducerConfig(encoder=encoder, **(sizes | overrides))


def random_batch(config: TransducerConfig, feat_lens: list[int], token_lens: list[int], seed: int = 0):
    """Features padded with garbage (not zeros), so any leak of the padding into valid outputs shows."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(feat_lens), max(feat_lens) + 3, config.input_dim, generator=g)
    tokens = torch.randint(1, config.vocab_size, (len(token_lens), max(token_lens) + 2), generator=g)
    return feats, torch.tensor(feat_lens), tokens, torch.tensor(token_lens)


def model_for(config: TransducerConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config).eval()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("ctc_weight", [0.0, 0.3])
def test_output_shapes_and_lengths(encoder, ctc_weight):
    config = tiny_config(encoder, ctc_weight=ctc_weight)
    model = model_for(config)
    feats, feat_lens, tokens, token_lens = random_batch(config, [37, 40, 9, 1], [5, 3, 2, 1])
    out = model(feats, feat_lens, tokens, token_lens)
    assert out.out_lens.tolist() == [10, 10, 3, 1]  # ceil(T / 4): the last partial group is padded, not dropped
    assert out.logits.shape == (4, 10, 6, config.vocab_size)  # batch padding trimmed to max(out_lens), max(U)+1
    assert out.enc.shape == (4, 10, model.transcriber.output_dim)
    loss, parts = model.loss(feats, feat_lens, tokens, token_lens)
    assert torch.isfinite(loss)
    if ctc_weight:
        assert out.ctc_logits.shape == (4, 10, config.vocab_size)
        assert set(parts) == {"rnnt", "ctc"}
        assert loss.item() == pytest.approx((parts["rnnt"] + ctc_weight * parts["ctc"]).item())
    else:
        assert out.ctc_logits is None and set(parts) == {"rnnt"}
        assert loss.item() == pytest.approx(parts["rnnt"].item())


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_output_does_not_depend_on_batch_padding(encoder):
    config = tiny_config(encoder)
    model = model_for(config)
    feats, feat_lens, _, _ = random_batch(config, [41, 18, 7], [1, 1, 1])
    enc, out_lens = model.encode(feats, feat_lens)
    for b, length in enumerate(feat_lens.tolist()):
        alone, alone_lens = model.encode(feats[b : b + 1, :length], feat_lens[b : b + 1])
        n = int(out_lens[b])
        assert int(alone_lens) == n
        torch.testing.assert_close(enc[b, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_is_streaming_with_its_stated_lookahead(encoder):
    """Changing input frames after t changes no output whose frames lie lookahead or more before t, and does
    change the first output just past that bound (so the stated look-ahead is not an overstatement)."""
    config = tiny_config(encoder)
    model = model_for(config)
    lookahead, reduction = model.lookahead_frames, model.transcriber.time_reduction
    assert lookahead == (3 if encoder == "lstm" else 4 * config.conformer_chunk_frames - 1)
    assert model.lookahead_ms == pytest.approx(10.0 * lookahead)
    t = 30  # (t + 1 - lookahead) is a multiple of 4 for both encoders: output k = that / 4 sits at the bound
    feats = torch.randn(1, 64, config.input_dim)
    perturbed = feats.clone()
    perturbed[:, t + 1 :] += torch.randn_like(perturbed[:, t + 1 :])
    lens = torch.tensor([64])
    enc, _ = model.encode(feats, lens)
    enc_perturbed, _ = model.encode(perturbed, lens)
    first_changed = (t + 1 - lookahead) // reduction
    torch.testing.assert_close(enc[:, :first_changed], enc_perturbed[:, :first_changed], atol=1e-6, rtol=0)
    assert not torch.allclose(enc[:, first_changed], enc_perturbed[:, first_changed], atol=1e-4)


def test_attention_mask_is_chunked_and_hides_padding():
    """Chunks of 2 frames, one chunk of left context, 3 valid frames of 8: valid queries never see padding; padding
    queries see themselves, so that no row is empty (an empty row gives NaN on some attention backends)."""
    mask = attention_mask(torch.tensor([3]), num_frames=8, chunk_frames=2, left_chunks=1)
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0].int().tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]
    unbounded = attention_mask(torch.tensor([6]), num_frames=6, chunk_frames=2, left_chunks=None)
    assert unbounded[0, 0].int().sum().item() == 2 * (2 + 4 + 6)  # every key of its own and all earlier chunks


def reference_rnnt_loss(logits, logit_lens, targets, target_lens):
    """Transducer negative log-likelihood per utterance by the forward algorithm in log space (Graves 2012).

    alpha[t][u] = log P(emitting targets[:u] while reaching frame t); blank (id 0) advances t, a target advances u.
    """
    log_probs = logits.log_softmax(dim=-1)
    losses = []
    for b in range(logits.shape[0]):
        frames, labels = int(logit_lens[b]), int(target_lens[b])
        blank = log_probs[b, :frames, : labels + 1, 0]  # (T, U+1)
        emit = log_probs[b, :frames, torch.arange(labels), targets[b, :labels]]  # (T, U): P(targets[u] | t, u)
        alpha = [[None] * (labels + 1) for _ in range(frames)]
        for t in range(frames):
            for u in range(labels + 1):
                paths = []
                if t == 0 and u == 0:
                    paths.append(logits.new_zeros(()))
                if t > 0:
                    paths.append(alpha[t - 1][u] + blank[t - 1, u])
                if u > 0:
                    paths.append(alpha[t][u - 1] + emit[t, u - 1])
                alpha[t][u] = torch.logsumexp(torch.stack(paths), dim=0)
        losses.append(-(alpha[frames - 1][labels] + blank[frames - 1, labels]))
    return torch.stack(losses)


def test_rnnt_loss_matches_reference_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logit_lens, target_lens = torch.tensor([7, 4, 6, 1]), torch.tensor([3, 4, 0, 1])
    vocab = 5
    logits = torch.randn(4, 7, 5, vocab, generator=g, requires_grad=True)
    targets = torch.randint(1, vocab, (4, 4), generator=g)

    loss = torchaudio.functional.rnnt_loss(
        logits, targets.int(), logit_lens.int(), target_lens.int(), blank=0, reduction="none"
    )
    (grad,) = torch.autograd.grad(loss.sum(), logits)

    logits64 = logits.detach().double().requires_grad_()
    expected = reference_rnnt_loss(logits64, logit_lens, targets, target_lens)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits64)

    torch.testing.assert_close(loss.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=1e-4)


def reference_greedy_decode(model, feats, feat_lens, max_symbols_per_frame):
    """One utterance at a time, one frame at a time."""
    hyps = []
    for b in range(feats.shape[0]):
        enc, out_lens = model.encode(feats[b : b + 1, : int(feat_lens[b])], feat_lens[b : b + 1])
        pred, state = model.predictor.step(torch.zeros(1, dtype=torch.long), None)
        hyp = []
        for t in range(int(out_lens[0])):
            for _ in range(max_symbols_per_frame):
                best = int(model.joiner(enc[0, t], pred[0, 0]).argmax())
                if best == 0:
                    break
                hyp.append(best)
                pred, state = model.predictor.step(torch.tensor([best]), state)
        hyps.append(hyp)
    return hyps


def train_briefly(model, batch, steps: int) -> list[float]:
    """Adam on one fixed batch; returns the loss before each step."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def sharpen_joiner(model, feats, feat_lens) -> None:
    """Large random joiner weights, and blank made the best start-state choice on about half the frames: an untrained
    model otherwise emits blank everywhere or a token at every step, which would not test the bookkeeping."""
    with torch.no_grad():
        for p in model.joiner.parameters():
            p.normal_(0.0, 1.0)
        enc, _ = model.encode(feats, feat_lens)
        pred, _ = model.predictor.step(torch.zeros(len(feats), dtype=torch.long), None)
        logits = model.joiner(enc, pred)  # (B, T', V)
        model.joiner.output.bias[0] += (logits[..., 1:].max(dim=-1).values - logits[..., 0]).median()


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_batched_greedy_decode_matches_one_at_a_time(encoder, kind):
    config = tiny_config(encoder)
    model = model_for(config, seed=1)
    feats, feat_lens, tokens, token_lens = random_batch(config, [45, 30, 12, 3], [6, 5, 3, 1], seed=1)
    if kind == "trained":  # emits mostly blanks and a few varied tokens, as a real model does
        train_briefly(model, (feats, feat_lens, tokens, token_lens), steps=40)
    model.eval().double()  # float64 so that no near-tie can flip an argmax between the two computations
    feats = feats.double()
    if kind == "random":  # emits runs up to max_symbols_per_frame on some frames, nothing on others
        sharpen_joiner(model, feats, feat_lens)
    max_symbols = 3
    hyps = model.greedy_decode(feats, feat_lens, max_symbols_per_frame=max_symbols)
    with torch.no_grad():
        expected = reference_greedy_decode(model, feats, feat_lens, max_symbols)
    assert hyps == expected
    emitted = sum(len(h) for h in hyps)
    assert 0 < emitted < max_symbols * sum(math.ceil(n / 4) for n in feat_lens.tolist())  # not a degenerate model
    assert all(0 not in h for h in hyps)


def test_config_round_trip():
    config = PRESETS["conformer_small"](29)
    config.conformer_left_chunks = 2
    stored = json.loads(json.dumps(config.to_dict()))  # plain types only
    assert TransducerConfig.from_dict(stored) == config
    original, rebuilt = build_model(config), build_model(TransducerConfig.from_dict(stored))
    assert {k: v.shape for k, v in original.state_dict().items()} == {
        k: v.shape for k, v in rebuilt.state_dict().items()
    }


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="lstm_hiden"):
        TransducerConfig.from_dict({"encoder": "lstm", "vocab_size": 5, "lstm_hiden": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        TransducerConfig.from_dict({"encoder": "lstm"})
    with pytest.raises(ValueError, match="encoder"):
        TransducerConfig(encoder="transformer", vocab_size=5)


def test_bad_inputs_are_reported():
    config = tiny_config("lstm")
    model = model_for(config)
    feats, feat_lens, tokens, token_lens = random_batch(config, [12, 8], [2, 2])
    with pytest.raises(ValueError, match="feats"):
        model(feats[..., :10], feat_lens, tokens, token_lens)
    with pytest.raises(ValueError, match="vocabulary"):
        model(feats, feat_lens, tokens + config.vocab_size, token_lens)


def test_presets_build_and_grow():
    sizes = {name: count_parameters(build_model(make(29))) for name, make in PRESETS.items()}
    assert sizes["rnnt_large"] > sizes["rnnt_small"]
    assert sizes["conformer_large"] > sizes["conformer_small"]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_loss_goes_down_on_a_fixed_batch(encoder):
    config = tiny_config(encoder, ctc_weight=0.3)
    model = model_for(config)
    losses = train_briefly(model, random_batch(config, [40, 36, 28, 20], [4, 3, 3, 2]), steps=40)
    assert losses[-1] < 0.3 * losses[0]

