"""A training run killed part way, as a preempted job is: for the exact-resume tests of every QAT method."""

from __future__ import annotations

from sub8.train import Hooks


class Killed(Exception):
    pass


def killed_at(hooks_class: type[Hooks]) -> type[Hooks]:
    """``hooks_class`` taking a ``kill_at`` keyword: the run dies before update ``kill_at``."""

    class KilledHooks(hooks_class):
        def __init__(self, *args, kill_at: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.kill_at = kill_at

        def before_step(self, step, model):
            if step == self.kill_at:
                raise Killed
            super().before_step(step, model)

    KilledHooks.__name__ = f"Killed{hooks_class.__name__}"
    return KilledHooks
