"""Which weights are quantized, at how many bits: a :class:`QuantPlan` of (pattern, bits) rules.

A pattern is an ``fnmatch`` glob over the names of ``model.named_parameters()`` ("transcriber.lstm.weight_ih_l*",
"joiner.*", "*") or the name of a module ("joiner.out", "predictor"), which stands for every quantizable weight
inside it. When several rules match a weight, the LAST one wins, so a plan reads from general to specific:
``QuantPlan([("*", 4), ("joiner", 8)])`` is 4 bits everywhere but 8 in the joiner.

Quantizable by default: the weights of nn.Linear, nn.Conv1d, nn.Conv2d and nn.Embedding, and the input and
recurrent matrices of nn.LSTM (``weight_ih_l*``, ``weight_hh_l*``) — not biases, not norms: they are a small part of
the bytes, and quantizing them costs accuracy for no memory. Nor the weights of a model's ``training_only`` modules
(the transducer's auxiliary CTC head): the device never runs them.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from torch import nn

from sub8.models import deployed_parameters
from sub8.quant.base import check_bits

_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def quantizable_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters quantized by default, in ``named_parameters`` order."""
    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _WEIGHT_MODULES):
            names.append(prefix + "weight")
        elif isinstance(module, nn.LSTM):
            own = [n for n, _ in module.named_parameters(recurse=False)]
            names += [prefix + n for n in own if n.startswith(("weight_ih_l", "weight_hh_l"))]
    order = {name: i for i, (name, _) in enumerate(deployed_parameters(model))}
    return sorted((n for n in names if n in order), key=order.__getitem__)


def _matches(pattern: str, param_name: str) -> bool:
    """The pattern names the parameter itself or a module that contains it."""
    if fnmatch.fnmatchcase(param_name, pattern):
        return True
    parts = param_name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


class QuantPlan:
    """Ordered (pattern, bits) rules; see the module docstring."""

    def __init__(self, rules: Iterable[tuple[str, int]] | dict[str, int]) -> None:
        rules = list(rules.items() if isinstance(rules, dict) else rules)
        if not rules:
            raise ValueError("QuantPlan: the plan is empty; name at least one pattern, e.g. {'*': 4}")
        for pattern, bits in rules:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"QuantPlan: pattern {pattern!r} is not a non-empty string")
            try:
                check_bits(bits)
            except ValueError as e:
                raise ValueError(f"QuantPlan: pattern {pattern!r}: {e}") from None
        self.rules: list[tuple[str, int]] = rules

    @classmethod
    def uniform(cls, bits: int) -> QuantPlan:
        """Every quantizable weight at ``bits``."""
        return cls([("*", bits)])

    def to_list(self) -> list[list]:
        """Plain form for checkpoints and results: [[pattern, bits], ...]."""
        return [[p, b] for p, b in self.rules]

    def resolve(self, model: nn.Module) -> list[tuple[str, int]]:
        """(parameter name, bits) for every quantizable weight some rule matches, in ``named_parameters`` order.

        Raises ValueError if a pattern matches no quantizable weight (naming the closest names the model has, or
        the non-quantizable parameters it did match), or if the whole plan matches nothing."""
        quantizable = quantizable_parameters(model)
        bits_of: dict[str, int] = {}
        for pattern, bits in self.rules:
            hits = [name for name in quantizable if _matches(pattern, name)]
            if not hits:
                raise ValueError(
                    f"QuantPlan: pattern {pattern!r} matches no quantizable weight; {_nearby(model, pattern)}"
                )
            bits_of.update(dict.fromkeys(hits, bits))
        return [(name, bits_of[name]) for name in quantizable if name in bits_of]


def _nearby(model: nn.Module, pattern: str) -> str:
    params = [name for name, _ in model.named_parameters()]
    matched = [name for name in params if _matches(pattern, name)]
    if matched:
        return f"it matches only parameters that are not quantized (biases, norms): {', '.join(matched[:5])}"
    modules = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(pattern, modules + params, n=5, cutoff=0.5)
    return f"closest names in the model: {', '.join(close) if close else ', '.join(modules[:8])}"
