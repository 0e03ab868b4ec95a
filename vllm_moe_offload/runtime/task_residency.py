"""Task-aware residency on the worker: attribute routing to tasks, re-plan pins.

Legend: T = tokens of the step, K = top-k, L = MoE layers, E = experts per layer,
n = tasks seen so far.

Each forward step starts with `begin_step`, which receives the step's token
layout (task and token count of each request, in batch order) and the expected
work per task (demand), and writes each token row's task row into a buffer on the
cache's device. Every layer call then `record`s its router output into per-task
counts on that device with one `index_add_` over `(row * L + layer) * E + expert`:
no host sync, so a layer call can sit in a CUDA graph, which replays with the
buffer's contents of its step (rows past the step's tokens, and calls outside a
step, count into a sink row). Every `replan_every` new prompts the counts are read
back (a sync, between steps), folded into the `TaskProfiles`, saved, and the
planner pins the (layer, expert) pairs with the largest
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
from .slot_buffers import Later, copy_in, read_later

logger = logging.getLogger("vllm.moe_offload")


COUNT_ROWS = 32  # tasks counted between two folds; a fold frees their rows


class TaskResidency:
    def __init__(self, cache: ExpertCache, budget: int, replan_every: int,
                 profiles_path: str | None = None,
                 insensitive: set[tuple[str, int]] = frozenset(),
                 approximate: bool = False, max_step_tokens: int = 8192):
        self.cache = cache
        self.num_layers = cache.num_layers
        self.experts_per_layer = cache.experts_per_layer
        self.budget = budget
        self.clock = ReplanClock(replan_every)
        self.profiles_path = profiles_path
        self._save_failed = False  # warned once until a save succeeds again
        self.insensitive = set(insensitive)
        self.approximate = approximate
        self.profiles = TaskProfiles(self.num_layers, self.experts_per_layer)
        if profiles_path and Path(profiles_path).exists():
            self.profiles = TaskProfiles.load(profiles_path, self.num_layers,
                                              self.experts_per_layer)
            logger.info("expert offload: loaded task profiles of %s from %s",
                        sorted(self.profiles.counts), profiles_path)
        self.tasks: list[str] = sorted(self.profiles.counts)
        dev = cache.device
        with torch.inference_mode(False):  # updated in place, in and out of steps
            # [COUNT_ROWS + 1, L, E] not yet folded: a row per task (_row_of), the
            # last one the sink; [max_step_tokens] the count row of each token row
            self._counts = torch.zeros(COUNT_ROWS + 1, self.num_layers,
                                       self.experts_per_layer, dtype=torch.int64, device=dev)
            self._token_rows = torch.full((max_step_tokens,), COUNT_ROWS, dtype=torch.int64,
                                          device=dev)
            # approximate mode: [L, max_step_tokens] whether a token row's task is
            # insensitive at each layer (False past the step's rows)
            self._approx_rows = torch.zeros(self.num_layers, max_step_tokens if approximate
                                            else 0, dtype=torch.bool, device=dev)
        self._row_of: dict[str, int] = {}  # task -> its row of _counts
        self._laid_out = 0  # token rows the step's layout set in _token_rows
        self._token_task: torch.Tensor | None = None  # [T] task index per token (approx)
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
            sizes = torch.tensor([n for _, n in layout])
            self._token_task = idx.repeat_interleave(sizes)
            self._lay_out_rows(self._count_rows([t for t, _ in layout]), sizes,
                               self._token_task)
        else:
            self._token_task = None
            self._lay_out_rows([], torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, dtype=torch.int64))
        replan = self._warm
        for _ in range(new_prompts):
            replan |= self.clock.on_prompt()
        if replan:
            warm, self._warm = self._warm, False
            self.replan(demand, warm)

    def _count_rows(self, tasks: list[str]) -> list[int]:
        """The row of _counts that counts each of a step's `tasks`. Where the step's
        new tasks do not fit the rows left, the counts are folded first (a sync,
        between steps) and the rows handed out again, all before the step uses one
        (a fold in the middle gave two tasks one row). Tasks past COUNT_ROWS in one
        step go to the sink, uncounted (integration tasks.py MAX_TASKS keeps a step within them)."""
        step = list(dict.fromkeys(tasks))
        if len(self._row_of.keys() | set(step)) > COUNT_ROWS:
            self.fold()
            self._row_of.clear()
        for task in step:
            if task not in self._row_of and len(self._row_of) < COUNT_ROWS:
                self._row_of[task] = len(self._row_of)
        return [self._row_of.get(t, COUNT_ROWS) for t in tasks]

    def _lay_out_rows(self, rows: list[int], sizes: torch.Tensor,
                      token_task: torch.Tensor) -> None:
        """Write each token row's count row (and in approximate mode, whether its task
        is insensitive at each layer) into the device buffers, in place (graphs read
        them); rows the last step set and this one does not go to the sink (and are
        exact)."""
        n = int(sizes.sum())
        if n > self._token_rows.numel():
            raise RuntimeError(f"expert offload: a step of {n} tokens, more than the "
                               f"{self._token_rows.numel()} the task counts were sized for")
        new = torch.tensor(rows, dtype=torch.int64).repeat_interleave(sizes)
        span = max(n, self._laid_out)
        if span:
            host = torch.full((span,), COUNT_ROWS, dtype=torch.int64)
            host[:n] = new
            copy_in(self._token_rows[:span], host)
            if self.approximate:
                approx = torch.zeros(self.num_layers, span, dtype=torch.bool)
                approx[:, :n] = self._approx[:, token_task]
                copy_in(self._approx_rows[:, :span], approx)
        self._laid_out = n

    def _rows(self, num_tokens: int) -> torch.Tensor | None:
        """The step's [T] task indices, or None when this call is not a step we
        laid out (a warm-up or profiling run)."""
        tt = self._token_task
        if tt is None or num_tokens < tt.numel():
            return None
        return tt

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count this call's routing per task, on the device, with no host sync. A
        call of fewer rows than the step laid out (not a step's) is not counted,
        nor one outside a step; a CUDA graph capture always records the count, which
        each replay makes with its step's layout."""
        T, K = topk_ids.shape
        capturing = topk_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and self._rows(T) is None:
            return
        L, E = self.num_layers, self.experts_per_layer
        if T > self._token_rows.numel():
            raise RuntimeError(f"expert offload: a layer call of {T} token rows, more "
                               f"than the {self._token_rows.numel()} the task counts "
                               "were sized for")
        rows = self._token_rows[:T].unsqueeze(1)
        ids = topk_ids.to(torch.int64)  # -1 (vLLM's padded rows): counts nothing
        flat = ((rows * L + layer) * E + ids.clamp_min(0)).reshape(-1)
        self._counts.view(-1).index_add_(0, flat, (ids >= 0).reshape(-1).to(torch.int64))

    def approx_tokens(self, layer: int, num_tokens: int,
                      capturing: bool = False) -> torch.Tensor | None:
        """[T] bool on the cache's device: rows whose task is insensitive at `layer`
        (approximate mode), a view of the step's buffer (no copy, no sync); None
        outside a step, except in a CUDA graph capture, whose replays read the
        buffer their step wrote."""
        if not self.approximate:
            return None
        if not capturing and self._rows(num_tokens) is None:
            return None
        if num_tokens > self._approx_rows.shape[1]:
            raise RuntimeError(f"expert offload: a layer call of {num_tokens} token rows, "
                               f"more than the {self._approx_rows.shape[1]} approximate "
                               "mode was sized for")
        return self._approx_rows[layer, :num_tokens]

    # ---- re-plan --------------------------------------------------------------------

    def fold(self) -> None:
        """Move the step counts into the profiles (reads them back: a sync)."""
        counts = self._counts.cpu()
        for task, i in self._row_of.items():
            if int(counts[i].sum()) == 0:
                continue
            table = self.profiles.counts.setdefault(
                task, [[0] * self.experts_per_layer for _ in range(self.num_layers)])
            for layer, row in enumerate(counts[i].tolist()):
                table[layer] = [a + b for a, b in zip(table[layer], row)]
        with torch.inference_mode(False):
            self._counts.zero_()  # in place: graphs add into it
        self._profile_tensor = None

    def replan(self, demand: dict[str, float], warm: bool = False) -> None:
        """`warm`: the first plan of a server started with profiles. Its first step
        sees a request or two, a poor sample of the traffic to come: tasks weigh by
        the traffic they had, their share of the profiles (before, one rare task's
        request planned for it alone until the next re-plan)."""
        self.fold()
        if warm or not any(v > 0 for v in demand.values()):
            demand = {t: float(sum(table[0])) for t, table in self.profiles.counts.items()}
        t0 = time.perf_counter()
        # ranked, then within each slot group's room (one group: the first `budget`)
        ranked = plan_residency(self.profiles, demand, self.num_layers * self.experts_per_layer,
                                self.insensitive)
        plan = self.cache.fit_plan(ranked, self.budget)
        added, removed = self.cache.set_plan(plan)
        self.replans += 1
        self.last_demand = dict(demand)
        self._save_profiles()
        logger.info(
            "expert offload: replan %d after %d prompts: pinned %d of %d planned slots "
            "(+%d -%d, loaded in %.3f s); demand %s", self.replans, self.clock.seen,
            len(plan), self.budget, len(added), len(removed), time.perf_counter() - t0,
            {t: round(v) for t, v in sorted(demand.items())})

    def resident_share(self) -> Later:
        """Per task: the share of its profiled routing that hits resident experts now,
        as a function that gives it. In device mode the product is taken on the device
        and read back when the function is called (read_later): no host sync now."""
        if not self.profiles.counts:
            return Later.now({})
        mask = self.cache.resident_mask(host=False)  # where the table is: no sync
        if self._profile_tensor is None:
            names = sorted(self.profiles.counts)
            counts = torch.tensor([self.profiles.counts[t] for t in names], dtype=torch.float64)
            freq = counts / counts.sum((1, 2), keepdim=True).clamp(min=1)
            on_device = torch.empty(freq.shape, dtype=freq.dtype, device=mask.device)
            copy_in(on_device, freq)  # after a fold: no wait for the step running
            self._profile_tensor = (names, on_device)
        names, freq = self._profile_tensor
        return read_later((freq * mask).sum((1, 2))).then(
            lambda host: dict(zip(names, host[0].tolist())))

    def save(self) -> None:
        self.fold()
        self._save_profiles()

    def _save_profiles(self) -> None:
        """Write the profiles back. A file that cannot be written (a read-only or
        full disk) is a warning, never an error: this runs inside vLLM's step."""
        if not (self.profiles_path and self.profiles.counts):
            return
        try:
            self.profiles.save(self.profiles_path)
        except OSError as e:
            if not self._save_failed:
                logger.warning("expert offload: could not write the task profiles to %s "
                               "(%s); serving on with them in memory (learned routing is "
                               "lost at exit). Point --expert-task-profiles at a writable "
                               "file to keep them", self.profiles_path, e)
            self._save_failed = True
            return
        self._save_failed = False

    def to_dict(self) -> dict:
        self.fold()
        return {"tasks": sorted(self.profiles.counts), "replans": self.replans,
                "planned": len(self.cache.planned), "budget": self.budget,
                "prompts": self.clock.seen, "last_demand": self.last_demand,
                "profile_tokens": {t: sum(table[0]) for t, table in
                                   self.profiles.counts.items()}}
