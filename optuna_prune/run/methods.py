"""The search methods and spaces, each declared once; ``config``, the study code and the CLI read them.

Every method is one :class:`Method` in :data:`METHODS`: its name and one-line help, the spaces it
searches, its options (a frozen dataclass that checks itself), how it builds its sampler and
pruner, its objective if it needs its own, its default budget and how it seeds other searches.
Nothing outside this module compares a method's name. The spaces are :data:`SPACES` the same way.

Adding a method ``foo``:

1. write its sampler, ``optuna_prune/search/samplers/foo.py`` (search side: optuna and numpy only);
2. add one ``Method("foo", ...)`` to :data:`METHODS`, with a function building the sampler from
   ``(cfg, space, n_objectives)``. If it has options, give it a frozen options dataclass here
   (subclass :class:`MethodOptions`, or :class:`StagedOptions` for multi-fidelity selection) whose
   fields carry ``metadata={"help": ...}``: they become TOML keys, ``SearchConfig(...)`` keywords
   and CLI flags by themselves. Override ``pruner``, ``budget``, ``objective``, ``inputs`` or the
   seeding fields only where the method differs from the defaults.

This is the glue level: samplers and pruners are imported here; the parts that load torch (objectives,
fitnesses, training) only inside the functions that build them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import optuna

from optuna_prune.errors import ConfigError
from optuna_prune.model.llm import make_llm  # the LLM clients live on the model side
from optuna_prune.search.pruners import GenerationHalvingPruner, check_stages, default_stages
from optuna_prune.search.rate_space import RateSpace
from optuna_prune.search.record import LAYERS, RATES, SUB_BLOCKS, RecordedSpace
from optuna_prune.search.samplers import (
    EvoPSampler,
    ExhaustiveMaskSampler,
    LevelSwitchSampler,
    RandomMaskSampler,
    SelfPrunerSampler,
    SLEBSampler,
    sleb_result,
)
from optuna_prune.search.samplers.darwin import DarwinSampler, check_survivors, stage_schedule
from optuna_prune.search.space import LayerMaskSpace, SubBlockSpace, resolve_num_drop

if TYPE_CHECKING:
    from optuna_prune.run.config import SearchConfig

Sampler = optuna.samplers.BaseSampler


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --- options: what belongs to one method -----------------------------------------------------------


@dataclass(frozen=True)
class MethodOptions:
    """A method without options of its own (random, tpe, exhaustive, shortgpt)."""

    def check(self, cfg: SearchConfig) -> None:
        """ConfigError if these options do not fit the rest of ``cfg`` (calibration size, objective mode)."""

    def pruner_stages(self, cfg: SearchConfig) -> tuple[int, ...]:
        """Calibration-sample counts after which a candidate is ranked in its generation; () scores all."""
        return ()


_FIDELITY = ("multi-fidelity selection: comma list of calibration sample counts after which a candidate is "
             "ranked in its generation (sleb: its greedy step), e.g. 1,2; none: off")


@dataclass(frozen=True)
class StagedOptions(MethodOptions):
    """Multi-fidelity selection: a candidate is ranked in its generation (SLEB: its greedy step) after
    each ``fidelity`` count of calibration samples, and the better ``fidelity_keep`` share goes on."""

    fidelity: list[int] | None = field(default=None, metadata=_help(_FIDELITY + " (default off)"))
    fidelity_keep: float = field(default=0.5, metadata=_help(
        "fraction of a generation kept at each fidelity stage (0.5)"))
    stages_by_default: ClassVar[bool] = False
    """Without ``fidelity``: doubling counts below the search windows (measured in benchmarks/multifidelity.py)."""

    def __post_init__(self) -> None:
        if not 0 < self.fidelity_keep <= 1:
            raise ConfigError(f"fidelity_keep {self.fidelity_keep} must be a fraction in (0, 1], e.g. 0.5")

    def check(self, cfg: SearchConfig) -> None:
        if self.fidelity:
            _check_fidelity(self.fidelity, cfg)

    def pruner_stages(self, cfg: SearchConfig) -> tuple[int, ...]:
        if self.fidelity is not None:
            return tuple(self.fidelity)
        if self.stages_by_default and cfg.objective_mode == "mean":
            return default_stages(cfg.search_samples)
        return ()


def _check_fidelity(fidelity: Sequence[int], cfg: SearchConfig) -> None:
    try:
        check_stages(fidelity, cfg.search_samples)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.objective_mode != "mean":
        raise ConfigError(
            f"fidelity stages rank running mean losses; objective_mode {cfg.objective_mode!r} needs fidelity = \"none\""
        )


def _check_population(population: int | None) -> None:
    if population is not None and population < 2:
        raise ConfigError(f"population {population} must be >= 2")


@dataclass(frozen=True)
class EvoPOptions(StagedOptions):
    """EvoP: generations of ``population`` masks; multi-fidelity selection on by default."""

    fidelity: list[int] | None = field(default=None, metadata=_help(
        _FIDELITY + " (default: doubling counts below --n-samples with objective_mode mean)"))
    population: int | None = field(default=None, metadata=_help(
        "population size (default: the prunable layers, at least 10)"))
    stages_by_default: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_population(self.population)


@dataclass(frozen=True)
class LevelSwitchOptions(EvoPOptions):
    """EvoPress's (1 + lambda) level switch: ``population`` is lambda, the offspring per round."""

    population: int | None = field(default=None, metadata=_help("offspring per round, lambda (default 16)"))

    @property
    def offspring(self) -> int:
        return self.population or 16


@dataclass(frozen=True)
class SLEBOptions(StagedOptions):
    """SLEB's greedy removal; multi-fidelity selection only when ``fidelity`` is given."""

    protect_ends: bool = field(default=True, metadata=_help("never drop the first and last layer"))


@dataclass(frozen=True)
class SelfPrunerOptions(StagedOptions):
    """Self-Pruner: an LLM breeds the candidates of each generation."""

    population: int | None = field(default=None, metadata=_help("population size (default 10: one LLM call each)"))
    llm: str = field(default="local:smollm2-135m", metadata=_help(
        "the LLM: local:<model> (default local:smollm2-135m) or an OpenAI-compatible endpoint such as "
        "http://127.0.0.1:8000/v1"))
    llm_model: str | None = field(default=None, metadata=_help("model name served by the --llm endpoint"))
    llm_timeout: float = field(default=60.0, metadata=_help("seconds per LLM request (default 60)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_population(self.population)

        try:  # builds a client: nothing is contacted or loaded
            make_llm(self.llm, self.llm_model, self.llm_timeout)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def make_llm(self, device: str | None) -> Any:
        return make_llm(self.llm, self.llm_model, self.llm_timeout, device=device)


@dataclass(frozen=True)
class DarwinOptions(MethodOptions):
    """DarwinLM's training-aware selection: staged fine-tunes, ``survivors`` entering each stage."""

    train_tokens: list[int] = field(default_factory=lambda: [10_000, 50_000, 100_000, 200_000], metadata=_help(
        "training tokens per stage, comma list, e.g. 10000,50000,100000,200000"))
    survivors: list[int] = field(default_factory=lambda: [16, 8, 4, 2, 1], metadata=_help(
        "candidates entering each stage, then 1, e.g. 16,8,4,2,1"))
    train_loss: str = field(default="kl", metadata=_help("kl: distil the dense model; lm: LM loss"))
    lr: float = field(default=1e-5, metadata=_help("AdamW learning rate of the candidates' fine-tune (1e-5)"))
    lora: int = field(default=0, metadata=_help("LoRA rank of the fine-tune (0: train the kept layers; needs peft)"))
    fidelity: list[int] | None = field(default=None, metadata=_help(
        "calibration samples scored after each training stage but the last (default: doubling up to "
        "--n-samples)"))
    population: int | None = field(default=None, metadata=_help("must equal survivors[0], its offspring per round"))

    def __post_init__(self) -> None:
        from optuna_prune.model.training import TRAIN_LOSSES  # the fine-tune is model side (torch)

        if self.train_loss not in TRAIN_LOSSES:
            raise ConfigError(f"unknown train_loss {self.train_loss!r}; use one of {', '.join(TRAIN_LOSSES)}")
        try:
            check_survivors(self.survivors)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(self.survivors) != len(self.train_tokens) + 1:
            raise ConfigError(
                f"survivors {self.survivors} need one entry more than train_tokens {self.train_tokens} "
                "(the candidates entering each stage, then the 1 parent), e.g. 16,8,4,2,1 for 4 stages"
            )
        if self.population is not None and self.population != self.survivors[0]:
            raise ConfigError(
                f"darwin takes its offspring per round from survivors[0] = {self.survivors[0]}; "
                f"drop --population {self.population} or change --survivors"
            )
        if not self.lr > 0 or self.lora < 0:
            raise ConfigError(f"lr {self.lr} must be > 0 and lora {self.lora} >= 0 (0: no LoRA)")

    def check(self, cfg: SearchConfig) -> None:
        if self.fidelity:
            _check_fidelity(self.fidelity, cfg)
        try:
            stage_schedule(self.train_tokens, cfg.seq_len, cfg.n_samples, self.fidelity)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.objective_mode != "mean":
            raise ConfigError(f"darwin ranks one loss per candidate; objective_mode {cfg.objective_mode!r} needs mean")


# --- how each method builds its parts --------------------------------------------------------------


def _evop(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return EvoPSampler(space, population_size=cfg.options.population, seed=cfg.seed)


def _levelswitch(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return LevelSwitchSampler(space, offspring=cfg.options.offspring, seed=cfg.seed)


def _darwin(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    opts = cfg.options
    schedule = {"train_tokens": opts.train_tokens, "train_loss": opts.train_loss, "lr": opts.lr,
                "lora": opts.lora, "fidelity": opts.fidelity, "seq_len": cfg.seq_len}
    return DarwinSampler(space, survivors=opts.survivors, seed=cfg.seed, schedule=schedule)


def _selfpruner(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    llm = cfg.options.make_llm(cfg.device)
    return SelfPrunerSampler(space, llm, population_size=cfg.options.population, seed=cfg.seed)


def _sleb(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return SLEBSampler(space, protect_ends=cfg.options.protect_ends)


def _random_mask(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return RandomMaskSampler(space, seed=cfg.seed)


def _exhaustive(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return ExhaustiveMaskSampler(space)


def _tpe(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return optuna.samplers.TPESampler(seed=cfg.seed)


def _enqueued_only(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int) -> Sampler:
    return optuna.samplers.RandomSampler(seed=cfg.seed)  # never asked: the method's one mask is enqueued


def _no_pruner(cfg: SearchConfig, sampler: Sampler) -> optuna.pruners.BasePruner | None:
    return None


def _halving(cfg: SearchConfig, sampler: Sampler) -> optuna.pruners.BasePruner | None:
    """Successive halving within a generation (a greedy step for SLEB) when the options have stages."""
    return GenerationHalvingPruner(sampler, keep=cfg.options.fidelity_keep) if cfg.fidelity_stages() else None


def _survivor_pruner(cfg: SearchConfig, sampler: Sampler) -> optuna.pruners.BasePruner | None:
    return sampler.pruner()  # its stages are training stages, its survivors the keep


def _ten_generations(n_trials: int | None, sampler: Sampler) -> int | None:
    """n_trials, or ten generations of the sampler's population (20 without one)."""
    return n_trials if n_trials is not None else (getattr(sampler, "population_size", None) or 20) * 10


def _until_done(n_trials: int | None, sampler: Sampler) -> int | None:
    """n_trials, or None: the sampler stops the study by itself (SLEB, exhaustive)."""
    return n_trials


def _one_evaluation(n_trials: int | None, sampler: Sampler) -> int | None:
    return 1


def _darwin_objective(cfg: SearchConfig, fitness: Any, space: LayerMaskSpace, tokenizer: Any, inputs: Any) -> Any:
    # deferred: model side, training needs torch
    from optuna_prune.run.darwin_objective import make_darwin_objective

    return make_darwin_objective(cfg, fitness, space, tokenizer, inputs)


def _darwin_inputs(cfg: SearchConfig, calibration: Any, tokenizer: Any) -> Any:
    from optuna_prune.run.darwin_objective import darwin_training_windows  # model side: needs torch

    return darwin_training_windows(cfg, calibration, tokenizer)


def _shortgpt_mask(study: optuna.Study, influence: Sequence[float] | None, num_drop: int) -> tuple[int, ...]:
    from optuna_prune.model.importance import lowest  # model side (torch)

    assert influence is not None
    return lowest(influence, num_drop)


def _no_options(cfg: SearchConfig) -> dict[str, Any]:
    return {}


def _sleb_mask(study: optuna.Study, influence: Sequence[float] | None, num_drop: int) -> tuple[int, ...] | None:
    return sleb_result(study)


def _sleb_seed_run(cfg: SearchConfig) -> dict[str, Any]:
    """A seeding SLEB run ranks each greedy step's candidates on the vocabulary lower bounds of a quarter
    of the windows, then of half (on CCDS windows: two clusters, then one window per cluster), the
    better half going on each time; only the last survivors' exact losses are computed. SLEB's own
    early stop needs every window's layers, so this took 0.49-0.74 of its search time (SmolLM2 at 20%
    and 30%) and kept SLEB's path where ranking exact losses after 1 and 2 windows had left it (docs/results.md)."""
    stages = sorted({s for s in (cfg.search_samples // 4, cfg.search_samples // 2) if s >= 1})
    return {"fidelity": stages or None}


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One search method, everything a search needs to know of it."""

    name: str
    help: str
    sampler: Callable[[SearchConfig, LayerMaskSpace, int], Sampler]
    """Builds its sampler from the config, the space and the number of objectives (search side only)."""
    options: type[MethodOptions] = MethodOptions
    spaces: tuple[str, ...] = ("layers", "sublayers")
    single_objective: str | None = None
    """Why it ranks one loss per candidate (e.g. "keeps one parent"); None: any number of objectives."""
    pruner: Callable[[SearchConfig, Sampler], optuna.pruners.BasePruner | None] = _no_pruner
    budget: Callable[[int | None, Sampler], int | None] = _ten_generations
    """Its trials in the study from ``n_trials`` (None: the sampler stops by itself)."""
    objective: Callable[[SearchConfig, Any, LayerMaskSpace, Any, Any], Any] | None = None
    """Its own objective ``(cfg, fitness, space, tokenizer, inputs)``; None: the space's plain one."""
    inputs: Callable[[SearchConfig, Any, Any], Any] | None = None
    """What its objective needs beyond the calibration set ``(cfg, calibration, tokenizer)``, made before
    the study is created so that a refusal (e.g. too little training text) writes nothing."""
    seed: Callable[[optuna.Study, Sequence[float] | None, int], tuple[int, ...] | None] | None = None
    """The mask it gives another method to start from (``seed_with NAME``); None: it cannot seed."""
    seed_needs_run: bool = False
    """Its seed is the result of its own finished run in the study (SLEB): a search seeded with it
    runs it first (:func:`seed_runs`)."""
    seed_run_options: Callable[[SearchConfig], dict[str, Any]] = _no_options
    """The options its run gets when it runs to seed another method: only its final mask counts."""
    ccds_seed_with: tuple[str, ...] = ()
    """The methods whose masks it starts from by default on CCDS windows (``seed_with`` auto)."""
    needs_influence: bool = False
    """Its mask ranks layers by block influence, from the dense pass (ShortGPT)."""
    one_mask: bool = False
    """Its whole search is its seed mask, enqueued once (ShortGPT); its sampler proposes nothing."""
    generations_figure: bool = False
    """The layer-drop figure shows its generations (one method's, so they do not mix)."""
    validation_pick: bool = True
    """Its final mask may be picked among its top masks by validation loss (final_pick.py); not
    darwin's, whose candidates are scored after a fine-tune."""

    @property
    def option_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.options))

    def options_from(self, given: MethodOptions | None, flat: dict[str, Any]) -> MethodOptions:
        """This method's options from ``given`` (another method's on a change of sampler: the fields both
        share carry over) and flat keys (``population=20``: those of other methods are ignored)."""
        own = self.option_keys
        values = {} if given is None else {k: getattr(given, k) for k in own if hasattr(given, k)}
        values.update({k: v for k, v in flat.items() if k in own})
        return self.options(**values)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("evop", "EvoP's genetic algorithm over exact-k masks (CCDS clusters as objectives)", _evop,
           EvoPOptions, pruner=_halving, generations_figure=True, ccds_seed_with=("sleb",)),
    Method("levelswitch", "EvoPress's (1 + lambda) search by level switches", _levelswitch, LevelSwitchOptions,
           single_objective="keeps one parent", pruner=_halving),
    Method("darwin", "DarwinLM's level switches, judged after a staged fine-tune", _darwin, DarwinOptions,
           spaces=("layers",), single_objective="keeps one parent", pruner=_survivor_pruner,
           objective=_darwin_objective, inputs=_darwin_inputs, validation_pick=False),
    Method("sleb", "SLEB's greedy removal of one block at a time", _sleb, SLEBOptions,
           single_objective="is single-objective", pruner=_halving, budget=_until_done,
           seed=_sleb_mask, seed_needs_run=True, seed_run_options=_sleb_seed_run),
    Method("shortgpt", "ShortGPT's k layers of lowest block influence, one evaluation", _enqueued_only,
           spaces=("layers",), budget=_one_evaluation, seed=_shortgpt_mask, needs_influence=True,
           one_mask=True),
    Method("random", "random exact-k masks", _random_mask),
    Method("tpe", "Optuna's TPE over the mask params (repairs to exact k)", _tpe),
    Method("exhaustive", "every mask once (small spaces)", _exhaustive, budget=_until_done),
    Method("selfpruner", "Self-Pruner's generations, bred by an LLM", _selfpruner, SelfPrunerOptions,
           spaces=("layers", "rates"), single_objective="shows the LLM one loss per candidate",
           pruner=_halving),
)}


def method_of(name: str) -> Method:
    """The registered method ``name``, or ConfigError listing them."""
    if name not in METHODS:
        raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def option_types() -> dict[str, str]:
    """Every method option's key and its type name (as written in its dataclass): the flat keys a TOML
    file, ``SearchConfig(...)`` and the CLI accept beside the common ones."""
    types: dict[str, str] = {}
    for method in METHODS.values():
        for f in fields(method.options):
            types.setdefault(f.name, str(f.type))
    return types


def option_help(key: str) -> str:
    """The CLI help of option ``key``: each method that has it, with what it means there."""
    meanings: dict[str, list[str]] = {}
    for method in METHODS.values():
        for f in fields(method.options):
            if f.name == key:
                meanings.setdefault(f.metadata.get("help", ""), []).append(method.name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in meanings.items())


def owners(key: str) -> list[str]:
    """The methods that have option ``key``."""
    return [m.name for m in METHODS.values() if key in m.option_keys]


# --- spaces ---------------------------------------------------------------------------------------


def _layer_fitness(cfg: SearchConfig, model: Any, calibration: Any, sub_blocks: bool) -> Any:
    from optuna_prune.model.fitness import make_fitness  # model side

    return make_fitness(cfg.fitness, model, calibration, batch_size=cfg.batch_size,
                        cache_bytes=cfg.cache_mb << 20, sub_blocks=sub_blocks)


def _width_fitness(cfg: SearchConfig, model: Any, calibration: Any) -> Any:
    from optuna_prune.model.width import WidthFitness  # model side

    return WidthFitness(model, calibration, cfg.rate_resolution)


def _mask_objective() -> type:
    from optuna_prune.run.objective import MaskObjective  # glue: imports the fitness (torch)

    return MaskObjective


def _rate_objective() -> type:
    from optuna_prune.run.rate_objective import RateObjective  # glue: imports the fitness (torch)

    return RateObjective


def _check_rates(cfg: SearchConfig) -> None:
    if cfg.drop is not None:
        raise ConfigError("space = rates needs a --sparsity (mean MLP width pruned), not --drop")
    if cfg.fitness != "perplexity" or cfg.fidelity_stages() or cfg.seed_with:
        raise ConfigError("space = rates supports fitness perplexity only, without fidelity or seed_with")
    if not 2 <= cfg.rate_resolution <= 1024:
        raise ConfigError(f"rate_resolution {cfg.rate_resolution} is out of range; use 2 to 1024 (rates in steps of 1/N)")


@dataclass(frozen=True)
class SpaceKind:
    """What one kind of candidate is: how a config's sparsity becomes a space, what its units are
    called, and the fitness and objective class that score it."""

    name: str
    help: str
    unit: str
    build: Callable[[SearchConfig, int], LayerMaskSpace]
    fitness: Callable[[SearchConfig, Any, Any], Any]
    objective_class: Callable[[], type]
    total_units: Callable[[LayerMaskSpace], int] = lambda space: space.num_layers
    rounds_to_drop: bool = True
    """``--sparsity`` rounds to a count that ``--drop`` can give exactly (not for rates)."""
    verb: str = "dropping"
    check: Callable[[SearchConfig], None] = lambda cfg: None
    record: RecordedSpace = LAYERS
    """How a study's problem records it (see ``record.RecordedSpace``)."""
    validation_pick: bool = True
    """A study's top candidates of this kind can be rescored on validation windows (final_pick.py)."""


SPACES: dict[str, SpaceKind] = {s.name: s for s in (
    SpaceKind("layers", "drop decoder layers (default)", "layers",
              lambda cfg, n: LayerMaskSpace(n, resolve_num_drop(n, cfg.sparsity, cfg.drop)),
              lambda cfg, model, cal: _layer_fitness(cfg, model, cal, sub_blocks=False), _mask_objective),
    SpaceKind("sublayers", "drop attention and MLP blocks separately (--sparsity of the 2L blocks)",
              "attention/MLP blocks",
              lambda cfg, n: SubBlockSpace(n, resolve_num_drop(2 * n, cfg.sparsity, cfg.drop)),
              lambda cfg, model, cal: _layer_fitness(cfg, model, cal, sub_blocks=True), _mask_objective,
              record=SUB_BLOCKS),
    SpaceKind("rates", "per-layer MLP width-pruning rates with mean --sparsity", "MLP-width units",
              lambda cfg, n: RateSpace.for_sparsity(n, cfg.sparsity, resolution=cfg.rate_resolution),
              _width_fitness, _rate_objective, total_units=lambda space: space.n_layers * space.resolution,
              rounds_to_drop=False, verb="pruning", check=_check_rates, record=RATES,
              validation_pick=False),
)}


def space_of(name: str) -> SpaceKind:
    """The registered space ``name``, or ConfigError listing them."""
    if name not in SPACES:
        raise ConfigError(f"unknown space {name!r}; use one of {', '.join(SPACES)}")
    return SPACES[name]


def check_pairing(cfg: SearchConfig) -> None:
    """ConfigError unless the method and every ``seed_with`` method search ``cfg.space``, and the
    objective mode fits the method."""
    method = METHODS[cfg.sampler]
    if cfg.objective_mode == "clusters" and method.single_objective:
        raise ConfigError(
            f"sampler {cfg.sampler} keeps one loss per candidate; objective_mode 'clusters' (one objective "
            f"per cluster) works with {', '.join(m.name for m in METHODS.values() if not m.single_objective)}: "
            "use --objective-mode mean or worst, or another --sampler"
        )
    unfit = [m.name for m in (method, *(METHODS[n] for n in cfg.seed_with)) if cfg.space not in m.spaces]
    if unfit:
        fit = [m.name for m in METHODS.values() if cfg.space in m.spaces]
        seeders = [m.name for m in METHODS.values() if cfg.space in m.spaces and m.seed is not None]
        what = cfg.sampler if unfit[0] == cfg.sampler else f"seed_with {unfit[0]}"
        raise ConfigError(
            f"space = {cfg.space} works with the samplers {', '.join(fit)}"
            + (f" and seed_with {', '.join(seeders)}" if seeders else " without seed_with")
            + f"; not with {what}"
        )


def seeders() -> tuple[str, ...]:
    """The methods whose mask can seed another search (``seed_with``)."""
    return tuple(m.name for m in METHODS.values() if m.seed is not None)


def seed_methods(cfg: SearchConfig) -> list[tuple[str, Method]]:
    """The masks ``cfg``'s search is seeded with, in the order they are enqueued, each as its origin
    and the method that gives it: the method's own one mask (origin NAME) first, then ``seed_with``
    (origin ``seed:NAME``), those from the dense pass before those read from the study."""
    method = METHODS[cfg.sampler]
    own = [(method.name, method)] if method.one_mask else []
    others = [METHODS[n] for n in cfg.seed_with if not (method.one_mask and n == method.name)]
    return own + [(f"seed:{m.name}", m) for m in sorted(others, key=lambda m: not m.needs_influence)]


def seed_runs(cfg: SearchConfig) -> list[SearchConfig]:
    """The runs a search of ``cfg`` starts with, in the same study: each ``seed_with`` method whose seed
    is its own finished run (SLEB), with the options it seeds with and no budget or seeds of its own."""
    return [
        cfg.replace(sampler=m.name, seed_with=[], n_trials=None, **m.seed_run_options(cfg))
        for m in (METHODS[n] for n in cfg.seed_with) if m.seed_needs_run and m.name != cfg.sampler
    ]


def option_values(options: MethodOptions) -> dict[str, Any]:
    """The options as flat keys (the record and TOML spelling)."""
    return dataclasses.asdict(options)
