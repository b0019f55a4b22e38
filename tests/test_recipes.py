"""Recipes: every file passes the schema, its numbers add up to the size in its name, `lvllm recipes` lists and
shows them, and bad recipes or names fail with one clear line."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from lvllm_cli.app import app
from lvllm_runtime import recipes
from lvllm_runtime.errors import BadInput
from lvllm_runtime.model_shapes import ROUTED, from_config

RECIPE_FILES = sorted(recipes.RECIPES_DIR.glob("*.yaml"))
SEED_MODELS = {
    "gemma-4-26B-A4B-it", "NVIDIA-Nemotron-3-Super-120B-A12B-BF16", "Qwen3.5-35B-A3B", "Qwen3.5-122B-A10B",
    "Qwen3.5-397B-A17B", "Qwen3-Next-80B-A3B-Instruct", "Qwen3-Coder-30B-A3B-Instruct", "Qwen3-Coder-Next",
    "Qwen3-VL-30B-A3B-Instruct", "MiniMax-M2.5", "MiniMax-M2.1", "GLM-4.7", "GLM-4.7-Flash", "GLM-4.6V", "Kimi-K2.5",
}
runner = CliRunner()


def test_every_seed_model_has_a_recipe_tested_exactly_when_its_family_is():
    import test_plugin_archs
    import test_vllm_plugin

    served = set(test_plugin_archs.ARCHS) | set(test_vllm_plugin.ARCHS) | {"gpt_oss"}  # + tests/test_gpt_oss.py
    assert recipes.TESTED_FAMILIES == served
    names = {p.stem for p in RECIPE_FILES}
    assert SEED_MODELS <= names and "zoo-qwen3-moe" in names
    for name, r in recipes.load_recipes().items():
        assert (r.status == "tested") == (r.data["architecture"]["model_type"] in recipes.TESTED_FAMILIES), name


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_recipe_passes_schema_and_parses_as_a_shape(path):
    data = yaml.safe_load(path.read_text())
    jsonschema.validate(data, json.loads((recipes.RECIPES_DIR / "schema.json").read_text()))
    shape = from_config(data["architecture"])
    assert shape.moe_layers and shape.num_experts >= shape.top_k
    if data["expert_format"] == "int4":  # the group size must divide H and the expert slice of 1 and 2 nodes
        g = data["group_size"]
        assert shape.expert_hidden % g == 0 and (shape.expert_intermediate // 2) % g == 0, (path.stem, g)


def _active_params(shape) -> int:
    """Parameters one token touches: all but embeddings and unrouted experts."""
    dense = sum(t.numel * t.count for t in shape.tensors() if t.role not in (ROUTED, "embed", "extra"))
    if shape.tie_word_embeddings:
        dense += shape.vocab_size * shape.hidden_size
    return dense + shape.top_k * shape.expert_params * len(shape.moe_layers)


SIZED = [p for p in RECIPE_FILES if re.search(r"(\d+)B-A(\d+)B", p.stem)]


@pytest.mark.parametrize("path", SIZED, ids=[p.stem for p in SIZED])
def test_architecture_numbers_add_up_to_the_size_in_the_name(path):
    """A recipe named ...-80B-A3B must describe about 80B parameters of which about 3B are active per token."""
    total_b, active_b = map(int, re.search(r"(\d+)B-A(\d+)B", path.stem).groups())
    shape = from_config(yaml.safe_load(path.read_text())["architecture"])
    total, active = shape.params() / 1e9, _active_params(shape) / 1e9
    assert abs(total / total_b - 1) < 0.12, (total, total_b)
    assert abs(active / active_b - 1) < 0.35, (active, active_b)  # names round active params coarsely


def test_zoo_recipe_matches_the_demo_model(zoo):
    """The zoo recipe's numbers are the demo checkpoint's config.json numbers."""
    cfg = json.loads((zoo("qwen3_moe", "bf16") / "config.json").read_text())
    mine = from_config(recipes.get("zoo-qwen3-moe").data["architecture"])
    assert mine.tensors() == from_config(cfg).tensors()


def test_unknown_name_suggests_the_closest():
    with pytest.raises(BadInput) as e:
        recipes.get("qwen3-next-80b")
    assert "Qwen3-Next-80B-A3B-Instruct" in e.value.fix
    assert recipes.get("glm-4.7-flash").name == "GLM-4.7-Flash"


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.pop("served_name"), ("served_name",)),
    (lambda d: d["serving"].update(prefetch_window=0), ("serving/prefetch_window",)),
    (lambda d: d["architecture"].update(model_type="minimax_m2", num_local_experts=128, intermediate_size=768) or d.update(
        status="tested"), ("minimax_m2", "untested")),
    (lambda d: d["architecture"].update(model_type="llama"), ("llama",)),
])
def test_bad_recipe_is_one_clear_error(tmp_path, edit, words):
    data = yaml.safe_load((recipes.RECIPES_DIR / "Qwen3-Coder-30B-A3B-Instruct.yaml").read_text())
    edit(data)
    path = tmp_path / "Qwen3-Coder-30B-A3B-Instruct.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "schema.json").write_text((recipes.RECIPES_DIR / "schema.json").read_text())
    with pytest.raises(BadInput) as e:
        recipes.load_file(path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_lists_and_shows():
    res = runner.invoke(app, ["recipes", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {r["name"] for r in rows} == {p.stem for p in RECIPE_FILES}
    res = runner.invoke(app, ["recipes"])
    assert res.exit_code == 0 and "Kimi-K2.5" in res.output
    res = runner.invoke(app, ["recipes", "show", "NVIDIA-Nemotron-3-Super-120B-A12B-BF16"])
    assert res.exit_code == 0 and "# unverified" in res.output and "nemotron_h" in res.output
    res = runner.invoke(app, ["recipes", "show", "MiniMax-M2.1", "--json"])
    assert json.loads(res.stdout)["serving"]["tool_call_parser"] == "minimax_m2"
    res = runner.invoke(app, ["recipes", "show", "minimax"])
    assert res.exit_code != 0 and isinstance(res.exception, BadInput) and "MiniMax-M2.1" in res.exception.fix
