"""One training loop for every model and method of the study: the fp32 baselines and every QAT fine-tune.

It reads top to bottom: skip a finished run; set up device, threads, seeds, optimizer, hooks and schedule; resume
from ``run_dir/last.pt`` if it exists; then the step loop (SpecAugment, loss plus the hooks' extra loss, backward,
clip, update, hooks), with periodic checkpoints and dev evaluations; finally ``run_dir/final.pt``.

Exact resume: a checkpoint holds everything that decides what happens next (weights, optimizer and schedule
state, the loader's position, the hooks' state, the step count and every RNG), so a run killed after step k and
started again ends with bit-identical weights to one that never stopped. A non-finite loss or gradient stops the
run before the update (:class:`NonFiniteLossError`), so the last checkpoint on disk stays a good one.

Quantization methods plug in through :class:`Hooks`. Data-parallel training runs under ``torchrun``: with
``WORLD_SIZE > 1`` in the environment the model is wrapped in DistributedDataParallel, each rank reads its shard of
the batches and only rank 0 writes; a plain ``python`` run never touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from sub8.data.batching import Batch, SpecAugment
from sub8.io import atomic_torch_save, load_checkpoint


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; raised before the update, so no state is corrupted."""


@dataclass
class TrainConfig:
    """Everything that shapes a training run; stored in every checkpoint (``to_dict``)."""

    max_steps: int = 3000
    lr: float = 2e-3  # peak learning rate, reached at the end of warm-up
    warmup_steps: int = 300
    # After warm-up the rate follows a cosine down to lr * final_lr_ratio at max_steps. A cosine keeps the rate
    # near its peak for longer than a linear decay (the RNN-T plateau needs that), then anneals smoothly, so the
    # final weights are a settled point at a fixed budget; the non-zero floor keeps the last steps useful.
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.01  # applied to weight matrices only (see _param_groups)
    betas: tuple[float, float] = (0.9, 0.98)
    clip_norm: float = 5.0  # clip the global gradient norm (over everything the optimizer updates)
    ckpt_every: int = 500  # steps between checkpoints (last.pt); one is also written at the end
    log_every: int = 25  # steps between history rows (means over the steps since the last row)
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    seed: int = 0
    num_threads: int | None = None  # CPU threads; None: all cores (divided among local ranks)
    device: str = "auto"  # "auto": CUDA when present, else CPU; or any torch device string
    spec_augment: bool = True

    def __post_init__(self):
        positive = ("max_steps", "ckpt_every", "log_every", "lr", "clip_norm")
        non_negative = ("warmup_steps", "eval_every", "weight_decay")
        bad = [f"{n}={getattr(self, n)!r} (must be > 0)" for n in positive if not getattr(self, n) > 0]
        bad += [f"{n}={getattr(self, n)!r} (must be >= 0)" for n in non_negative if not getattr(self, n) >= 0]
        if not 0 <= self.final_lr_ratio <= 1:
            bad.append(f"final_lr_ratio={self.final_lr_ratio!r} (must be in [0, 1])")
        if self.num_threads is not None and self.num_threads < 1:
            bad.append(f"num_threads={self.num_threads!r} (must be >= 1 or None)")
        if bad:
            raise ValueError("TrainConfig: " + "; ".join(bad))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields that do not change the trained weights; a run may be resumed with different values of these.
_RESUMABLE_CHANGES = frozenset({"ckpt_every", "log_every", "eval_every", "num_threads", "device"})


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of ``cfg.lr`` for update number ``step`` (0-based): linear warm-up from 1/warmup_steps to 1
    over ``warmup_steps`` updates, then a cosine from 1 down to ``final_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Hooks:
    """Callbacks through which a quantization method takes part in training; every default does nothing.

    Order within one call of :func:`train`: ``on_train_start`` once; per step ``before_step``, the model's loss,
    ``extra_loss``, backward and update, ``after_step``; ``on_train_end`` once after the last step. ``step`` counts
    updates from 1 to ``max_steps``. ``model`` is always the bare model (never the DDP wrapper).
    """

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called at the start of every :func:`train` call, fresh or resumed, after the model is on its device and
        the optimizer exists but BEFORE a checkpoint is restored: it may change the model's structure (e.g.
        parametrize weights) or add trainable tensors with ``optimizer.add_param_group``, so that the restored
        state meets the same structure. Whatever it derives from the weights must be in ``state_dict``, which is
        restored afterwards."""

    def before_step(self, step: int, model: nn.Module) -> None:
        """Before the forward pass of update ``step`` (e.g. advance an annealing schedule)."""

    def extra_loss(self, step: int, model: nn.Module) -> torch.Tensor | None:
        """A scalar added to the model's loss (e.g. a regularizer on the weights), logged as ``loss_extra``."""
        return None

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After update ``step`` (e.g. a periodic hard compressor, or re-deriving levels)."""

    def on_train_end(self, model: nn.Module) -> None:
        """After the last update, before the final dev evaluation and ``final.pt``: the last chance to change the
        weights they see (e.g. the final hard quantization). Leave a plain model, so ``final.pt`` loads into a
        freshly built one."""

    @contextmanager
    def evaluating(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model as the device would run it, for a dev evaluation (also after ``on_train_end``): by default the
        model itself; a method that quantizes more than the weights (e.g. activations) re-applies that here."""
        yield model

    def state_dict(self) -> dict[str, Any]:
        """The hook's own state (plain Python types and tensors only: checkpoints load with weights_only=True)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class BatchSource(Protocol):
    """What :func:`train` needs from a loader (``sub8.data.batching.BatchLoader`` is one)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # rows: step, epoch, loss, loss_<part>..., grad_norm, lr, seconds, dev_<metric>
    final_checkpoint: Path
    minutes: float  # wall-clock training time over all (resumed) segments


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` launch; a plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return cls(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), local_world)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: the CUDA device of this local rank when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def train(
    model: nn.Module,
    loader: BatchSource,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    hooks: Hooks | None = None,
    dev_eval: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` (which has ``loss(feats, feat_lens, tokens, token_lens) -> (loss, parts)``) for
    ``cfg.max_steps`` updates on batches from ``loader``, checkpointing into ``run_dir``.

    Resumes from ``run_dir/last.pt`` when it exists. When ``run_dir/final.pt`` holds a finished run of this
    config, loads its weights into ``model`` and returns at once. ``dev_eval(model) -> metrics`` runs (model in
    eval mode) every ``cfg.eval_every`` steps and at the end; its metrics go into the history as ``dev_<name>``.
    Under ``torchrun`` (WORLD_SIZE > 1) the loader must have been built with ``num_shards=WORLD_SIZE,
    shard=RANK``.
    """
    run_dir = Path(run_dir)
    last_path, final_path = run_dir / "last.pt", run_dir / "final.pt"
    hooks = hooks if hooks is not None else Hooks()

    # The model's own config (e.g. TransducerConfig), so a checkpoint alone rebuilds the model.
    model_config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    if final_path.is_file():
        final = load_checkpoint(final_path)
        if final["step"] == cfg.max_steps:
            _check_same_config(final["train_config"], cfg, final_path)
            _check_same_model(final.get("model_config"), model_config, final_path)
            model.load_state_dict(final["model"])
            return TrainResult(final["history"], final_path, final["seconds"] / 60)
    if len(loader) == 0:
        raise ValueError("train: the loader yields no batches (batch_frames too small or an empty split?)")

    env = DistEnv.from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    with _process_group(env, device):
        _check_sharding(loader, env)
        torch.manual_seed(cfg.seed + env.rank)  # ranks differ in SpecAugment masks and dropout, not in weights
        random.seed(cfg.seed + env.rank)

        model.to(device).train()
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        hooks.on_train_start(model, optimizer)
        # Built after on_train_start so that param groups a hook added are scheduled too.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        spec_augment = SpecAugment().to(device) if cfg.spec_augment else None

        step, epoch, history, seconds_before = 0, 0, [], 0.0
        if last_path.is_file():
            ckpt = load_checkpoint(last_path)
            _check_same_config(ckpt["train_config"], cfg, last_path)
            _check_same_model(ckpt.get("model_config"), model_config, last_path)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
            hooks.load_state_dict(ckpt["hooks"])
            _set_rng_state(ckpt["rng"], env, device, last_path)
            step, epoch, history, seconds_before = ckpt["step"], ckpt["epoch"], ckpt["history"], ckpt["seconds"]
        else:
            loader.set_epoch(0)
        last_good = f"{last_path} (step {step})" if last_path.is_file() else "none (no checkpoint written yet)"

        # DDP averages gradients only through forward(), so under torchrun model.loss is routed through it.
        if env.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            compute_loss = DistributedDataParallel(_LossForward(model), device_ids=device_ids)
        else:
            compute_loss = model.loss

        def checkpoint(path: Path) -> None:
            state = {
                "step": step,
                "epoch": epoch,
                "seconds": seconds_before + time.perf_counter() - t0,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
                "hooks": hooks.state_dict(),
                "history": history,
                "train_config": cfg.to_dict(),
                "model_config": model_config,
                "rng": _gather_rng_state(env, device),  # a collective under DDP: every rank takes part
            }
            if env.is_main:
                atomic_torch_save(state, path)

        def run_dev_eval() -> dict[str, float]:
            if dev_eval is None or not env.is_main:
                return {}
            model.eval()
            with hooks.evaluating(model) as deployed:
                metrics = {f"dev_{name}": float(value) for name, value in dev_eval(deployed).items()}
            model.train()
            return metrics

        t0 = time.perf_counter()
        batches = _endless(loader, epoch)
        window: dict[str, float] = defaultdict(float)  # sums over the steps since the last history row
        window_steps = 0
        with tqdm(total=cfg.max_steps, initial=step, disable=not env.is_main, desc=run_dir.name, unit="step") as bar:
            for step in range(step + 1, cfg.max_steps + 1):
                epoch, batch = next(batches)
                batch = batch.to(device)
                hooks.before_step(step, model)
                feats = spec_augment(batch.feats, batch.feat_lens) if spec_augment is not None else batch.feats
                # One evaluation of every parametrized (fake-quantized) weight per forward: nn.LSTM reads each of its
                # weights up to four times, and every read would run the parametrization again (uniform QAT's cost
                # on rnnt_large: 1.11x the fp32 step without the cache, 1.05x with it).
                with parametrize.cached():
                    loss, parts = compute_loss(feats, batch.feat_lens, batch.tokens, batch.token_lens)
                    extra = hooks.extra_loss(step, model)
                if extra is not None:
                    loss, parts = loss + extra, {**parts, "extra": extra}
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(nn.utils.clip_grad_norm_(trained, cfg.clip_norm))
                values = _mean_over_ranks({"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}, env, device)
                if not (math.isfinite(grad_norm) and all(map(math.isfinite, values.values()))):
                    raise NonFiniteLossError(
                        f"step {step}: non-finite loss or gradient ({_fmt(values)}, grad_norm {grad_norm:.4g}); "
                        f"the update was not applied and nothing was written; last good checkpoint: {last_good}"
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                hooks.after_step(step, model, optimizer)

                for name, value in {**values, "grad_norm": grad_norm}.items():
                    window[name] += value
                window_steps += 1
                bar.update(1)
                eval_due = cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.max_steps
                if step % cfg.log_every == 0 or step == cfg.max_steps or eval_due:
                    row = {"step": step, "epoch": epoch, **{k: v / window_steps for k, v in window.items()}, "lr": lr,
                           "seconds": seconds_before + time.perf_counter() - t0}
                    if eval_due:
                        row |= run_dev_eval()
                    history.append(row)
                    window.clear()
                    window_steps = 0
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                    checkpoint(last_path)
                    last_good = f"{last_path} (step {step})"

        hooks.on_train_end(model)
        history[-1] |= run_dev_eval()
        checkpoint(final_path)
        seconds = seconds_before + time.perf_counter() - t0
        if env.world_size > 1:
            dist.barrier()  # no rank returns before rank 0 has written final.pt
    return TrainResult(history, final_path, seconds / 60)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices (and embeddings) only, as nanoGPT does: biases, norm gains and scalar or vector
    quantizer parameters are not pulled toward zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _endless(loader: BatchSource, epoch: int) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) pairs forever, starting wherever the loader stands (fresh, or restored mid-epoch)."""
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1
        loader.set_epoch(epoch)


def _check_same_config(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
               if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        raise ValueError(
            f"{path} was written with a different TrainConfig ({'; '.join(changed)}); "
            f"use the same config, or delete {path.parent} to start over"
        )


def _check_same_model(saved: dict[str, Any] | None, current: dict[str, Any] | None, path: Path) -> None:
    """A checkpoint of another architecture (e.g. a changed preset) must not be taken for this run's: some changes
    keep every shape (dropout, chunk size, loss weights), and loading it would then silently reuse stale weights."""
    if saved == current:
        return
    changed = [f"{k}: {(saved or {}).get(k)!r} -> {(current or {}).get(k)!r}"
               for k in sorted((saved or {}).keys() | (current or {}).keys())
               if (saved or {}).get(k) != (current or {}).get(k)]
    raise ValueError(f"{path} holds a model of another configuration ({'; '.join(changed)}); "
                     f"train with the same one, or delete {path.parent} to start over")


class _LossForward(nn.Module):
    """Makes ``model.loss`` the ``forward`` of a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.loss(*args)


@contextmanager
def _process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Under torchrun, join (or reuse) the process group for the duration of training."""
    if env.world_size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_sharding(loader: BatchSource, env: DistEnv) -> None:
    shards = (getattr(loader, "num_shards", 1), getattr(loader, "shard", 0))
    if shards != (env.world_size, env.rank):
        raise ValueError(
            f"train: rank {env.rank} of {env.world_size} got a loader with (num_shards, shard) = {shards}; "
            f"build it with num_shards={env.world_size}, shard={env.rank}"
        )


def _mean_over_ranks(values: dict[str, Any], env: DistEnv, device: torch.device) -> dict[str, float]:
    """Loss parts as floats, averaged over ranks under DDP (so every rank sees the same, and a non-finite loss on
    any rank stops all of them together)."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach() for v in values.values()])
    if env.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= env.world_size
    return dict(zip(values, stacked.tolist()))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def _gather_rng_state(env: DistEnv, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own SpecAugment masks), indexed by rank."""
    if env.world_size == 1:
        return [_rng_state(device)]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, _rng_state(device))
    return states


def _set_rng_state(states: list[dict[str, Any]], env: DistEnv, device: torch.device, path: Path) -> None:
    if len(states) != env.world_size:
        raise ValueError(f"{path} was written by {len(states)} process(es); resume it with the same number, "
                         f"not {env.world_size}")
    state = states[env.rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
