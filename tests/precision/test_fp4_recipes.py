"""The recipe registry (every name, no import circles, no import side effects) and the FP4 recipes'
config: what they quantise, ``precision.attention``, and refusals."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import flax.linen as nn
import pytest

from fogjax import config_lib
from fogjax.precision import registry
from fogjax.precision.fp4_dot import Fp4DotGeneral
from fogjax.precision.fp4_recipes import Fp4Recipe, qaf_recipe
from fogjax.precision.fp8_dot import Fp8DotGeneral

PRECISION = pathlib.Path(registry.__file__).parent


def precision_imports() -> dict[str, set[str]]:
    """module -> the fogjax.precision modules it imports (module level and inside functions)."""
    graph = {}
    for path in PRECISION.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fogjax.precision":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "fogjax.precision."
            ):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps
    return graph


def test_precision_imports_form_no_circle():
    graph = precision_imports()
    assert "fp8_recipes" in graph["registry"] and "fp4_recipes" in graph["registry"]
    state: dict[str, str] = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError(f"import circle: {' -> '.join(trail + [node])}")
        if state.get(node) != "done":
            state[node] = "open"
            for dep in graph.get(node, ()):
                visit(dep, trail + [node])
            state[node] = "done"

    for module in graph:
        visit(module, [])


def test_importing_the_recipe_interface_registers_nothing_and_imports_no_recipe():
    code = (
        "import sys, fogjax.precision.recipe, fogjax.precision.fp8_recipes; "
        "print(sorted(m for m in sys.modules if m.startswith('fogjax.precision.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
        cwd=PRECISION.parent.parent, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )  # fmt: skip
    loaded = out.stdout.strip()
    assert "registry" not in loaded and "fp4" not in loaded, loaded


def test_registry_names_every_recipe():
    assert registry.available() == [
        "bf16",
        "fp8",
        "fp8_current",
        "fp8dpa",
        "fp8dpa_current",
        "mxfp4",
        "nvfp4",
    ]


def precision(**overrides):
    c = config_lib.get_config("fog_flash", "tiny").precision
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("name, block", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_recipes_quantise_linears_and_keep_attention_bf16(name, block):
    recipe = registry.make_recipe(precision(recipe=name))
    assert isinstance(recipe, Fp4Recipe) and recipe.quantizes_linears
    assert not recipe.quantizes_attention
    dot = recipe.linear_dot_general("dot")
    assert isinstance(dot, Fp4DotGeneral) and dot.fmt_name == name
    assert not isinstance(recipe.attention_dot_general("qk"), nn.Module)  # plain lax.dot_general
    assert qaf_recipe(recipe).backward == "bf16" and recipe.backward == "fp4"


def test_attention_fp8_gives_fp4_linears_fp8dpa_attention():
    recipe = registry.make_recipe(precision(recipe="nvfp4", attention="fp8", amax_history_len=16))
    assert recipe.quantizes_attention
    qk = recipe.attention_dot_general("qk")
    assert isinstance(qk, Fp8DotGeneral) and qk.amax_history_len == 16
    assert isinstance(recipe.linear_dot_general("dot"), Fp4DotGeneral)


def test_options_reach_the_dot_and_bad_values_fail_clearly():
    recipe = registry.make_recipe(
        precision(
            recipe="nvfp4",
            fp4_weight_2d=True,
            fp4_hadamard_wgrad=True,
            fp4_sr_gradients_only=True,
        )
    )
    dot = recipe.linear_dot_general("dot")
    assert dot.weight_2d and dot.hadamard_wgrad and not dot.sr_activations
    with pytest.raises(ValueError, match="precision.attention='fp16'"):
        registry.make_recipe(precision(recipe="nvfp4", attention="fp16"))
    with pytest.raises(ValueError, match="Unknown precision.recipe='fp3'"):
        registry.make_recipe(precision(recipe="fp3"))


def test_only_fp8_recipes_promise_fp8_linear_gemms_to_the_gpu_bench():
    """The deviceless bench flags block GEMMs that are not FP8 only where the recipe runs FP8
    GEMMs: FP4's emulation is BF16 GEMMs by design (a false alarm for nvfp4 before)."""
    expected = {"bf16": False, "nvfp4": False, "mxfp4": False}
    expected |= dict.fromkeys(("fp8", "fp8dpa", "fp8_current", "fp8dpa_current"), True)
    for name, fp8_gemms in expected.items():
        precision = config_lib.get_config("fog_flash", "tiny").precision
        precision.recipe = name
        recipe = registry.make_recipe(precision)
        assert recipe.runs_fp8_linear_gemms is fp8_gemms, name
        assert recipe.quantizes_linears is (name != "bf16"), name
