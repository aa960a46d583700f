"""Experiment recipes: one YAML file per paper, read and checked before anything is trained.

A recipe names a dataset (a folder under the ``--data`` root), the cross-validation set-up, the slice -> patient
rules to report, shared training settings (``defaults``) and a list of ``entries`` (one model or X-ray scheme
each, overriding any default). ``data_differs`` says where our data or set-up departs from the paper's and
``paper_figures`` holds the paper's headline numbers; the report prints both. Every problem is one line naming
the file and the offending key, raised as :class:`~lungsight.errors.InputError`.

Bundled recipes live in ``lungsight/experiments/recipes/``; ``recipes/paper-000.yaml`` (or just ``paper-000``)
resolves there when no such file exists in the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungsight.errors import InputError, ModelError
from lungsight.inference.rules import RULES
from lungsight.models.registry import get_spec
from lungsight.preprocess.transforms import AUGMENTATIONS
from lungsight.preprocess.xray import SCHEMES

BUNDLED = Path(__file__).parent / "recipes"

#: The ``--quick`` profile: every entry on a patient subset, 2 folds, 2 epochs, small inputs (a recipe or an
#: entry may raise ``input_size`` in its own ``quick`` mapping where an architecture needs more pixels).
QUICK_PROFILE: dict[str, Any] = {"folds": 2, "epochs": 2, "input_size": 64, "max_patients": 40, "patience": 2}

#: Training settings an entry (or ``defaults``) may set, with their types; they map onto ``TrainConfig``.
TRAIN_KEYS: dict[str, type | tuple[type, ...]] = {
    "input_size": int,
    "optimizer": str,
    "lr": (int, float),
    "batch_size": int,
    "epochs": int,
    "augment": str,
    "pretrained": str,
    "scheduler": str,
    "patience": int,
    "min_epochs": int,
    "weight_decay": (int, float),
    "scheme": str,
    "max_patients": int,
}
_CHOICES = {
    "optimizer": ("adamw", "adam", "nadam", "sgd"),
    "augment": AUGMENTATIONS,
    "pretrained": ("none", "imagenet"),
    "scheduler": ("cosine", "onecycle", "plateau"),
    "scheme": SCHEMES,
}
_QUICK_KEYS = {"folds": int, "epochs": int, "input_size": int, "max_patients": int, "patience": int}
_TOP_REQUIRED = ("name", "paper", "title", "task", "dataset", "preprocessing", "entries")
_TOP_OPTIONAL = (
    "folds",
    "seed",
    "rules",
    "primary_rule",
    "slice_threshold",
    "consecutive_n",
    "extra_datasets",
    "defaults",
    "quick",
    "data_differs",
    "paper_figures",
)
_ENTRY_KEYS = ("name", "model", "notes", "quick", *TRAIN_KEYS)
_FIGURE_KEYS = ("metric", "value", "level", "note", "entry")  # entry: ours to compare (default: the first)


@dataclass(frozen=True)
class Entry:
    """One model (or X-ray scheme) of a recipe with its resolved training settings."""

    name: str
    model: str
    settings: dict[str, Any]
    quick: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring); ``source`` is the file it was read from."""

    name: str
    paper: str
    title: str
    task: str
    dataset: str
    preprocessing: str
    entries: list[Entry]
    source: Path
    folds: int = 5
    seed: int = 0
    rules: list[str] = field(default_factory=lambda: ["threshold-0", "threshold-10"])
    primary_rule: str = "threshold-10"
    slice_threshold: float = 0.5
    consecutive_n: int = 15
    extra_datasets: list[str] = field(default_factory=list)
    quick: dict[str, Any] = field(default_factory=dict)
    data_differs: list[str] = field(default_factory=list)
    paper_figures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``recipe.json``)."""
        from dataclasses import asdict

        return asdict(self) | {"source": str(self.source)}


def bundled_recipes() -> list[Path]:
    """The recipes shipped with lungsight, in paper order."""
    return sorted(BUNDLED.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """``path`` if it is a file; else the bundled recipe of the same name (``recipes/paper-000.yaml``,
    ``paper-000.yaml`` and ``paper-000`` all name the bundled paper-000)."""
    p = Path(path)
    if p.is_file():
        return p
    candidate = BUNDLED / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if candidate.is_file():
        return candidate
    names = ", ".join(b.stem for b in bundled_recipes())
    raise InputError(f"{path}: recipe not found (bundled recipes: {names})")


def _check_type(where: str, key: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where}: {key!r} must be {names}, got {value!r}")


def _check_settings(where: str, settings: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    for key, value in settings.items():
        if key not in allowed:
            raise InputError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        _check_type(where, key, value, allowed[key])
        if key in _CHOICES and value not in _CHOICES[key]:
            raise InputError(f"{where}: {key} {value!r} is not one of {', '.join(_CHOICES[key])}")
        if isinstance(value, int | float) and key != "weight_decay" and value <= 0:
            raise InputError(f"{where}: {key} must be positive, got {value!r}")
    return dict(settings)


def _mapping(where: str, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: {key!r} must be a mapping, got {type(value).__name__}")
    return value


def _entry(where: str, raw: Any, defaults: dict[str, Any], task: str) -> Entry:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: each entry must be a mapping with at least 'name' and 'model'")
    for key in raw:
        if key not in _ENTRY_KEYS:
            raise InputError(f"{where}: unknown key {key!r}; allowed: {', '.join(_ENTRY_KEYS)}")
    for key in ("name", "model"):
        if key not in raw:
            raise InputError(f"{where}: missing required key {key!r}")
        _check_type(where, key, raw[key], str)
    where = f"{where} ({raw['name']})"
    if not raw["name"].replace("-", "").replace("_", "").isalnum():
        raise InputError(f"{where}: entry name must be letters, digits, '-' or '_' (it names the run folder)")
    try:
        get_spec(raw["model"])
    except ModelError as exc:
        raise InputError(f"{where}: {exc}") from None
    own = {k: v for k, v in raw.items() if k in TRAIN_KEYS}
    settings = _check_settings(where, defaults | own, TRAIN_KEYS)
    if "scheme" in settings and task != "cxr":
        raise InputError(f"{where}: 'scheme' is an X-ray setting; this recipe's task is {task}")
    quick = _check_settings(where, _mapping(where, "quick", raw.get("quick")), _QUICK_KEYS)
    notes = raw.get("notes", "")
    _check_type(where, "notes", notes, str)
    return Entry(raw["name"], raw["model"], settings, quick, notes)


def _figures(where: str, raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InputError(f"{where}: 'paper_figures' must be a list of {{metric, value, level, note}}")
    out = []
    for fig in raw:
        if not isinstance(fig, dict) or "metric" not in fig or "value" not in fig:
            raise InputError(f"{where}: each paper figure needs 'metric' and 'value', got {fig!r}")
        unknown = [k for k in fig if k not in _FIGURE_KEYS]
        if unknown:
            raise InputError(
                f"{where}: unknown key {unknown[0]!r} in paper_figures; allowed: {', '.join(_FIGURE_KEYS)}"
            )
        out.append(dict(fig))
    return out


def _strings(where: str, key: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise InputError(f"{where}: {key!r} must be a list of strings")
    return list(raw)


def parse_recipe(data: Any, source: Path) -> Recipe:
    """Validate the parsed YAML ``data`` of ``source`` and return the :class:`Recipe`."""
    where = str(source)
    if not isinstance(data, dict):
        raise InputError(f"{where}: a recipe is a YAML mapping of keys ({', '.join(_TOP_REQUIRED)} ...)")
    for key in data:
        if key not in _TOP_REQUIRED + _TOP_OPTIONAL:
            raise InputError(f"{where}: unknown key {key!r}; allowed: {', '.join(_TOP_REQUIRED + _TOP_OPTIONAL)}")
    for key in _TOP_REQUIRED:
        if key not in data:
            raise InputError(f"{where}: missing required key {key!r}")
    for key in ("name", "paper", "title", "task", "dataset", "preprocessing"):
        _check_type(where, key, data[key], str)
    task = data["task"]
    if task not in ("ct", "cxr"):
        raise InputError(f"{where}: task {task!r} is not one of ct, cxr")
    rules = _strings(where, "rules", data.get("rules", ["threshold-0", "threshold-10"]))
    primary = data.get("primary_rule", rules[0] if rules else "threshold-10")
    for rule in [*rules, primary]:
        if rule not in RULES:
            raise InputError(f"{where}: unknown rule {rule!r}; choose from {', '.join(RULES)}")
    scalars = {"folds": (int, 5), "seed": (int, 0), "consecutive_n": (int, 15), "slice_threshold": ((int, float), 0.5)}
    values = {}
    for key, (kind, default) in scalars.items():
        values[key] = data.get(key, default)
        _check_type(where, key, values[key], kind)
    if values["folds"] < 2:
        raise InputError(f"{where}: folds must be at least 2 (the bench reports cross-validation)")
    if not 0 < values["slice_threshold"] < 1:
        raise InputError(f"{where}: slice_threshold must lie between 0 and 1")
    defaults = _check_settings(where, _mapping(where, "defaults", data.get("defaults")), TRAIN_KEYS)
    raw_entries = data["entries"]
    if not isinstance(raw_entries, list) or not raw_entries:
        raise InputError(f"{where}: 'entries' must be a non-empty list")
    entries = [_entry(f"{where}: entry {i + 1}", e, defaults, task) for i, e in enumerate(raw_entries)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise InputError(f"{where}: entry names must be unique, got {', '.join(names)}")
    figures = _figures(where, data.get("paper_figures"))
    for fig in figures:
        if fig.get("entry", names[0]) not in names:
            raise InputError(
                f"{where}: paper figure {fig['metric']!r} names entry {fig['entry']!r}, not in this recipe"
            )
    return Recipe(
        name=data["name"],
        paper=data["paper"],
        title=data["title"],
        task=task,
        dataset=data["dataset"],
        preprocessing=data["preprocessing"],
        entries=entries,
        source=source,
        rules=rules,
        primary_rule=primary,
        extra_datasets=_strings(where, "extra_datasets", data.get("extra_datasets")),
        quick=_check_settings(where, _mapping(where, "quick", data.get("quick")), _QUICK_KEYS),
        data_differs=_strings(where, "data_differs", data.get("data_differs")),
        paper_figures=figures,
        **values,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (or a bundled recipe by name, see :func:`resolve_recipe_path`)."""
    import yaml

    source = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{source}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from None
    return parse_recipe(data, source)
