"""Task-aware residency on the worker: attribute routing to tasks, re-plan pins.

Legend: T = tokens of the step, K = top-k, L = MoE layers, E = experts per layer,
n = tasks seen so far.

Each forward step starts with `begin_step`, which receives the step's token
layout (task and token count of each request, in batch order) and the expected
work per task (demand). Every layer call then `record`s its router output into
per-task counts with one `bincount` over `task * E + expert`. Every
`replan_every` new prompts the counts are folded into the `TaskProfiles`, saved,
and the planner pins the (layer, expert) pairs with the largest
N_e = sum_t demand(t) * s(t, layer) * f(t, layer, e) within `budget` slots.

Approximate mode (opt-in) asks `approx_tokens` which rows of a layer call
belong to tasks that are insensitive at that layer; the cache re-routes their
misses to resident experts instead of loading them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..core.slo import LatencyModel
from ..core.tasks import ReplanClock, TaskProfiles, plan_residency
from .expert_cache import ExpertCache

logger = logging.getLogger("vllm.moe_offload")


class TaskResidency:
    def __init__(self, cache: ExpertCache, budget: int, replan_every: int,
                 profiles_path: str | None = None,
                 insensitive: set[tuple[str, int]] = frozenset(),
                 approximate: bool = False):
        self.cache = cache
        self.num_layers = cache.num_layers
        self.experts_per_layer = cache.experts_per_layer
        self.budget = budget
        self.clock = ReplanClock(replan_every)
        self.profiles_path = profiles_path
        self.insensitive = set(insensitive)
        self.approximate = approximate
        self.profiles = TaskProfiles(self.num_layers, self.experts_per_layer)
        if profiles_path and Path(profiles_path).exists():
            self.profiles = TaskProfiles.load(profiles_path, self.num_layers,
                                              self.experts_per_layer)
            logger.info("expert offload: loaded task profiles of %s from %s",
                        sorted(self.profiles.counts), profiles_path)
        self.tasks: list[str] = sorted(self.profiles.counts)
        self._counts = torch.zeros(len(self.tasks), self.num_layers, self.experts_per_layer,
                                   dtype=torch.int64)  # [n, L, E] not yet folded
        self._token_task: torch.Tensor | None = None  # [T] task index per token
        self._approx = self._insensitive_table()  # [L, n] bool
        self.outputs = LatencyModel()  # only its per-task output lengths are used here
        self.replans = 0
        self.last_demand: dict[str, float] = {}
        self._warm = bool(self.profiles.counts)  # plan at the first step
        self._profile_tensor = None  # (task names, [n, L, E] frequencies) for shares

    # ---- per step -------------------------------------------------------------------

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            self.tasks.append(task)
            grow = torch.zeros(1, self.num_layers, self.experts_per_layer, dtype=torch.int64)
            self._counts = torch.cat([self._counts, grow])
            self._approx = self._insensitive_table()
        return self.tasks.index(task)

    def _insensitive_table(self) -> torch.Tensor:
        return torch.tensor([[(t, l) in self.insensitive for t in self.tasks]
                             for l in range(self.num_layers)],
                            dtype=torch.bool).view(self.num_layers, len(self.tasks))

    def begin_step(self, layout: list[tuple[str, int]], new_prompts: int,
                   demand: dict[str, float]) -> None:
        """`layout`: (task, scheduled tokens) per request in batch order."""
        if layout:
            idx = torch.tensor([self.task_index(t) for t, _ in layout])
            self._token_task = idx.repeat_interleave(torch.tensor([n for _, n in layout]))
        else:
            self._token_task = None
        replan = self._warm
        for _ in range(new_prompts):
            replan |= self.clock.on_prompt()
        if replan:
            self._warm = False
            self.replan(demand)

    def _rows(self, num_tokens: int) -> torch.Tensor | None:
        """The step's [T] task indices, or None when this call is not a step we
        laid out (a warm-up or profiling run)."""
        tt = self._token_task
        if tt is None or num_tokens < tt.numel():
            return None
        return tt

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        tt = self._rows(topk_ids.shape[0])
        if tt is None:
            return
        ids = topk_ids[: tt.numel()].to("cpu", torch.int64)
        flat = (tt.unsqueeze(1) * self.experts_per_layer + ids).reshape(-1)
        n = len(self.tasks)
        self._counts[:, layer] += torch.bincount(
            flat, minlength=n * self.experts_per_layer).view(n, self.experts_per_layer)

    def approx_tokens(self, layer: int, num_tokens: int) -> torch.Tensor | None:
        """[T] bool: rows whose task is insensitive at `layer` (approximate mode)."""
        tt = self._rows(num_tokens) if self.approximate else None
        if tt is None:
            return None
        rows = torch.zeros(num_tokens, dtype=torch.bool)
        rows[: tt.numel()] = self._approx[layer][tt]
        return rows

    # ---- re-plan --------------------------------------------------------------------

    def fold(self) -> None:
        """Move the step counts into the profiles."""
        for i, task in enumerate(self.tasks):
            if int(self._counts[i].sum()) == 0:
                continue
            table = self.profiles.counts.setdefault(
                task, [[0] * self.experts_per_layer for _ in range(self.num_layers)])
            for layer, row in enumerate(self._counts[i].tolist()):
                table[layer] = [a + b for a, b in zip(table[layer], row)]
        self._counts = torch.zeros_like(self._counts)  # (not in place: an inference tensor)
        self._profile_tensor = None

    def replan(self, demand: dict[str, float]) -> None:
        self.fold()
        if not any(v > 0 for v in demand.values()):
            # Nothing queued that we can see (a warm start): weigh tasks by the
            # traffic they had, i.e. by their share of the profiles.
            demand = {t: float(sum(table[0])) for t, table in self.profiles.counts.items()}
        t0 = time.perf_counter()
        # ranked, then within each slot group's room (one group: the first `budget`)
        ranked = plan_residency(self.profiles, demand, self.num_layers * self.experts_per_layer,
                                self.insensitive)
        plan = self.cache.fit_plan(ranked, self.budget)
        added, removed = self.cache.set_plan(plan)
        self.replans += 1
        self.last_demand = dict(demand)
        if self.profiles_path and self.profiles.counts:
            self.profiles.save(self.profiles_path)
        logger.info(
            "expert offload: replan %d after %d prompts: pinned %d of %d planned slots "
            "(+%d -%d, loaded in %.3f s); demand %s", self.replans, self.clock.seen,
            len(plan), self.budget, len(added), len(removed), time.perf_counter() - t0,
            {t: round(v) for t, v in sorted(demand.items())})

    def resident_share(self) -> dict[str, float]:
        """Per task: the share of its profiled routing that hits resident experts now."""
        if not self.profiles.counts:
            return {}
        if self._profile_tensor is None:
            names = sorted(self.profiles.counts)
            counts = torch.tensor([self.profiles.counts[t] for t in names], dtype=torch.float64)
            self._profile_tensor = (names, counts / counts.sum((1, 2), keepdim=True).clamp(min=1))
        names, freq = self._profile_tensor
        shares = (freq * self.cache.resident_mask()).sum((1, 2)).tolist()
        return dict(zip(names, shares))

    def save(self) -> None:
        self.fold()
        if self.profiles_path and self.profiles.counts:
            self.profiles.save(self.profiles_path)

    def to_dict(self) -> dict:
        self.fold()
        return {"tasks": sorted(self.profiles.counts), "replans": self.replans,
                "planned": len(self.cache.planned), "budget": self.budget,
                "prompts": self.clock.seen, "last_demand": self.last_demand,
                "profile_tokens": {t: sum(table[0]) for t, table in
                                   self.profiles.counts.items()}}
