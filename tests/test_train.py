"""The training loop: exact resume, non-finite losses, checkpoints, hooks, LR schedule, data parallel, and a tiny
real transducer that learns a handful of synthesized utterances."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sub8.data.audio import audio_info
from sub8.data.batching import BatchLoader
from sub8.data.features import Cmvn, FeatureSet, compute_split_features
from sub8.data.manifest import Utterance, write_manifest
from sub8.data.tokenizer import build_tokenizer
from sub8.evaluate import evaluate
from sub8.io import load_checkpoint
from sub8.models import TransducerConfig, build_model
from sub8.profiles import FeatureConfig
from sub8.train import Hooks, NonFiniteLossError, TrainConfig, lr_factor, train

TEXTS = ["one two", "three", "two one three", "four", "one", "three four", "two", "four one", "one three",
         "two four", "three two", "four four"]


def make_feature_set(seed: int = 0) -> FeatureSet:
    """Random 80-dim 'features' of 20..39 frames for each of TEXTS (no audio needed)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 40, (len(TEXTS),), generator=g)
    return FeatureSet(
        feats=torch.randn(int(lengths.sum()), 80, generator=g).half(),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        utt_ids=[f"u{i:02d}" for i in range(len(TEXTS))],
        texts=list(TEXTS),
        meta=[{"speaker": None} for _ in TEXTS],
    )


def make_loader(num_shards: int = 1, shard: int = 0) -> BatchLoader:
    """Four batches an epoch (of ~3 utterances), reshuffled every epoch."""
    fs = make_feature_set()
    return BatchLoader(fs, build_tokenizer("char", TEXTS), Cmvn.from_features(fs), batch_frames=120, seed=0,
                       num_shards=num_shards, shard=shard)


@dataclass
class TinyConfig:
    vocab_size: int
    hidden: int = 16
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class TinyModel(nn.Module):
    """A stand-in with the transducer's ``loss`` interface: classifies the first token from mean-pooled frames.
    Its dropout draws from torch's RNG, so resume equality also covers the RNG state."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = TinyConfig(vocab_size=build_tokenizer("char", TEXTS).vocab_size)
        self.proj = nn.Linear(80, self.config.hidden)
        self.drop = nn.Dropout(self.config.dropout)
        self.out = nn.Linear(self.config.hidden, self.config.vocab_size)

    def loss(self, feats, feat_lens, tokens, token_lens):
        h = self.drop(torch.tanh(self.proj(feats)))  # (B, T, H)
        valid = (torch.arange(feats.shape[1])[None, :] < feat_lens[:, None]).unsqueeze(-1)
        logits = self.out((h * valid).sum(1) / feat_lens[:, None])  # (B, V)
        ce = F.cross_entropy(logits, tokens[:, 0])
        l2 = 1e-3 * logits.square().mean()
        return ce + l2, {"ce": ce, "l2": l2}


class Interrupted(Exception):
    """Stands in for a killed process."""


class ProbeHooks(Hooks):
    """A stateful hook whose extra loss draws from Python's ``random`` (so its state must be restored too);
    ``kill_at`` interrupts the run before that step, ``poison`` = (step, kind) makes that step's loss or gradient
    non-finite."""

    def __init__(self, kill_at: int | None = None, poison: tuple[int, str] | None = None):
        self.calls = 0
        self.kill_at = kill_at
        self.poison = poison

    def before_step(self, step, model):
        if step == self.kill_at:
            raise Interrupted(step)

    def extra_loss(self, step, model):
        self.calls += 1
        weight = model.proj.weight
        if self.poison == (step, "loss"):
            return torch.tensor(float("nan"))
        if self.poison == (step, "grad"):  # d/dw sqrt(0 * w) = inf * 0 = nan; the loss itself stays finite
            return torch.sqrt(0.0 * weight[0, 0].abs())
        return 1e-3 * random.random() * weight.square().sum()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=10, lr=1e-2, warmup_steps=3, ckpt_every=3, log_every=2, num_threads=1, device="cpu",
                spec_augment=True)
    return TrainConfig(**{**base, **overrides})


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resumed_run_ends_bit_identical(tmp_path):
    """10 steps over 3 epochs (4 batches each); killed before step 8 (last.pt at step 6, mid-epoch), resumed
    with a freshly built, differently initialised model and a fresh loader."""
    straight = TinyModel()
    hooks = ProbeHooks()
    result = train(straight, make_loader(), config(), tmp_path / "straight", hooks)

    with pytest.raises(Interrupted):
        train(TinyModel(), make_loader(), config(), tmp_path / "resumed", ProbeHooks(kill_at=8))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 6
    resumed = TinyModel(seed=123)
    resumed_hooks = ProbeHooks()
    resumed_result = train(resumed, make_loader(), config(), tmp_path / "resumed", resumed_hooks)

    assert_same_weights(straight, resumed)
    assert without_seconds(resumed_result.history) == without_seconds(result.history)
    assert resumed_hooks.calls == hooks.calls == 10
    assert [row["step"] for row in result.history] == [2, 4, 6, 8, 10]
    assert result.history[-1]["epoch"] == 2


def test_finished_run_is_skipped_and_its_weights_loaded(tmp_path):
    trained = TinyModel()
    first = train(trained, make_loader(), config(), tmp_path)
    fresh = TinyModel(seed=7)
    hooks = ProbeHooks(kill_at=1)  # would interrupt at once if any step ran
    again = train(fresh, make_loader(), config(), tmp_path, hooks)
    assert_same_weights(trained, fresh)
    assert again.history == first.history
    assert again.final_checkpoint == tmp_path / "final.pt"
    assert hooks.calls == 0


def test_resume_with_a_different_config_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        train(TinyModel(), make_loader(), config(), tmp_path, ProbeHooks(kill_at=5))
    with pytest.raises(ValueError, match=r"different TrainConfig \(lr: 0.01 -> 0.02\)"):
        train(TinyModel(), make_loader(), config(lr=2e-2), tmp_path)
    train(TinyModel(), make_loader(), config(log_every=1, ckpt_every=4), tmp_path)  # logging changes are fine


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, interrupted):
    """Even where every shape matches (here the same layers, another dropout): loading it would reuse stale weights."""
    if interrupted:
        with pytest.raises(Interrupted):
            train(TinyModel(), make_loader(), config(), tmp_path, ProbeHooks(kill_at=5))
    else:
        train(TinyModel(), make_loader(), config(), tmp_path)
    other = TinyModel()
    other.config = dataclasses.replace(other.config, dropout=0.5)
    path = tmp_path / ("last.pt" if interrupted else "final.pt")
    with pytest.raises(ValueError, match=rf"{path} holds a model of another configuration \(dropout: 0.2 -> 0.5\)"):
        train(other, make_loader(), config(), tmp_path)


@pytest.mark.parametrize("kind, what", [("loss", "loss_extra nan"), ("grad", "grad_norm nan")])
def test_non_finite_loss_stops_before_the_update(tmp_path, kind, what):
    model = TinyModel()
    with pytest.raises(NonFiniteLossError) as error:
        train(model, make_loader(), config(), tmp_path, ProbeHooks(poison=(5, kind)))
    message = str(error.value)
    assert message.startswith("step 5: non-finite") and what in message and "loss_ce" in message
    assert f"last good checkpoint: {tmp_path / 'last.pt'} (step 3)" in message
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 3 and not (tmp_path / "final.pt").exists()
    # The bad step was not applied: the weights in memory are those after step 4.
    reference = TinyModel()
    with pytest.raises(Interrupted):
        train(reference, make_loader(), config(), tmp_path / "reference", ProbeHooks(kill_at=5))
    assert_same_weights(model, reference)


def test_non_finite_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLossError, match="last good checkpoint: none"):
        train(TinyModel(), make_loader(), config(), tmp_path, ProbeHooks(poison=(1, "loss")))
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_load_with_weights_only(tmp_path):
    train(TinyModel(), make_loader(), config(), tmp_path, ProbeHooks())
    for name in ("last.pt", "final.pt"):
        ckpt = torch.load(tmp_path / name, weights_only=True)
        assert ckpt["step"] == 10 and ckpt["epoch"] == 2
        assert ckpt["model_config"] == {"vocab_size": TinyModel().config.vocab_size, "hidden": 16, "dropout": 0.2}
        assert ckpt["train_config"] == config().to_dict()
        assert ckpt["hooks"] == {"calls": 10}
        assert ckpt["loader"] == {"epoch": 2, "position": 2}
        assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "history", "seconds"}


class RecordingHooks(Hooks):
    def __init__(self):
        self.calls = []

    def on_train_start(self, model, optimizer):
        self.calls.append("start")

    def before_step(self, step, model):
        self.calls.append(f"before {step}")

    def extra_loss(self, step, model):
        self.calls.append(f"extra {step}")
        return torch.tensor(0.25) * step

    def after_step(self, step, model, optimizer):
        self.calls.append(f"after {step}")

    def on_train_end(self, model):
        self.calls.append("end")


def test_hooks_run_in_order_and_extra_loss_is_added(tmp_path):
    hooks = RecordingHooks()
    evaluated = []

    def dev_eval(model):
        evaluated.append(model.training)
        return {"wer": 12.5}

    result = train(TinyModel(), make_loader(), config(max_steps=2, log_every=1, eval_every=1), tmp_path, hooks,
                   dev_eval)
    assert hooks.calls == ["start", "before 1", "extra 1", "after 1", "before 2", "extra 2", "after 2", "end"]
    assert evaluated == [False, False]  # after step 1, and at the end; in eval mode both times
    for row in result.history:
        assert row["loss_extra"] == 0.25 * row["step"]
        assert row["loss"] == pytest.approx(row["loss_ce"] + row["loss_l2"] + row["loss_extra"])
        assert row["dev_wer"] == 12.5
    assert set(result.history[0]) == {"step", "epoch", "loss", "loss_ce", "loss_l2", "loss_extra", "grad_norm",
                                      "lr", "seconds", "dev_wer"}


class LSTMModel(TinyModel):
    """TinyModel with an nn.LSTM between its layers: nn.LSTM reads every weight several times per forward."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(self.config.hidden, self.config.hidden, batch_first=True)

    def loss(self, feats, feat_lens, tokens, token_lens):
        h, _ = self.lstm(torch.tanh(self.proj(feats)))
        ce = F.cross_entropy(self.out(h.mean(1)), tokens[:, 0])
        return ce, {"ce": ce}


class CountingParametrization(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, weight):
        self.calls += 1
        return weight * 1.0


class ParametrizeHooks(Hooks):
    """Puts a counting parametrization on the LSTM's input weight, as the QAT methods do."""

    def on_train_start(self, model, optimizer):
        self.counter = CountingParametrization()
        torch.nn.utils.parametrize.register_parametrization(model.lstm, "weight_ih_l0", self.counter)
        self.counter.calls = 0  # registering evaluates it once, to check its output


def test_a_parametrized_weight_is_computed_once_per_training_step(tmp_path):
    hooks = ParametrizeHooks()
    train(LSTMModel(), make_loader(), config(max_steps=3), tmp_path, hooks)
    assert hooks.counter.calls == 3  # without the forward's parametrize.cached(), nn.LSTM's reads made it 2-4 a step


def test_lr_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    cfg = config(max_steps=40, warmup_steps=10, final_lr_ratio=0.1, log_every=1, ckpt_every=40, spec_augment=False)
    factors = [lr_factor(s, cfg) for s in range(cfg.max_steps)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0
    assert all(a > b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(cfg.max_steps, cfg) == pytest.approx(0.1)
    assert factors[25] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    history = train(TinyModel(), make_loader(), cfg, tmp_path).history
    assert [row["lr"] for row in history] == pytest.approx([cfg.lr * f for f in factors])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"max_steps=0 \(must be > 0\).*final_lr_ratio=2"):
        TrainConfig(max_steps=0, final_lr_ratio=2)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from sub8.train import DistEnv, train
from test_train import TinyModel, config, make_loader
env = DistEnv.from_environ()
model = TinyModel()
result = train(model, make_loader(num_shards=env.world_size, shard=env.rank), config(max_steps=4), {run_dir!r})
torch.save(model.state_dict(), {out!r} + f"/rank{{env.rank}}.pt")
"""


@pytest.mark.slow  # ~10 s: torchrun starts three Python processes that each import torch
def test_data_parallel_on_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: ranks take different batches yet end with identical weights (DDP averages
    the gradients), and only rank 0 writes the checkpoints."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path / "run"),
                                        out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script)], check=True, env=env, capture_output=True, timeout=120)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final.pt", "last.pt"]
    ckpt = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # ranks draw their own masks


@pytest.mark.slow  # 8-16 s on 2 shared cores: 400 steps; WER reaches 0 by step ~125 and stays there
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng to synthesize the utterances")
@pytest.mark.filterwarnings("ignore:.*resampl")
def test_tiny_transducer_learns_four_utterances_to_wer_zero(tmp_path):
    """The whole path on real audio: espeak-ng -> manifest -> fbank + CMVN -> BatchLoader -> train -> greedy
    decoding -> WER. No SpecAugment or dropout: the point is that the pieces fit, not generalisation."""
    texts = ["one two three", "four five", "six seven", "eight nine zero"]
    utterances = []
    for i, text in enumerate(texts):
        wav = tmp_path / f"utt{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True)
        utterances.append(Utterance(f"utt{i}", wav, audio_info(wav).duration, text,
                                    extra={"engine": "espeak-ng", "voice": "en-us"}))
    write_manifest(tmp_path / "train.jsonl", utterances)
    fs = compute_split_features(tmp_path / "train.jsonl", FeatureConfig())
    cmvn, tokenizer = Cmvn.from_features(fs), build_tokenizer("char", texts)
    torch.manual_seed(0)
    model = build_model(TransducerConfig(encoder="lstm", vocab_size=tokenizer.vocab_size, lstm_layers=1,
                                         lstm_hidden=128, pred_embed_dim=32, pred_hidden=128, joiner_dim=128,
                                         dropout=0.0))
    cfg = TrainConfig(max_steps=400, lr=1e-2, warmup_steps=10, ckpt_every=400, log_every=50, num_threads=1,
                      device="cpu", spec_augment=False)
    loader = BatchLoader(fs, tokenizer, cmvn, batch_frames=100_000, seed=0)

    def dev_eval(m):
        return {"wer": evaluate(m, fs, cmvn, tokenizer).wer}

    result = train(model, loader, cfg, tmp_path / "run", dev_eval=dev_eval)

    assert result.history[-1]["dev_wer"] == 0.0
    assert result.history[-1]["loss_rnnt"] < 0.05 < result.history[0]["loss_rnnt"]
    reloaded = build_model(TransducerConfig.from_dict(load_checkpoint(result.final_checkpoint)["model_config"]))
    reloaded.load_state_dict(load_checkpoint(result.final_checkpoint)["model"])
    final = evaluate(reloaded, fs, cmvn, tokenizer)
    assert final.wer == 0.0 and final.per_group.group.tolist() == ["espeak-ng", "en-us"]
