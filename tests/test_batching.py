"""Length-bucketed batches, BatchLoader (collation, exact resume, shards), SpecAugment."""

import numpy as np
import pytest
import torch

from sub8.data.batching import Batch, BatchLoader, SpecAugment, make_batches
from sub8.data.features import Cmvn, FeatureSet
from sub8.data.tokenizer import build_tokenizer

WORDS = ["zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def random_lengths(n: int = 300, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(50, 400, size=n).tolist()


def make_feature_set(n: int = 60, seed: int = 0) -> FeatureSet:
    """Random features (no audio needed) and digit texts; utterance i has its index in its first frame."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 120, size=n)
    feats = torch.from_numpy(rng.normal(5.0, 2.0, size=(int(lengths.sum()), 80))).half()
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.from_numpy(lengths).cumsum(0)])
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 6))) for _ in range(n)]
    return FeatureSet(feats, offsets, [f"utt{i}" for i in range(n)], texts, [{"speaker": "s"}] * n)


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return make_feature_set()


@pytest.fixture(scope="module")
def tokenizer(fs):
    return build_tokenizer("char", fs.texts)


@pytest.fixture(scope="module")
def cmvn(fs) -> Cmvn:
    return Cmvn.from_features(fs)


def loader(fs, tokenizer, cmvn, **kwargs) -> BatchLoader:
    return BatchLoader(fs, tokenizer, cmvn, **{"batch_frames": 600, "seed": 0, **kwargs})


def test_batches_respect_budget_and_cover_every_utterance_once():
    lengths = random_lengths()
    for epoch in range(3):
        batches = make_batches(lengths, 2000, seed=1, epoch=epoch, shuffle=True, shortest_first=False)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 2000 for b in batches)


def test_batches_are_filled_not_fragmented():
    lengths = random_lengths()
    batches = make_batches(lengths, 2000, seed=1, epoch=0, shuffle=False, shortest_first=False)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    # Sorted runs waste little on padding, and each batch is cut only when the next utterance would not fit.
    assert padded < 1.1 * sum(lengths)
    for b, nxt in zip(batches, batches[1:]):
        assert (len(b) + 1) * max(lengths[i] for i in b + nxt[:1]) > 2000


def test_batches_deterministic_per_seed_and_differ_between_epochs():
    lengths = random_lengths()
    kwargs = dict(shuffle=True, shortest_first=False)
    epoch0 = make_batches(lengths, 2000, seed=1, epoch=0, **kwargs)
    assert make_batches(lengths, 2000, seed=1, epoch=0, **kwargs) == epoch0
    assert make_batches(lengths, 2000, seed=1, epoch=1, **kwargs) != epoch0
    assert make_batches(lengths, 2000, seed=2, epoch=0, **kwargs) != epoch0
    assert len(make_batches(lengths, 2000, seed=1, epoch=5, **kwargs)) == len(epoch0)


def test_shortest_first_ascends():
    lengths = random_lengths()
    batches = make_batches(lengths, 2000, seed=1, epoch=0, shuffle=True, shortest_first=True)
    for b, nxt in zip(batches, batches[1:]):
        assert max(lengths[i] for i in b) <= min(lengths[i] for i in nxt)


def test_too_long_utterance_gets_its_own_batch_with_a_warning():
    lengths = [100, 5000, 120, 90]
    with pytest.warns(UserWarning, match="1 utterance.*longer than batch_frames=1000"):
        batches = make_batches(lengths, 1000, seed=0, epoch=0, shuffle=True, shortest_first=False)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_loader_collates_padded_normalized_batches(fs, tokenizer, cmvn):
    batch = next(iter(loader(fs, tokenizer, cmvn)))
    assert isinstance(batch, Batch) and batch.feats.dtype == torch.float32
    assert batch.feats.shape == (len(batch), int(batch.feat_lens.max()), 80)
    assert batch.tokens.shape == (len(batch), int(batch.token_lens.max()))
    for row, utt_id in enumerate(batch.utt_ids):
        i = fs.utt_ids.index(utt_id)
        length, n_tokens = int(batch.feat_lens[row]), int(batch.token_lens[row])
        assert length == fs.num_frames(i)
        torch.testing.assert_close(batch.feats[row, :length], cmvn.apply(fs.feature(i)))
        assert (batch.feats[row, length:] == 0).all() and (batch.tokens[row, n_tokens:] == 0).all()
        assert tokenizer.decode(batch.tokens[row, :n_tokens].tolist()) == fs.texts[i]
    moved = batch.to("cpu")
    assert torch.equal(moved.feats, batch.feats) and moved.utt_ids == batch.utt_ids


def utt_ids_of(batches) -> list[list[str]]:
    return [b.utt_ids for b in batches]


def test_loader_epoch_covers_all_and_advances(fs, tokenizer, cmvn):
    data = loader(fs, tokenizer, cmvn)
    epoch0 = utt_ids_of(data)
    assert len(epoch0) == len(data) and sorted(u for b in epoch0 for u in b) == sorted(fs.utt_ids)
    assert data.state_dict() == {"epoch": 1, "position": 0}  # finished: moved on by itself
    epoch1 = utt_ids_of(data)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)
    data.set_epoch(0)
    assert utt_ids_of(data) == epoch0  # a pure function of (seed, epoch)


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(fs, tokenizer, cmvn):
    reference = loader(fs, tokenizer, cmvn)
    reference.set_epoch(2)
    expected = utt_ids_of(reference)

    interrupted = loader(fs, tokenizer, cmvn)
    interrupted.set_epoch(2)
    seen = []
    for batch in interrupted:
        seen.append(batch.utt_ids)
        if len(seen) == 3:
            state = interrupted.state_dict()
            break
    assert state == {"epoch": 2, "position": 3}

    resumed = loader(fs, tokenizer, cmvn)
    resumed.load_state_dict(state)
    assert seen + utt_ids_of(resumed) == expected
    assert resumed.state_dict() == {"epoch": 3, "position": 0}


def test_state_saved_at_last_batch_resumes_into_next_epoch(fs, tokenizer, cmvn):
    data = loader(fs, tokenizer, cmvn)
    for _ in data:
        last_state = data.state_dict()  # as a checkpoint written inside the training step would see it
        if last_state["position"] == len(data):
            break
    resumed = loader(fs, tokenizer, cmvn)
    resumed.load_state_dict(last_state)
    assert utt_ids_of(resumed) == []  # nothing of epoch 0 is left
    next_epoch = loader(fs, tokenizer, cmvn)
    next_epoch.set_epoch(1)
    assert utt_ids_of(resumed) == utt_ids_of(next_epoch)


def test_shortest_first_epochs_then_shuffled(fs, tokenizer, cmvn):
    data = loader(fs, tokenizer, cmvn, shortest_first_epochs=1)
    first = [int(b.feat_lens.max()) for b in data]
    assert first == sorted(first)
    second = [int(b.feat_lens.max()) for b in data]
    assert second != sorted(second)


def test_shards_are_disjoint_and_equal_length(fs, tokenizer, cmvn):
    whole = loader(fs, tokenizer, cmvn)
    shards = [loader(fs, tokenizer, cmvn, num_shards=3, shard=r) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(whole) // 3
    seen = [u for s in shards for b in s for u in b.utt_ids]
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(fs.utt_ids)
    with pytest.raises(ValueError, match="shard 3 outside"):
        loader(fs, tokenizer, cmvn, num_shards=3, shard=3)


def test_untokenizable_text_names_the_utterance(fs, tokenizer, cmvn):
    texts = list(fs.texts)
    texts[3] = "one 2 three"  # "2" is no unit of the character tokenizer
    bad = FeatureSet(fs.feats, fs.offsets, fs.utt_ids, texts, fs.meta)
    with pytest.raises(ValueError, match=r"(?s)1 text\(s\).*utterance 'utt3': 'one 2 three' has units '2'"):
        BatchLoader(bad, tokenizer, cmvn, batch_frames=600, seed=0)


def padded_batch(lengths: list[int], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    feat_lens = torch.tensor(lengths)
    feats = torch.randn(len(lengths), max(lengths), 80) + 3.0  # no exact zeros before masking
    for row, length in enumerate(lengths):
        feats[row, length:] = pad_value
    return feats, feat_lens


def test_specaugment_masks_in_training_only_and_never_padding():
    torch.manual_seed(0)
    feats, feat_lens = padded_batch([400, 250, 120], pad_value=7.0)  # a marked padding value
    augment = SpecAugment()
    masked = augment(feats, feat_lens)
    assert masked.shape == feats.shape
    for row, length in enumerate(feat_lens.tolist()):
        assert (masked[row, length:] == 7.0).all()
    valid = masked[0, :400]
    assert (valid == 0).any()
    masked_bins = (valid == 0).all(dim=0).sum()
    masked_frames = (valid == 0).all(dim=1).sum()
    assert masked_bins <= 2 * 27 and masked_frames <= 2 * 20  # 2 masks of up to 5% of 400 frames
    augment.eval()
    assert augment(feats, feat_lens) is feats


def test_specaugment_reproducible_from_global_rng():
    feats, feat_lens = padded_batch([300, 200])
    augment = SpecAugment()
    torch.manual_seed(5)
    first = augment(feats, feat_lens)
    torch.manual_seed(5)
    assert torch.equal(augment(feats, feat_lens), first)
    assert not torch.equal(augment(feats, feat_lens), first)  # the RNG moved on
