"""The research bench (issue 5): the five papers' protocols as YAML recipes, a cached runner, and one report.

``recipe`` reads and validates a recipe, ``runner`` trains every entry through :func:`lungsight.train.train`
into ``BENCH/<recipe>/<entry>/`` run folders, and ``report`` gathers those folders into ``report.html`` and
``report.md`` beside the papers' own figures. See docs/bench.md.
"""

from lungsight.experiments.recipe import QUICK_PROFILE, Entry, Recipe, bundled_recipes, load_recipe, resolve_recipe_path
from lungsight.experiments.report import write_report
from lungsight.experiments.runner import run_recipe

__all__ = [
    "QUICK_PROFILE",
    "Entry",
    "Recipe",
    "bundled_recipes",
    "load_recipe",
    "resolve_recipe_path",
    "run_recipe",
    "write_report",
]
