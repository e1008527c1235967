from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressor.errors import UsageError
from compressor.models import Step
from compressor.recipes import load_recipe, parse_recipe, parse_step, variants_from_flags


def test_step_strings_fill_the_positional_parameter() -> None:
    assert parse_step("quantize int8") == Step("quantize", {"mode": "int8"})
    assert parse_step("prune 0.8 epochs=2") == Step("prune", {"sparsity": "0.8", "epochs": "2"})
    assert parse_step("pq dsub=2 retrain=true") == Step("pq", {"dsub": "2", "retrain": "true"})


@pytest.mark.parametrize("text", ["", "pq 3", "quantize int8 fp16", "prune =3"])
def test_bad_step_strings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_step(text)


def test_flags_put_prune_before_each_quantize_mode() -> None:
    variants = variants_from_flags(("fp16", "int8"), 0.5, False)
    assert [v.name for v in variants] == ["prune0.5-fp16", "prune0.5-int8"]
    assert [str(s) for s in variants[1].steps] == ["prune 0.5", "quantize int8"]
    assert variants_from_flags((), None, False) == []


def test_sweep_expands_into_one_variant_per_value() -> None:
    variants = parse_recipe({
        "variants": {
            "fp16": {"steps": ["quantize fp16"]},
            "sparse": {"steps": ["prune {s} epochs=1", {"technique": "quantize", "mode": "int8"}],
                       "sweep": {"s": [0.1, 0.5, 0.8]}},
        }
    })
    assert [v.name for v in variants] == ["fp16", "sparse-0.1", "sparse-0.5", "sparse-0.8"]
    assert variants[3].steps == (Step("prune", {"sparsity": "0.8", "epochs": "1"}),
                                 Step("quantize", {"mode": "int8"}))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "at least one"),
        ({"variants": {"a": {"steps": []}}}, "non-empty list"),
        ({"variants": {"a": {"steps": ["pq"], "sweep": {"s": [1]}}}}, "not used"),
        ({"variants": {"original": {"steps": ["pq"]}}}, "reserved"),
        ({"variants": {"a b": {"steps": ["pq"]}}}, "letters"),
        ({"variants": {"a": {"steps": ["pq"], "colour": 1}}}, "unknown key"),
        ({"backend": "onnx", "variants": {"a": {"steps": ["pq"]}}}, "unknown recipe key"),
        ({"variants": {"a": {"steps": ["prune {x}"]}}}, "no sweep values"),
    ],
)
def test_recipe_mistakes_are_explained(document: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_recipe(document)


@pytest.mark.parametrize(
    ("text", "position"),
    [('[variants.a]\nsteps = [pq]\n', "line 2, column 10"),
     ('[variants.a]\nsteps = ["pq"\n', "line 2, column 14")],
)
def test_toml_syntax_errors_give_line_and_column(tmp_path: Path, text: str, position: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_recipe(recipe)
    assert position in str(caught.value)
    assert str(caught.value).startswith(f"{recipe}: invalid TOML")


_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
_values = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(0, 1, allow_nan=False).map(lambda f: f"{f:g}"),
    st.sampled_from(["true", "false", "int8", "fp16"]),
)


@given(
    technique=st.sampled_from(["quantize", "prune", "pq", "custom"]),
    params=st.dictionaries(_names.filter(lambda n: n not in {"mode", "sparsity"}), _values, max_size=4),
    positional=_values,
)
def test_a_step_survives_printing_and_parsing(technique: str, params: dict, positional: str) -> None:
    from compressor.specs import POSITIONAL_PARAM

    if technique in POSITIONAL_PARAM:
        params = {POSITIONAL_PARAM[technique]: positional, **params}
    step = Step(technique, params)
    assert parse_step(str(step)) == step


@given(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True), min_size=1, max_size=3))
def test_sweeps_expand_to_the_cartesian_product(value_lists: list[list[int]]) -> None:
    keys = [f"k{i}" for i in range(len(value_lists))]
    step = "pq " + " ".join(f"{k}={{{k}}}" for k in keys)
    variants = parse_recipe({"variants": {"v": {"steps": [step], "sweep": dict(zip(keys, value_lists))}}})
    expected = 1
    for values in value_lists:
        expected *= len(values)
    assert len(variants) == expected == len({v.name for v in variants})


@given(st.text(max_size=200))
def test_the_recipe_parser_never_crashes_on_arbitrary_text(text: str) -> None:
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    with contextlib.suppress(UsageError):
        parse_recipe(document)
