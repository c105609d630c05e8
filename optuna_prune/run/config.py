"""What a search is asked to do: one dataclass, filled from a TOML file and/or CLI flags.

Validation lives here so that a bad value fails before any model is loaded or study is written.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from optuna_prune.errors import ConfigError
from optuna_prune.run.methods import (
    METHODS,
    Method,
    MethodOptions,
    check_pairing,
    method_of,
    option_types,
    owners,
    seeders,
    space_of,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SAMPLERS = tuple(METHODS)
FITNESS_NAMES = ("perplexity", "kl")
OBJECTIVE_MODES = ("mean", "worst", "clusters")
INVALID_MASK_POLICIES = ("repair", "reject")
# What --best means: the final pick by validation loss (final_pick.py; the best by search loss in a study
# without a validation split), or the best by search loss ("calibration").
PICK_BY = ("validation", "calibration")
DEFAULT_STORAGE = "sqlite:///runs/optuna_prune.db"
"""Where every command and every config in studies/ keep their studies unless given a storage."""
MAX_STUDY_NAME = 512  # RDB storages index study names of up to 512 characters


@dataclass(init=False)
class SearchConfig:
    """A layer-drop search. Exactly one of ``sparsity`` (fraction of layers) or ``drop`` (count).

    The fields are what every search has; ``options`` holds the method's own (a dataclass of
    :mod:`optuna_prune.run.methods`, e.g. ``EvoPOptions``). Keywords, TOML keys and CLI flags stay flat:
    ``SearchConfig(sampler="evop", population=20)`` routes ``population`` to ``options``, and reads
    such as ``cfg.population`` reach it too. A key of another method is ignored, as it always was;
    :meth:`replace` to another sampler carries over the options both methods have.
    """

    model: str = "smollm2-135m"
    sparsity: float | None = None
    drop: int | None = None
    sampler: str = "evop"
    fitness: str = "perplexity"
    calibration: str = "pydoc"
    data_dir: str | None = None
    n_samples: int = 8
    seq_len: int = 2048
    # Validation split: the last V of the n_samples windows are held out of the search; at its end the
    # final mask is picked among the pick_top best distinct masks by its loss on them (final_pick.py).
    # None: auto (auto_calibration), as are the CCDS clusters and seed_with; 0 (seed_with []) turns each off.
    validation_samples: int | None = None
    pick_top: int = 5
    ccds_clusters: int | None = None
    objective_mode: str = "mean"
    seed: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    # "layers": drop whole decoder layers; "sublayers": drop attention and MLP blocks separately (the
    # sparsity counts the 2L blocks); "rates" (selfpruner): per-layer MLP width-pruning rates in
    # steps of 1/rate_resolution whose mean is the sparsity.
    space: str = "layers"
    rate_resolution: int = 16
    invalid_masks: str = "repair"
    seed_with: list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    cache_mb: int = 1024
    heartbeat: int = 20
    options: MethodOptions = field(default_factory=MethodOptions)

    def __init__(self, *, options: MethodOptions | None = None, **values: Any) -> None:
        unknown = sorted(set(values) - COMMON_KEYS - set(option_types()))
        if unknown:
            raise TypeError(f"SearchConfig got unexpected keyword arguments {unknown}")
        for f in fields(self):
            if f.name != "options":
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                setattr(self, f.name, values.pop(f.name, default))
        method = METHODS.get(self.sampler)  # an unknown one is named by validate, in its turn
        self.options = method.options_from(options, values) if method else MethodOptions()
        # The auto fields get their value here; replace() leaves them auto, so a changed n_samples re-decides.
        self._auto = frozenset(name for name in AUTO_FIELDS if getattr(self, name) is None)
        if self._auto and method is not None and isinstance(self.n_samples, int):
            for name, value in auto_calibration(self).items():
                if name in self._auto:
                    setattr(self, name, value)
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A method option read flat (``cfg.population``), as before options had their own class."""
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in fields(options)}:
            return getattr(options, name)
        if name in option_types():
            raise AttributeError(
                f"{name} is an option of {', '.join(owners(name))}, not of sampler {self.__dict__.get('sampler')}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in option_types() and name not in COMMON_KEYS:
            raise AttributeError(f"{name} is a method option: use cfg.replace({name}=...)")
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and the fix."""
        if (self.sparsity is None) == (self.drop is None):
            raise ConfigError("give exactly one of --sparsity (fraction, e.g. 0.2) or --drop (layer count)")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity {self.sparsity} is out of range; use a fraction in (0, 1), e.g. 0.2")
        if self.drop is not None and self.drop < 1:
            raise ConfigError(f"drop {self.drop} must be at least 1 layer")
        method_of(self.sampler)
        _choice("fitness", self.fitness, FITNESS_NAMES)
        _choice("objective_mode", self.objective_mode, OBJECTIVE_MODES)
        _choice("invalid_masks", self.invalid_masks, INVALID_MASK_POLICIES)
        for name in self.seed_with:
            _choice("seed_with", name, seeders())
        if self.n_samples < 1 or self.seq_len < 2:
            raise ConfigError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {self.n_samples} x {self.seq_len})")
        if self.validation_samples:
            self._validate_validation()
        if self.ccds_clusters < 0:
            raise ConfigError(f"ccds_clusters {self.ccds_clusters} must be >= 0 (0 turns CCDS off)")
        if self.ccds_clusters and self.n_samples < self.ccds_clusters:
            raise ConfigError(
                f"CCDS with {self.ccds_clusters} clusters needs n_samples >= {self.ccds_clusters} "
                f"(got {self.n_samples}); raise --n-samples or lower --ccds-clusters"
            )
        if self.objective_mode != "mean" and not self.ccds_clusters:
            raise ConfigError(f"objective_mode {self.objective_mode!r} needs CCDS clusters; set --ccds-clusters K")
        if self.n_trials is not None and self.n_trials < 1:
            raise ConfigError(f"n_trials {self.n_trials} must be >= 1")
        if self.timeout is not None and not (0 < self.timeout < math.inf):
            raise ConfigError(f"timeout {self.timeout} must be a number of seconds > 0; omit --timeout for no time limit")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed} is out of range; use an integer in 0..{2**32 - 1}")
        if self.study is not None and (not self.study.strip() or len(self.study) > MAX_STUDY_NAME):
            raise ConfigError(
                f"study name of {len(self.study)} characters is {'empty' if not self.study.strip() else 'too long'}; "
                f"pass a --study name of 1 to {MAX_STUDY_NAME} characters"
            )
        space = space_of(self.space)
        check_pairing(self)
        self.options.check(self)
        space.check(self)
        if not 1 <= self.heartbeat <= 3600:
            raise ConfigError(f"heartbeat {self.heartbeat} is out of range; use 1 to 3600 seconds (default 20)")
        if self.batch_size < 1 or self.cache_mb < 0:
            raise ConfigError(f"batch_size must be >= 1 and cache_mb >= 0 (got {self.batch_size} and {self.cache_mb})")
        if self.device is not None or self.dtype is not None:
            # deferred: loads torch only when this runs
            from optuna_prune.model.devices import DeviceError, check_dtype, parse_device

            try:  # the spelling only: whether this machine has the device is checked where it is used
                if self.device is not None and self.device != "auto":
                    parse_device(self.device)
                check_dtype(self.dtype)
            except DeviceError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def method(self) -> Method:
        """The registered method this config searches with."""
        return METHODS[self.sampler]

    def fidelity_stages(self) -> tuple[int, ...]:
        """The multi-fidelity stages this search's pruner uses (the method's options decide)."""
        return self.options.pruner_stages(self)

    @property
    def search_samples(self) -> int:
        """The calibration windows the search scores masks on: all but the validation split."""
        return self.n_samples - self.validation_samples

    def _validate_validation(self) -> None:
        if not 0 <= self.validation_samples < self.n_samples:
            raise ConfigError(
                f"validation_samples {self.validation_samples} must be in 0..{self.n_samples - 1} (windows of the "
                f"{self.n_samples} calibration samples held out; 0: off); lower --validation-samples or raise --n-samples"
            )
        if self.ccds_clusters and self.search_samples < self.ccds_clusters:
            raise ConfigError(
                f"CCDS with {self.ccds_clusters} clusters needs {self.ccds_clusters} search windows, but "
                f"{self.n_samples} - {self.validation_samples} validation = {self.search_samples}; "
                "raise --n-samples or lower --validation-samples"
            )
        if not (self.method.validation_pick and space_of(self.space).validation_pick):
            raise ConfigError(
                "validation_samples picks among untrained layer masks: it works with space layers or sublayers "
                "and every sampler but darwin; set --validation-samples 0"
            )
        if self.pick_top < 1:
            raise ConfigError(f"pick_top {self.pick_top} must be >= 1 (masks scored on the validation windows)")

    def replace(self, **changes: Any) -> SearchConfig:
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._auto}
        return type(self)(**{**kept, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Flat plain values, as a study records them (and as TOML spells them)."""
        flat = dataclasses.asdict(self)
        flat.update(flat.pop("options"))
        return {k: v for k, v in flat.items() if v is not None}


COMMON_KEYS = frozenset(f.name for f in fields(SearchConfig)) - {"options"}
AUTO_FIELDS = ("validation_samples", "ccds_clusters", "seed_with")
AUTO_OFF: dict[str, Any] = {"validation_samples": 0, "ccds_clusters": 0, "seed_with": []}
"""What a record made before an auto field existed meant by its absence."""
AUTO_VALIDATION = (8, 2)
"""On random windows, from 8 on, hold 2 out for the final pick (robustness benchmark, docs/results.md)."""
AUTO_CLUSTERS = 4
"""CCDS clusters when the search keeps at least this many windows: one per cluster."""


def auto_calibration(cfg: SearchConfig) -> dict[str, Any]:
    """What ``None`` (auto) means for CCDS, the validation split and ``seed_with``, for this config.

    The defaults measured most robust across calibration draws (``benchmarks/robustness.py``): CCDS
    windows from 4 clusters, all of them searched, the method started from the masks it starts from
    on such windows (EvoP: SLEB's, SLEB ranking in stages); on random windows, from 8 on, the last 2
    held out to pick the final mask. Each turns itself off where it cannot work: too few windows, a
    method or space that does not pick among untrained layer masks (darwin, rates), or a space the
    seeding method does not search.
    """
    least, held = AUTO_VALIDATION
    validation, clusters = cfg.validation_samples, cfg.ccds_clusters
    if clusters is None:
        clusters = AUTO_CLUSTERS if cfg.n_samples - (validation or 0) >= AUTO_CLUSTERS else 0
    if validation is None:
        picks = cfg.method.validation_pick and space_of(cfg.space).validation_pick
        validation = held if picks and not clusters and cfg.n_samples >= least else 0
    seed_with = cfg.seed_with
    if seed_with is None:
        starts = [name for name in cfg.method.ccds_seed_with if cfg.space in METHODS[name].spaces]
        seed_with = starts if clusters else []
    return {"validation_samples": validation, "ccds_clusters": clusters, "seed_with": seed_with}


def known_keys() -> dict[str, str]:
    """Every flat key a config takes (common fields and every method's options) and its type name."""
    return {**{f.name: str(f.type) for f in fields(SearchConfig) if f.name != "options"}, **option_types()}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


def load_config(path: str | Path, **overrides: Any) -> SearchConfig:
    """Read a study config TOML (keys of SearchConfig at top level or under [search]).

    ``overrides`` (e.g. CLI flags that were given) win over the file; None values are ignored.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass the path of a .toml file, e.g. studies/smollm2-demo.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a folder; pass a .toml file in it, e.g. studies/smollm2-demo.toml") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data = data.get("search", data)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: [search] must be a table")
    known = known_keys()
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys: {sorted(known)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(data, origin=str(path))


def from_dict(data: dict[str, Any], origin: str = "config") -> SearchConfig:
    """Build a SearchConfig from plain values, turning type errors into ConfigError."""
    types = known_keys()
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(f"{origin}: unknown key {key!r}")
        clean[key] = _coerce(key, value, str(types[key]), origin)
    return SearchConfig(**clean)


def _coerce(key: str, value: Any, type_name: str, origin: str) -> Any:
    if value is None:
        return None
    try:
        if type_name.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise TypeError
        if type_name.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if type_name.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if type_name.startswith("list"):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if type_name.startswith("list[int]"):
                return [] if items == ["none"] else [_coerce(key, v, "int", origin) for v in items]
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise TypeError
            return list(items)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {key} = {value!r} is not a valid {type_name}") from None


def from_record(data: dict[str, Any], origin: str) -> SearchConfig:
    """A config as a study recorded it (:meth:`SearchConfig.to_dict`), by this version or an older one.

    Records are flat; older ones hold every method's options, of which the study's method takes its
    own. Keys this version no longer knows are dropped, so an old study still resumes. Records hold
    the auto fields' values since they exist; one without them was made when they were off (0).
    """
    known = known_keys()
    return from_dict({**AUTO_OFF, **{k: v for k, v in data.items() if k in known}}, origin=origin)
