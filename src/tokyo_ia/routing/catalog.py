"""The model catalog: public model name → deployments in the order to try them.

Deployments are grouped by ``priority`` (lower first; by default each deployment's position
in the list, so the first listed is the primary). Within one priority, deployments share
load in proportion to their ``weight``: each request gets a weighted random order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import DeploymentConfig
from ..errors import NotFoundError
from ..providers.base import Provider


@dataclass(frozen=True, slots=True)
class Deployment:
    public: str
    provider: Provider
    model: str
    weight: float
    priority: int

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


class Catalog:
    def __init__(
        self,
        models: Mapping[str, list[DeploymentConfig]],
        providers: Mapping[str, Provider],
        rng: random.Random | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._groups: dict[str, list[list[Deployment]]] = {}
        for public, configs in models.items():
            deployments = [
                Deployment(
                    public=public,
                    provider=providers[c.provider],
                    model=c.model,
                    weight=c.weight,
                    priority=c.priority if "priority" in c.model_fields_set else i,
                )
                for i, c in enumerate(configs)
            ]
            by_priority: dict[int, list[Deployment]] = {}
            for d in deployments:
                by_priority.setdefault(d.priority, []).append(d)
            self._groups[public] = [by_priority[p] for p in sorted(by_priority)]

    def names(self) -> list[str]:
        return list(self._groups)

    def __contains__(self, public: str) -> bool:
        return public in self._groups

    def deployments(self, public: str) -> list[Deployment]:
        """Every deployment of a model, highest priority first (no shuffling)."""
        return [d for group in self._groups.get(public, []) for d in group]

    def candidates(self, public: str) -> list[Deployment]:
        """The deployments to try for one request, in order."""
        groups = self._groups.get(public)
        if groups is None:
            known = ", ".join(self._groups) or "none"
            raise NotFoundError(
                f"model '{public}' does not exist on this gateway; use one of: {known} "
                "(GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        if all(len(g) == 1 for g in groups):
            return [g[0] for g in groups]
        ordered: list[Deployment] = []
        for group in groups:
            ordered.extend(self._weighted_order(group))
        return ordered

    def _weighted_order(self, group: list[Deployment]) -> list[Deployment]:
        if len(group) == 1:
            return group
        # Efraimidis–Spirakis: sort by u^(1/w), a weighted random permutation.
        return sorted(group, key=lambda d: self._rng.random() ** (1.0 / d.weight), reverse=True)
