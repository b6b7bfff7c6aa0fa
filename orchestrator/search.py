"""One Optuna study per (grid cell, method), all driven by a single Ray Tune run.

Ray's ``OptunaSearch`` runs one study per ``Tuner`` and refuses ``tune.grid_search``; running one
Tuner per cell would leave a cluster idle between cells. :class:`MultiStudySearcher` instead owns
every study of the sweep and hands out trials round-robin across studies, so all cells progress
concurrently under one global concurrency limit, while each study's sampler only ever sees its own
trials. Studies live in an Optuna RDB storage (sqlite by default), which ``optuna-dashboard`` opens
directly and which survives the driver.

:class:`PerStudyScheduler` applies ASHA early stopping inside each study that asks for it (rungs
are never shared across cells or methods) and runs everything else to the end.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.plan import Study, TrialSpecs
from search_spaces import Space, get_space, parameter_names
from trainables.data.spec import signature
from trainables.spec import TrialSpec

log = logging.getLogger(__name__)
METRIC_PREFIXES = ("test/", "val/", "pl/", "split/")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # A few random trials before TPE models the space (Optuna's default is 10, too many for the
    # small per-cell budgets of a grid).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


class MultiStudySearcher(Searcher):
    """Suggests trial configs for many Optuna studies at once (round-robin over studies).

    Args:
        studies: the sweep's studies.
        make_config: ``make_config(study, sampled, optuna_trial, resuming) -> TrialSpec`` builds a
            trial's resolved spec; ``resuming`` is True for a trial an interrupted sweep left
            unfinished. Tune receives its :meth:`~trainables.spec.TrialSpec.to_config`.
        storage: Optuna storage URL (``sqlite:///.../optuna.db``).
        stopped_early: set of Tune trial ids the scheduler stopped early (told as PRUNED).
        tracked: tell Optuna a trial's outcome only when :meth:`settle` is called, once the trial's
            MLflow run has its final status (Tune tells the searcher first): a trial whose run could
            not be finished (disk full) stays RUNNING, and a resume finishes it, so Optuna never
            counts COMPLETE a trial that MLflow does not have FINISHED.
    """

    def __init__(
        self,
        studies: list[Study],
        make_config: Callable[[Study, dict[str, Any], int, bool], TrialSpec],
        storage: str,
        stopped_early: set[str] | None = None,
        tracked: bool = False,
    ):
        super().__init__(metric=None, mode=None)
        self._plans = {s.study_id: s for s in studies}
        self._order = [s.study_id for s in studies]
        self._make_config = make_config
        self._storage = storage
        self._stopped_early = stopped_early if stopped_early is not None else set()
        self._studies: dict[str, optuna.Study] = {}
        # Tune trial id -> (study, Optuna trial, epochs already reported to Optuna)
        self._live: dict[str, tuple[str, optuna.Trial, set[int]]] = {}
        self._tracked = tracked
        # Tune trial id -> (study, Optuna trial, final state, value, metrics): told once settled
        self._unsettled: dict[str, tuple[str, optuna.Trial, optuna.trial.TrialState, float | None, dict]] = {}
        self._asked: dict[str, int] = {}
        self._resumable: dict[str, list[optuna.trial.FrozenTrial]] = {}
        self._cursor = 0
        self._names: dict[str, str] = {}
        self._existing: set[str] | None = None  # study names in the storage before this driver

    def set_search_properties(self, metric, mode, config, **spec) -> bool:  # noqa: D102
        return True  # every study carries its own objective and direction

    def study_name(self, study_id: str) -> str:
        """The Optuna name of a study: experiment, method and cell in words. A study an older version
        named by ``study_id`` keeps that name (the sweep resumes it); a readable name already taken
        in this storage by a study of other settings (the grid's params changed) gets the settings'
        key appended."""
        if study_id not in self._names:
            plan = self._plans[study_id]
            if self._existing is None:
                self._existing = set(optuna.get_all_study_names(self._storage))
            name = plan.readable_name
            if study_id in self._existing:
                name = study_id
            elif name in self._existing:
                owner = optuna.load_study(study_name=name, storage=self._storage).user_attrs.get("study_id")
                name = name if owner == study_id else f"{name} [{plan.key}]"
            self._names[study_id] = name
        return self._names[study_id]

    def _study(self, study_id: str) -> optuna.Study:
        if study_id not in self._studies:
            plan = self._plans[study_id]
            study = optuna.create_study(
                study_name=self.study_name(study_id),
                storage=self._storage,
                direction="maximize" if plan.mode == "max" else "minimize",
                sampler=_sampler(plan.method.search.sampler, int(signature(study_id, 8), 16)),
                load_if_exists=True,
            )
            with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([plan.objective])  # optuna-dashboard shows it, not "Objective 0"
            study.set_user_attr("study_id", study_id)
            study.set_user_attr("objective", plan.objective)
            study.set_user_attr("method", plan.method.name)
            study.set_user_attr("cell", plan.cell.label())
            self._studies[study_id] = study
            # Budget spent = trials that finished (or were pruned). Trials left RUNNING by an
            # interrupted driver (Ctrl-C, killed, lost head node) are handed out again first, with
            # the same parameters and trial number, so they resume from their last checkpoint;
            # failed trials are asked anew.
            trials = study.get_trials(deepcopy=False)
            done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            self._asked[study_id] = sum(t.state in done for t in trials)
            self._resumable[study_id] = [
                t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "sampled" in t.user_attrs
            ]
            if self._asked[study_id] == 0 and not self._resumable[study_id]:
                defaults = self._defaults(plan)
                if defaults:
                    # The first trial of every study evaluates the method's published defaults.
                    study.enqueue_trial(defaults, skip_if_exists=True)
        return self._studies[study_id]

    @staticmethod
    def _defaults(plan: Study) -> dict[str, Any]:
        """The study's configuration as the grid resolves it (method defaults + grid overrides) for
        every searched parameter: the first trial of each study evaluates exactly that."""
        space = plan.method.search.space
        names = [n for n in parameter_names(plan.method.name, space, plan.training) if isinstance(space.get(n, {}), dict)]
        return {n: plan.params[n] if n in plan.params else getattr(plan.training, n) for n in names}

    def remaining(self) -> int:
        return sum(
            self._plans[s].method.search.num_samples - self._asked.get(s, 0) for s in self._order
        )

    def resumable(self) -> int:
        """How many unfinished trials of an interrupted sweep will be resumed (loads every study)."""
        for study_id in self._order:
            self._study(study_id)
        return sum(len(self._resumable[s]) for s in self._order)

    def suggest(self, trial_id: str) -> dict | str | None:
        for _ in range(len(self._order)):
            study_id = self._order[self._cursor % len(self._order)]
            self._cursor += 1
            study = self._study(study_id)
            plan = self._plans[study_id]
            if self._resumable[study_id]:
                frozen = self._resumable[study_id].pop(0)
                ot_trial = optuna.Trial(study, frozen._trial_id)
                sampled, resuming = dict(frozen.user_attrs["sampled"]), True
                reported = set(frozen.intermediate_values)
            elif self._asked[study_id] >= plan.method.search.num_samples:
                continue
            else:
                ot_trial = study.ask()
                sampled = get_space(plan.method.name, plan.training)(Space(ot_trial, plan.method.search.space))
                ot_trial.set_user_attr("sampled", sampled)
                resuming, reported = False, set()
            self._asked[study_id] += 1
            self._live[trial_id] = (study_id, ot_trial, reported)
            spec = self._make_config(plan, sampled, ot_trial.number, resuming)
            ot_trial.set_user_attr("signature", spec.signature)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            return spec.to_config()
        return Searcher.FINISHED if not self._live else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        study_id, ot_trial, reported = self._live.get(trial_id, (None, None, None))
        if ot_trial is None:
            return
        value = result.get(self._plans[study_id].objective)
        if value is not None and "epoch" in result:
            step = int(result["epoch"])
            # A trial resumed or retried from its checkpoint repeats the epochs after it; Optuna
            # keeps the first value of a step (the same, as resume is exact).
            if step not in reported:
                ot_trial.report(float(value), step=step)
                reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        study_id, ot_trial, _ = self._live.pop(trial_id, (None, None, None))
        if ot_trial is None:
            return
        value = (result or {}).get(self._plans[study_id].objective)
        # Kept with the study, so tables can be rebuilt from the storage after any resume.
        metrics = {k: float(v) for k, v in (result or {}).items() if k.startswith(METRIC_PREFIXES) or k == "epoch"}
        if error or value is None:
            state = optuna.trial.TrialState.FAIL
        elif trial_id in self._stopped_early:
            state = optuna.trial.TrialState.PRUNED
        else:
            state = optuna.trial.TrialState.COMPLETE
        self._unsettled[trial_id] = (study_id, ot_trial, state, None if value is None else float(value), metrics)
        if not self._tracked:
            self.settle(trial_id)

    def settle(self, trial_id: str) -> None:
        """Tell Optuna the outcome Tune reported for ``trial_id``: its MLflow run has its final status."""
        found = self._unsettled.pop(trial_id, None)
        if found is None:
            return
        study_id, ot_trial, state, value, metrics = found
        if metrics:
            ot_trial.set_user_attr("metrics", metrics)
        if state == optuna.trial.TrialState.COMPLETE:
            self._studies[study_id].tell(ot_trial, value)
        else:
            self._studies[study_id].tell(ot_trial, state=state)

    def abandon_live(self) -> int:
        """The driver is stopping with trials still running, or finished but not recorded as such in
        MLflow: leave their Optuna trials RUNNING (marked ``interrupted``) so that the next run of
        the same grid resumes them from their last checkpoint, exactly as after a driver that was
        killed outright."""
        abandoned = [ot_trial for _, ot_trial, _ in self._live.values()]
        abandoned += [found[1] for found in self._unsettled.values()]
        self._live.clear()
        self._unsettled.clear()
        for ot_trial in abandoned:
            ot_trial.set_user_attr("interrupted", True)
        return len(abandoned)

    # Studies persist in their RDB storage; the driver-side state is rebuilt from it on restore.
    def get_state(self) -> dict:
        return {"cursor": self._cursor}

    def set_state(self, state: dict) -> None:
        self._cursor = state.get("cursor", 0)

    def save(self, checkpoint_path: str) -> None:
        import json

        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        import json

        with open(checkpoint_path) as f:
            self.set_state(json.load(f))


class ListSearcher(Searcher):
    """Hands out a fixed list of trial specs in order (a rerun's trials)."""

    def __init__(self, specs: list[TrialSpec]):
        super().__init__()
        self.todo = [spec.to_config() for spec in specs]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:  # noqa: D102
        return True

    def suggest(self, trial_id: str):
        return self.todo.pop(0) if self.todo else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        """The trials not handed out yet (Tune checkpoints its searcher with the experiment)."""
        import json

        with open(checkpoint_path, "w") as f:
            json.dump(self.todo, f)

    def restore(self, checkpoint_path: str) -> None:
        import json

        with open(checkpoint_path) as f:
            self.todo = json.load(f)


class PerStudyScheduler(FIFOScheduler):
    """FIFO for every trial, plus ASHA within each study that enables it (keyed by the trial's study)."""

    def __init__(self, studies: list[Study], stopped_early: set[str]):
        super().__init__()
        self._spec = TrialSpecs()
        self._asha: dict[str, AsyncHyperBandScheduler] = {}
        self._stopped_early = stopped_early
        for study in studies:
            asha = study.method.search.asha
            if asha is not None:
                self._asha[study.study_id] = AsyncHyperBandScheduler(
                    time_attr="epoch",
                    metric=study.objective,
                    mode=study.mode,
                    max_t=study.training.epochs,
                    grace_period=min(asha.grace_period, study.training.epochs),
                    reduction_factor=asha.reduction_factor,
                )

    def set_search_properties(self, metric, mode, **spec) -> bool:  # noqa: D102
        return True

    def _for(self, trial) -> AsyncHyperBandScheduler | None:
        return self._asha.get(self._spec(trial).study)

    def on_trial_add(self, tune_controller, trial) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._for(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        decision = asha.on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("epoch", 0) < self._spec(trial).training.epochs:
            self._stopped_early.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"FIFO with ASHA in {len(self._asha)} stud{'y' if len(self._asha) == 1 else 'ies'}."
