"""Loss terms from config: each has a weight and a start step; every one is logged.

A method's config names its terms::

    losses:
      photo: {weight: 1.92}
      mouth: {weight: 1.3e-3, start_step: 0.25}   # a float in (0, 1): that fraction of max_steps

``LossTerms.combine(values, step)`` weighs the raw values a method computed into the total that
is optimised, and returns every term for logging under ``loss/<name>`` (raw value) and
``loss/<name>_weighted``, inactive ones included (their weight counts as 0 before their start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

TERM_KEYS = ("weight", "start_step")


@dataclass(frozen=True)
class LossTerm:
    name: str
    weight: float
    start_step: int = 0

    def active(self, step: int) -> bool:
        return self.weight != 0 and step >= self.start_step


class LossTerms:
    """The named terms of one method, in config order."""

    def __init__(self, terms: list[LossTerm]):
        self.terms = {term.name: term for term in terms}

    @classmethod
    def from_config(cls, config: Mapping, known: tuple[str, ...], max_steps: int | None = None) -> "LossTerms":
        """config: name -> {weight, start_step}; known: the names the method computes (a name
        outside them is an error that lists them); a fractional start_step in (0, 1) is that
        fraction of max_steps."""
        terms = []
        for name, settings in config.items():
            if name not in known:
                raise ValueError(f"loss term {name!r} is not one this method computes; known: {', '.join(known)}")
            settings = dict(settings or {})
            unknown = sorted(set(settings) - set(TERM_KEYS))
            if unknown:
                raise ValueError(f"loss term {name!r}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(TERM_KEYS)}")
            start = settings.get("start_step", 0)
            if isinstance(start, float) and 0 < start < 1:
                if max_steps is None:
                    raise ValueError(f"loss term {name!r}: a fractional start_step needs the run's max_steps")
                start = int(round(start * max_steps))
            terms.append(LossTerm(name, float(settings.get("weight", 1.0)), int(start)))
        return cls(terms)

    def __contains__(self, name: str) -> bool:
        return name in self.terms

    def __iter__(self):
        return iter(self.terms.values())

    def needed(self, step: int) -> dict[str, bool]:
        """name -> whether its gradient is needed at this step (else compute it without one, for
        the log, or skip it)."""
        return {name: term.active(step) for name, term in self.terms.items()}

    def combine(self, values: Mapping[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, log) from raw term values (scalars). Terms missing from `values` are an error;
        inactive terms add nothing to the total but are still logged."""
        missing = [name for name in self.terms if name not in values]
        if missing:
            raise KeyError(f"loss term(s) {', '.join(missing)} were configured but not computed")
        total, log = None, {}
        for name, term in self.terms.items():
            value = values[name]
            weighted = value * term.weight if term.active(step) else value.detach() * 0.0
            total = weighted if total is None else total + weighted
            log[f"loss/{name}"] = value.detach()
            log[f"loss/{name}_weighted"] = weighted.detach()
        if total is None:
            total = torch.zeros(())
        log["loss/total"] = total.detach()
        return total, log
