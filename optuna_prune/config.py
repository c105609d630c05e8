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

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


SAMPLERS = ("evop", "levelswitch", "darwin", "sleb", "shortgpt", "random", "tpe", "exhaustive", "selfpruner")
SPACES = ("layers", "sublayers", "rates")
SUB_BLOCK_SAMPLERS = ("evop", "levelswitch", "sleb", "random", "tpe", "exhaustive")
FITNESS_NAMES = ("perplexity", "kl")
OBJECTIVE_MODES = ("mean", "worst", "clusters")
INVALID_MASK_POLICIES = ("repair", "reject")
DEFAULT_STORAGE = "sqlite:///runs/optuna_prune.db"
"""Where every command and every config in studies/ keep their studies unless given a storage."""
# Samplers that rank candidates by one loss: objective_mode "clusters" (several objectives) is refused.
SINGLE_OBJECTIVE_SAMPLERS = ("levelswitch", "darwin", "sleb", "selfpruner")
MAX_STUDY_NAME = 512  # RDB storages index study names of up to 512 characters


@dataclass
class SearchConfig:
    """A layer-drop search. Exactly one of ``sparsity`` (fraction of layers) or ``drop`` (count)."""

    model: str = "smollm2-135m"
    sparsity: float | None = None
    drop: int | None = None
    sampler: str = "evop"
    fitness: str = "perplexity"
    calibration: str = "pydoc"
    data_dir: str | None = None
    n_samples: int = 5
    seq_len: int = 2048
    ccds_clusters: int = 0
    objective_mode: str = "mean"
    seed: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    population: int | None = None
    # Multi-fidelity selection (evop, levelswitch; sleb when set): calibration samples after which a candidate
    # is ranked in its generation (SLEB: its greedy step); None: doubling counts below n_samples for evop and
    # levelswitch (pruners.default_stages), off for sleb; [] ("none"): off.
    fidelity: list[int] | None = None
    fidelity_keep: float = 0.5
    # darwin (training-aware selection): training tokens per stage, candidates entering each stage
    # (one more entry, ending at 1), the fine-tune's loss, learning rate and LoRA rank (0: full).
    train_tokens: list[int] = field(default_factory=lambda: [10_000, 50_000, 100_000, 200_000])
    survivors: list[int] = field(default_factory=lambda: [16, 8, 4, 2, 1])
    train_loss: str = "kl"
    lr: float = 1e-5
    lora: int = 0
    # selfpruner: the LLM that breeds candidates (local:<model> or an OpenAI-compatible http(s)://.../v1
    # endpoint), the served model name and the request timeout (s).
    llm: str = "local:smollm2-135m"
    llm_model: str | None = None
    llm_timeout: float = 60.0
    # "layers": drop whole decoder layers; "sublayers": drop attention and MLP blocks separately (the
    # sparsity counts the 2L blocks); "rates" (selfpruner): per-layer MLP width-pruning rates in
    # steps of 1/rate_resolution whose mean is the sparsity.
    space: str = "layers"
    rate_resolution: int = 16
    protect_ends: bool = True
    invalid_masks: str = "repair"
    seed_with: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    cache_mb: int = 1024
    heartbeat: int = 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and the fix."""
        if (self.sparsity is None) == (self.drop is None):
            raise ConfigError("give exactly one of --sparsity (fraction, e.g. 0.2) or --drop (layer count)")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity {self.sparsity} is out of range; use a fraction in (0, 1), e.g. 0.2")
        if self.drop is not None and self.drop < 1:
            raise ConfigError(f"drop {self.drop} must be at least 1 layer")
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("fitness", self.fitness, FITNESS_NAMES)
        _choice("objective_mode", self.objective_mode, OBJECTIVE_MODES)
        if self.objective_mode == "clusters" and self.sampler in SINGLE_OBJECTIVE_SAMPLERS:
            raise ConfigError(
                f"sampler {self.sampler} keeps one loss per candidate; objective_mode 'clusters' (one objective "
                f"per cluster) works with {', '.join(s for s in SAMPLERS if s not in SINGLE_OBJECTIVE_SAMPLERS)}: "
                "use --objective-mode mean or worst, or another --sampler"
            )
        _choice("invalid_masks", self.invalid_masks, INVALID_MASK_POLICIES)
        for name in self.seed_with:
            _choice("seed_with", name, ("sleb", "shortgpt"))
        if self.n_samples < 1 or self.seq_len < 2:
            raise ConfigError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {self.n_samples} x {self.seq_len})")
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
        if self.population is not None and self.population < 2:
            raise ConfigError(f"population {self.population} must be >= 2")
        if self.fidelity:
            self._validate_fidelity()
        if not 0 < self.fidelity_keep <= 1:
            raise ConfigError(f"fidelity_keep {self.fidelity_keep} must be a fraction in (0, 1], e.g. 0.5")
        if self.sampler == "darwin":
            self._validate_darwin()
        _choice("space", self.space, SPACES)
        if self.space == "sublayers" and (self.sampler not in SUB_BLOCK_SAMPLERS or "shortgpt" in self.seed_with):
            raise ConfigError(
                f"space = sublayers works with the samplers {', '.join(SUB_BLOCK_SAMPLERS)} and seed_with sleb; "
                f"not with {self.sampler if self.sampler not in SUB_BLOCK_SAMPLERS else 'seed_with shortgpt'}, "
                "which score or train whole layers"
            )
        if self.sampler == "selfpruner" or self.space == "rates":
            self._validate_selfpruner()
        if not 1 <= self.heartbeat <= 3600:
            raise ConfigError(f"heartbeat {self.heartbeat} is out of range; use 1 to 3600 seconds (default 20)")
        if self.batch_size < 1 or self.cache_mb < 0:
            raise ConfigError(f"batch_size must be >= 1 and cache_mb >= 0 (got {self.batch_size} and {self.cache_mb})")
        if self.device is not None or self.dtype is not None:
            from optuna_prune.devices import DeviceError, check_dtype, parse_device

            try:  # the spelling only: whether this machine has the device is checked where it is used
                if self.device is not None and self.device != "auto":
                    parse_device(self.device)
                check_dtype(self.dtype)
            except DeviceError as exc:
                raise ConfigError(str(exc)) from None

    def _validate_selfpruner(self) -> None:
        from optuna_prune.llm import make_llm

        try:  # builds a client: nothing is contacted or loaded
            make_llm(self.llm, self.llm_model, self.llm_timeout)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.space == "layers":
            return
        if self.sampler != "selfpruner" or self.drop is not None:
            raise ConfigError("space = rates needs sampler selfpruner and a --sparsity (mean MLP width pruned)")
        if self.fitness != "perplexity" or self.fidelity or self.seed_with:
            raise ConfigError("space = rates supports fitness perplexity only, without fidelity or seed_with")
        if not 2 <= self.rate_resolution <= 1024:
            raise ConfigError(f"rate_resolution {self.rate_resolution} is out of range; use 2 to 1024 (rates in steps of 1/N)")

    def fidelity_stages(self) -> tuple[int, ...]:
        """The multi-fidelity stages this search uses: ``fidelity``, or by default doubling counts
        (evop and levelswitch with one mean-loss objective; measured in benchmarks/multifidelity.py)."""
        from optuna_prune.pruners import default_stages

        if self.fidelity is not None:
            return tuple(self.fidelity)
        if self.sampler in ("evop", "levelswitch") and self.objective_mode == "mean":
            return default_stages(self.n_samples)
        return ()

    def _validate_fidelity(self) -> None:
        from optuna_prune.pruners import check_stages

        try:
            check_stages(self.fidelity, self.n_samples)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.objective_mode != "mean":
            raise ConfigError(
                f"fidelity stages rank running mean losses; objective_mode {self.objective_mode!r} "
                "needs fidelity = \"none\""
            )

    def _validate_darwin(self) -> None:
        from optuna_prune.samplers.darwin import check_survivors, stage_schedule
        from optuna_prune.training import TRAIN_LOSSES

        _choice("train_loss", self.train_loss, TRAIN_LOSSES)
        try:
            check_survivors(self.survivors)
            stage_schedule(self.train_tokens, self.seq_len, self.n_samples, self.fidelity)
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
        if self.objective_mode != "mean":
            raise ConfigError(f"darwin ranks one loss per candidate; objective_mode {self.objective_mode!r} needs mean")
        if not self.lr > 0 or self.lora < 0:
            raise ConfigError(f"lr {self.lr} must be > 0 and lora {self.lora} >= 0 (0: no LoRA)")

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
    known = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys: {sorted(known)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(data, origin=str(path))


def from_dict(data: dict[str, Any], origin: str = "config") -> SearchConfig:
    """Build a SearchConfig from plain values, turning type errors into ConfigError."""
    types = {f.name: f.type for f in fields(SearchConfig)}
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
