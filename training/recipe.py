"""Training recipes: a TOML file with run settings, an optional cross-encoder teacher and stages.

```toml
[run]
seed = 13
dev_fraction = 0.2          # seeded share of the judged queries held out for early stopping and gates
precision = "auto"          # bf16 where the hardware supports it
dev_corpus_limit = 0        # 0: search the whole corpus at each evaluation
sts_probe = ""              # an STS-B file for the out-of-domain probe ("" for none)

[diagnostics]               # failure-mode thresholds (training.diagnostics.Thresholds)
collapse_max_mean_cosine = 0.9

[teacher]                   # only for stages with negatives = "teacher"
model = ""                  # a trained cross-encoder folder; "" trains one first
loss = "listwise"

[[stage]]
name = "in-batch"
loss = "infonce"
```

Unknown keys are errors that name the section, so a typo never silently falls back
to a default. The shipped default recipe is `training/recipes/default.toml`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from training.diagnostics import Thresholds
from training.errors import InvalidInput
from training.stage import StageConfig
from training.typed_fields import check_fields

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "default.toml"


@dataclass(frozen=True)
class RunConfig:
    seed: int = 13
    dev_fraction: float = 0.2
    precision: str = "auto"
    dev_corpus_limit: int = 0
    train_probe: int = 100
    sts_probe: str = ""
    eval_batch_size: int = 64


@dataclass(frozen=True)
class TeacherConfig:
    """A cross-encoder teacher: a trained folder, or trained here from `init` (default: the packaged MiniLM)."""

    model: str = ""
    init: str = ""
    loss: str = "listwise"
    epochs: int = 1
    learning_rate: float = 3e-5
    batch_size: int = 16
    negatives: int = 7
    max_length: int = 320


@dataclass(frozen=True)
class Recipe:
    run: RunConfig
    stages: tuple[StageConfig, ...]
    teacher: TeacherConfig | None = None
    diagnostics: Thresholds = field(default_factory=Thresholds)
    source: str = ""


def _section(cls, data: object, where: str):
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be a table")
    check_fields(cls, data, where)
    return cls(**data)


def parse_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe's parsed TOML; errors are prefixed with `source`."""
    try:
        unknown = sorted(set(data) - {"run", "teacher", "diagnostics", "stage"})
        if unknown:
            raise InvalidInput(f"unknown sections {unknown}; a recipe has [run], [teacher], [diagnostics] and [[stage]]")
        stages_data = data.get("stage")
        if not isinstance(stages_data, list) or not stages_data:
            raise InvalidInput("a recipe needs at least one [[stage]]")
        stages = tuple(StageConfig.from_dict(stage) for stage in stages_data)
        teacher = _section(TeacherConfig, data["teacher"], "[teacher]") if "teacher" in data else None
        if any(stage.negatives == "teacher" for stage in stages) and teacher is None:
            teacher = TeacherConfig()
        run = _section(RunConfig, data.get("run", {}), "[run]")
        if not 0 < run.dev_fraction < 1:
            raise InvalidInput(f"[run]: dev_fraction must be between 0 and 1, got {run.dev_fraction}")
        diagnostics = _section(Thresholds, data.get("diagnostics", {}), "[diagnostics]")
        return Recipe(run=run, stages=stages, teacher=teacher, diagnostics=diagnostics, source=source)
    except InvalidInput as exc:
        raise InvalidInput(f"{source}: {exc}") from exc


def parse_recipe_text(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate a recipe given as TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{source}: invalid TOML ({exc})") from exc
    return parse_recipe(data, source)


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Read a recipe file (the shipped default when `path` is None)."""
    path = Path(path) if path else DEFAULT_RECIPE
    if not path.is_file():
        raise InvalidInput(f"{path}: no such recipe file")
    return parse_recipe_text(path.read_text(encoding="utf-8"), str(path))


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with Lockstep (`default`, `quick`, ...)."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.toml"))


def named_recipe(name: str) -> Recipe:
    """A shipped recipe by name."""
    if name not in shipped_recipes():
        raise InvalidInput(f"no shipped recipe named {name!r}; choose one of {', '.join(shipped_recipes())} or send TOML")
    return load_recipe(RECIPES_DIR / f"{name}.toml")
