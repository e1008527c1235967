from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressor.errors import UsageError
from compressor.models import Step
from compressor.recipes import (
    RESERVED_STEMS,
    Variant,
    check_name,
    load_recipe,
    parse_recipe,
    parse_step,
    recipe_text,
    variant_name,
    variants_from_flags,
)


def test_step_strings_fill_the_positional_parameter() -> None:
    assert parse_step("quantize int8") == Step("quantize", {"mode": "int8"})
    assert parse_step("prune 0.8 epochs=2") == Step("prune", {"sparsity": "0.8", "epochs": "2"})
    assert parse_step("pq dsub=2 retrain=true") == Step("pq", {"dsub": "2", "retrain": "true"})


@pytest.mark.parametrize("text", ["", "pq 3", "quantize int8 fp16", "prune =3"])
def test_bad_step_strings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_step(text)


def test_flags_put_prune_before_each_quantize_mode() -> None:
    from compressor.specs import Param, Technique

    quantize = Technique("quantize", modes=("fp16", "int8"))
    prune = Technique("prune", params={"sparsity": Param(float, None)})
    variants = variants_from_flags([(quantize, ("fp16", "int8")), (prune, (0.5,))])
    assert [v.name for v in variants] == ["prune0.5-fp16", "prune0.5-int8"]
    assert [str(s) for s in variants[1].steps] == ["prune 0.5", "quantize int8"]
    assert variants_from_flags([]) == []


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
    from compressor.declarations import positional_param

    declared = positional_param(technique)
    if declared is not None:
        params = {declared: positional, **params}
    step = Step(technique, params, positional=declared)
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


@pytest.mark.parametrize("name", ["/abs/victim", "../x", "a/b", "a\\b", "..", ".hidden", "-x", "", "x" * 81,
                                  "a b", "best", "report", "recipe", "CON", "nul", "Com1", "original"])
def test_a_variant_name_must_be_one_safe_file_name(name: str) -> None:
    with pytest.raises(UsageError, match="variant name"):
        check_name(name)
    with pytest.raises(UsageError, match="variant name"):
        parse_recipe({"variants": {name: {"steps": ["quantize fp16"]}}})


def test_names_made_from_steps_are_always_valid_and_distinct() -> None:
    long_a = [Step("prune", {"sparsity": "0.5", "note": "a" * 300})]
    long_b = [Step("prune", {"sparsity": "0.5", "note": "a" * 299 + "b"})]
    names = [variant_name(steps) for steps in (long_a, long_b, [Step("_x", {})], [Step("best", {})])]
    assert all(check_name(name) == name for name in names)
    assert len(set(names)) == 4 and all(len(name) <= 80 for name in names)
    assert names[0].startswith("prune0.5-note") and variant_name([Step("quantize", {"mode": "int8"})]) == "int8"


def test_doubled_braces_are_literal_in_recipes() -> None:
    variants = parse_recipe({"variants": {"a": {"steps": ["pq note={{x}}", {"technique": "pq", "n": "}}{{"}]}}})
    assert variants[0].steps == (Step("pq", {"note": "{x}"}), Step("pq", {"n": "}{"}))


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_scalar = st.one_of(_text, st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False), st.sampled_from(["mm two", "0.5", "{s}", 'a"b', "x=y", ""]))
_param_values = st.one_of(_scalar, st.lists(_scalar, max_size=3))


@given(st.lists(st.tuples(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                       st.dictionaries(_text.filter(lambda key: key != "technique"), _param_values, max_size=3)),
             min_size=1, max_size=3)),
    min_size=1, max_size=3, unique_by=lambda variant: variant[0].replace(".", "_")))
def test_every_recipe_written_reads_back_as_the_same_variants(rows: list) -> None:
    """What search writes as recipe.toml: any steps, any parameter values, read back unchanged."""
    import tomllib

    variants = [Variant(name, tuple(Step(technique, params) for technique, params in steps))
                for name, steps in rows if name.replace(".", "_").lower() not in RESERVED_STEMS]
    if not variants:
        return
    assert parse_recipe(tomllib.loads(recipe_text(variants, "a comment\nwith\x00odd\tcharacters"))) == variants
