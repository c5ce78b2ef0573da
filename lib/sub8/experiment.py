"""The study's models by name: build, train, load and evaluate them the same way in every notebook.

A model lives in ``runs/<profile>/models/<name>/``: ``final.pt`` (weights, configs, history), ``last.pt`` while it
trains, and ``eval_<split>.csv`` (per-utterance errors, cached so every later comparison bootstraps against the same
numbers without decoding again).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from sub8.data.batching import BatchLoader
from sub8.data.prepare import PreparedData
from sub8.evaluate import EvalResult, decode, evaluate, score_feature_set
from sub8.io import atomic_write_text, load_checkpoint
from sub8.models import PRESETS, Transducer, TransducerConfig, build_model, count_parameters
from sub8.parallel import run_side_by_side
from sub8.profiles import Profile
from sub8.train import Hooks, TrainConfig, TrainResult, train


def model_dir(profile: Profile, name: str) -> Path:
    return profile.runs_dir / "models" / name


def baseline_config(data: PreparedData, name: str) -> TransducerConfig:
    """The architecture of baseline ``name``: its preset, the profile's overrides, this data's vocabulary."""
    recipe = data.profile.baselines[name]
    cfg = PRESETS[recipe.preset](data.tokenizer.vocab_size)
    return replace(cfg, frame_shift_ms=data.profile.features.frame_shift_ms, **recipe.model_overrides)


def train_loader(data: PreparedData, seed: int, shortest_first_epochs: int = 0) -> BatchLoader:
    return BatchLoader(
        data.features["train"],
        data.tokenizer,
        data.cmvn,
        data.profile.batch_frames,
        seed=seed,
        shortest_first_epochs=shortest_first_epochs,
    )


def dev_wer(data: PreparedData):
    """A ``dev_eval`` callback for :func:`sub8.train.train`: WER and CER (%) on the dev split."""

    def run(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate(model, data.features["dev"], data.cmvn, data.tokenizer, data.profile.eval_batch_frames)
        return {"wer": result.wer, "cer": result.cer}

    return run


def train_model(
    data: PreparedData,
    name: str,
    model: Transducer,
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    shortest_first_epochs: int = 0,
    force: bool = False,
) -> TrainResult:
    """Train ``model`` as ``runs/<profile>/models/<name>``: skipped when finished, resumed when interrupted."""
    run_dir = model_dir(data.profile, name)
    if force:
        for stale in ("final.pt", "last.pt", *(p.name for p in run_dir.glob("eval_*.csv"))):
            (run_dir / stale).unlink(missing_ok=True)
    loader = train_loader(data, cfg.seed, shortest_first_epochs)
    return train(model, loader, cfg, run_dir, hooks=hooks, dev_eval=dev_wer(data))


def train_baseline(data: PreparedData, name: str, force: bool = False) -> TrainResult:
    """Train the fp32 baseline ``name`` (a key of ``profile.baselines``) from scratch."""
    recipe = data.profile.baselines[name]
    cfg = TrainConfig(**recipe.train)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(baseline_config(data, name))
    return train_model(data, name, model, cfg, shortest_first_epochs=recipe.shortest_first_epochs, force=force)


def train_baselines(data: PreparedData, names: list[str], force: bool = False) -> None:
    """Train the baselines ``names`` and decode their dev and test splits, side by side
    (:func:`sub8.parallel.run_side_by_side`): the longest first (most updates × parameters). Finished ones are
    skipped unless ``force``; afterwards :func:`train_baseline` and :func:`evaluate_model` only load them."""
    recipes = data.profile.baselines
    threads = {recipes[name].train.get("num_threads") for name in names}
    if len(threads) > 1:
        raise ValueError(f"train_baselines: the baselines' schedules ask for different num_threads {threads}")
    pending = [name for name in names if force or not _evaluated(data.profile, name)]
    cost = {name: recipes[name].train.get("max_steps", TrainConfig.max_steps)
            * count_parameters(build_model(baseline_config(data, name))) for name in pending}
    pending.sort(key=lambda name: -cost[name])
    run_side_by_side(_baseline_job, data, [(name, force) for name in pending], pending, threads.pop() if threads else None)


def _evaluated(profile: Profile, name: str) -> bool:
    run_dir = model_dir(profile, name)
    return all((run_dir / f).is_file() for f in ("final.pt", "eval_dev.csv", "eval_test.csv"))


def _baseline_job(data: PreparedData, name: str, force: bool) -> None:
    train_baseline(data, name, force=force)
    model = load_model(data.profile, name)
    for split in ("dev", "test"):
        evaluate_model(data, name, model, split)


def finetune(
    data: PreparedData, base: str, name: str, hooks: Hooks | None = None, force: bool = False
) -> tuple[Transducer, TrainResult]:
    """Fine-tune the trained model ``base`` with ``hooks`` (a QAT method; None: the fp32 control) on the profile's
    fine-tune schedule, as ``runs/<profile>/models/<name>``: skipped when finished, resumed when interrupted.
    Returns the fine-tuned model in eval mode (hard-quantized, when the hooks quantize) and the run's result; the
    hooks' final state (e.g. S8BQAT's levels) is ``hooks_state(profile, name)``."""
    model = load_model(data.profile, base)
    cfg = TrainConfig(**data.profile.finetune)
    result = train_model(data, name, model, cfg, hooks=hooks, force=force)
    return model.eval(), result


def hooks_state(profile: Profile, name: str) -> dict:
    """The state the hooks of run ``name`` ended with (``Hooks.state_dict`` as saved in its ``final.pt``)."""
    return load_checkpoint(model_dir(profile, name) / "final.pt")["hooks"]


def load_model(profile: Profile, name: str) -> Transducer:
    """The trained model ``name`` from its ``final.pt`` (loaded with ``weights_only=True``), in eval mode."""
    ckpt = load_checkpoint(model_dir(profile, name) / "final.pt")
    model = build_model(TransducerConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def training_history(profile: Profile, name: str) -> pd.DataFrame:
    return pd.DataFrame(load_checkpoint(model_dir(profile, name) / "final.pt")["history"])


def evaluate_model(data: PreparedData, name: str, model: torch.nn.Module, split: str = "test") -> EvalResult:
    """WER/CER of ``model`` on ``split``; the hypotheses are cached in the model's directory
    (``eval_<split>.csv``) so later comparisons score the same decoding without running it again. The cache
    belongs to the weights in ``final.pt``: retraining with ``force`` deletes it."""
    path = model_dir(data.profile, name) / f"eval_{split}.csv"
    fs = data.features[split]
    if path.is_file():
        cached = pd.read_csv(path, keep_default_na=False, dtype=str)
        if list(cached.utt_id) == list(fs.utt_ids):
            return score_feature_set(fs, list(cached.hyp))
    hyps = decode(model, fs, data.cmvn, data.tokenizer, data.profile.eval_batch_frames)
    atomic_write_text(path, pd.DataFrame({"utt_id": fs.utt_ids, "hyp": hyps}).to_csv(index=False))
    return score_feature_set(fs, hyps)


def fp32_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of the float32 parameters (what an unquantized model stores)."""
    return 4 * count_parameters(model)
