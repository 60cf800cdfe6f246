"""The validator's fast path: the committed schema compiled to pydantic-core accepts nothing jsonschema rejects, and
fast_check passes only runs validate_run finds nothing in; every broken variant still gets the full report."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic_core import SchemaValidator

from telemetry import validate
from telemetry.models import ArtifactMetadata
from telemetry.runs import metadata_json
from telemetry.schema import compile_schema, compiled_schema, load_schema
from telemetry.summary import render_summary
from telemetry.validate import fast_check, validate_run, validate_run_dir, validate_written_run

from .test_validate import CASES, write_run

JSONSCHEMA = jsonschema.validators.validator_for(load_schema())(load_schema())


def schema_errors(metadata: Any) -> list[str]:
    """What jsonschema finds in ``metadata`` as written to a file and read back, the way validate_run_dir reads it."""
    return [e.message for e in JSONSCHEMA.iter_errors(json.loads(metadata_json(metadata)))]


def compiled_accepts(validator: SchemaValidator, value: Any) -> bool:
    try:
        validator.validate_python(value)
    except ValueError:
        return False
    return True


# --- the compiler -----------------------------------------------------------------------------------------------


def test_the_committed_schema_compiles() -> None:
    assert isinstance(compiled_schema(), SchemaValidator)


@pytest.mark.parametrize(
    ("node", "named"),
    [
        ({"type": "string", "pattern": "^a"}, "pattern"),
        ({"type": "string", "maxLength": 3}, "maxLength"),
        ({"type": "integer", "maximum": 3}, "maximum"),
        ({"type": "integer", "exclusiveMinimum": 0}, "exclusiveMinimum"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 1}, "minItems"),
        ({"type": "object", "additionalProperties": False}, "additionalProperties"),
        ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties"),
        ({"type": "object", "patternProperties": {}}, "patternProperties"),
        ({"const": "a"}, "const"),
        ({"oneOf": [{"type": "string"}]}, "oneOf"),
        ({"allOf": [{"type": "string"}]}, "allOf"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": ["string", "null"]}, "string"),
        ({"enum": [1, 2]}, "enum"),
        ({"enum": ["a"], "type": "integer"}, "enum"),
        ({"$ref": "#/$defs/X", "type": "object"}, "$ref"),
        ({"$ref": "other.json#/X"}, "$ref"),
        ({"anyOf": []}, "anyOf"),
        ({"type": "number", "minimum": "0"}, "minimum"),
        ({"properties": {"a": {"type": "string"}}}, "properties"),
        (True, "must be an object"),
    ],
)
def test_a_keyword_the_compiler_does_not_know_fails_loudly(node: Any, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("$", r"\$")):
        compile_schema({"type": "object", "properties": {"x": node}})


# (schema, value, whether jsonschema takes it); the compiled validator must refuse whatever jsonschema refuses.
KEYWORD_CASES: list[tuple[dict[str, Any], Any, bool]] = [
    ({"type": "integer"}, 5, True),
    ({"type": "integer"}, 10**30, True),
    ({"type": "integer"}, 5.0, True),  # refused by the compiled validator: stricter is safe, validate_run decides
    ({"type": "integer"}, True, False),
    ({"type": "integer", "minimum": 0}, -1, False),
    ({"type": "number"}, 5, True),
    ({"type": "number"}, 2.5, True),
    ({"type": "number"}, float("inf"), True),
    ({"type": "number"}, float("nan"), True),
    ({"type": "number"}, False, False),
    ({"type": "number"}, "2.5", False),
    ({"type": "number", "minimum": 0}, -0.5, False),
    ({"type": "number", "minimum": 0}, float("nan"), True),  # NaN < 0 is false for jsonschema; refused here
    ({"type": "string"}, "a", True),
    ({"type": "string"}, 1, False),
    ({"type": "boolean"}, 0, False),
    ({"type": "null"}, None, True),
    ({"type": "null"}, 0, False),
    ({"type": "array", "items": {"type": "string"}}, ["a"], True),
    ({"type": "array", "items": {"type": "string"}}, ("a",), False),
    ({"type": "array", "items": {"type": "string"}}, ["a", 1], False),
    ({"enum": ["a", "b"]}, "b", True),
    ({"enum": ["a", "b"]}, "c", False),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 3, True),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 3.5, False),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, {"a": "x", "b": 1}, True),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, {"b": 1}, False),
    ({"type": "object", "properties": {"a": {"type": "string"}}}, {"a": None}, False),
    ({"type": "object", "required": ["a"]}, {"a": [1]}, True),
    ({}, {"anything": [1, None]}, True),
]
# Taken by jsonschema, refused by the compiled validator.
STRICTER = {(repr({"type": "integer"}), "5.0"), (repr({"type": "number", "minimum": 0}), "nan")}


@pytest.mark.parametrize(("node", "value", "taken"), KEYWORD_CASES)
def test_compiled_keywords_accept_no_more_than_jsonschema(node: dict[str, Any], value: Any, taken: bool) -> None:
    schema = {"type": "object", "properties": {"x": node}, "required": ["x"]}
    assert (not list(jsonschema.Draft202012Validator(schema).iter_errors({"x": value}))) is taken
    compiled = compiled_accepts(compile_schema(schema), {"x": value})
    assert compiled is (taken and (repr(node), repr(value)) not in STRICTER)


# --- the corpus of broken runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mutation", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_every_broken_variant_gets_the_full_report(
    tmp_path: Path, legacy_metadata: dict[str, Any], legacy_summary: str, mutation: Any, expected: str
) -> None:
    lines = legacy_summary.splitlines()
    mutation(legacy_metadata, lines)
    summary = "\n".join(lines) + "\n"
    assert fast_check(legacy_metadata, summary) is None
    if "(JSON Schema)" in expected:
        assert not compiled_accepts(compiled_schema(), legacy_metadata)
    run_dir = write_run(tmp_path / "run", legacy_metadata, summary)
    written = (run_dir / "artifact-metadata.json").read_bytes()
    report = validate_written_run(run_dir, legacy_metadata, written, summary)
    assert report == validate_run_dir(run_dir)
    assert not report.valid and any(expected in error for error in report.errors)


def test_the_good_runs_pass_the_fast_path(
    legacy_metadata: dict[str, Any], legacy_summary: str, package_run: ArtifactMetadata
) -> None:
    assert fast_check(legacy_metadata, legacy_summary) == 3
    data = package_run.to_json_dict()
    assert fast_check(data, render_summary(package_run)) == 2
    assert validate_run(data, render_summary(package_run)) == []


def test_files_that_differ_from_what_was_written_are_read_and_reported(
    tmp_path: Path, legacy_metadata: dict[str, Any], legacy_summary: str
) -> None:
    run_dir = write_run(tmp_path / "run", legacy_metadata, legacy_summary)
    good = (run_dir / "artifact-metadata.json").read_bytes()
    assert validate_written_run(run_dir, legacy_metadata, good, legacy_summary).valid
    broken = copy.deepcopy(legacy_metadata)
    broken["Scenes"][0]["Telemetry"]["GPU"]["Name"] = ""
    (run_dir / "artifact-metadata.json").write_text(json.dumps(broken), encoding="utf-8")
    # The good metadata in memory does not stand for a file that holds something else, even said to have passed.
    report = validate_written_run(run_dir, legacy_metadata, good, legacy_summary, passed=3)
    assert report == validate_run_dir(run_dir)
    assert report.errors == ["Scene scene-001: Telemetry.GPU.Name is blank"]
    (run_dir / "artifact-metadata.json").write_bytes(good)
    (run_dir / "run-summary.txt").write_text(legacy_summary.replace("sceneRetries=1", "sceneRetries=2"))
    report = validate_written_run(run_dir, legacy_metadata, good, legacy_summary, passed=3)
    assert report.errors == [
        "run-summary.txt Queue policy sceneRetries=2 does not match QueueConfig.SceneRetryBudget=1"
    ]
    (run_dir / "run-summary.txt").unlink()
    assert validate_written_run(run_dir, legacy_metadata, good, legacy_summary) == validate_run_dir(run_dir)


def test_the_full_path_runs_only_when_the_fast_one_does_not_pass(
    tmp_path: Path, legacy_metadata: dict[str, Any], legacy_summary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run(tmp_path / "run", legacy_metadata, legacy_summary)
    good = (run_dir / "artifact-metadata.json").read_bytes()
    full: list[Path] = []
    monkeypatch.setattr(validate, "validate_run_dir", lambda path: full.append(path) or validate_run_dir(path))
    assert validate_written_run(run_dir, legacy_metadata, good, legacy_summary).scene_count == 3
    assert validate_written_run(run_dir, legacy_metadata, good, legacy_summary, passed=3).scene_count == 3
    assert full == []
    assert validate_written_run(run_dir, legacy_metadata, good, legacy_summary, passed=None).valid
    assert full == [run_dir]  # a check that did not pass is never taken for a pass


# --- random variants: what the fast path passes, the full validator passes ----------------------------------------

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    7,
    -3,
    5.0,
    2.5,
    -0.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    2**80,
    "",
    " ",
    "x",
    "unbounded",
    "success",
    "timeout",
    "2026-01-01T00:00:00.000Z",
    "line\r\nbreak",
    "é😀",
    [],
    ["note"],
    [1, None],
    {},
    {"Name": "cpu"},
]


def all_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(all_paths(value, (*prefix, key)))
    return out


def random_variant(base: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    meta = copy.deepcopy(base)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        path = rng.choice(all_paths(meta))
        target = meta
        for key in path[:-1]:
            target = target[key]
        action = rng.random()
        if action < 0.15 and isinstance(target, dict):
            del target[path[-1]]
        elif action < 0.25 and isinstance(target, dict):
            target[f"Extra{rng.randrange(3)}"] = rng.choice(VALUES)  # unknown keys are allowed
        else:
            target[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return meta


def same_json(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("seed", range(4))
def test_random_variants_the_fast_path_passes_are_valid(
    seed: int, legacy_metadata: dict[str, Any], legacy_summary: str, package_run: ArtifactMetadata
) -> None:
    rng = random.Random(seed)
    bases = [(legacy_metadata, legacy_summary), (package_run.to_json_dict(), render_summary(package_run))]
    schema_passed = fast_passed = refused = 0
    for _ in range(400):
        base, summary = rng.choice(bases)
        meta = random_variant(base, rng)
        if compiled_accepts(compiled_schema(), meta):
            schema_passed += 1
            assert schema_errors(meta) == [], meta
            assert same_json(json.loads(metadata_json(meta)), meta)  # the file reads back as what was checked
        if fast_check(meta, summary) is not None:
            fast_passed += 1
            assert validate_run(json.loads(metadata_json(meta)), summary) == []
        else:
            refused += 1
    assert schema_passed > 50 and fast_passed > 30 and refused > 100  # both sides are exercised
