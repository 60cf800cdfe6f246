"""The published JSON Schema of ``artifact-metadata.json``: generated from the models, committed, loaded for checks.

``python -m telemetry schema`` prints the schema the models generate; ``--check`` exits 1 when the committed file
(``telemetry/schemas/artifact-metadata.schema.json``) differs from it, ``--write`` rewrites the committed file.

:func:`compile_schema` turns the committed schema into a pydantic-core validator for JSON text, keyword by keyword, so
files this package writes can be checked without running jsonschema over every scene (see ``validate.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import SchemaValidator, core_schema

from .models import ArtifactMetadata

__all__ = [
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "compile_schema",
    "compiled_schema",
    "generate_schema",
    "load_schema",
    "register",
    "render_schema",
    "schema_drift",
]

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "artifact-metadata.schema.json"
SCHEMA_ID = "urn:run-telemetry:artifact-metadata"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _ContractSchemaGenerator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: titles pydantic derives from the aliases ("Vrambeforemb") say less than the keys themselves."""
        return False


def generate_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) the models define for ``artifact-metadata.json``."""
    body = ArtifactMetadata.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_ContractSchemaGenerator
    )
    body["title"] = "Run Telemetry artifact-metadata.json"
    return {"$schema": _DIALECT, "$id": SCHEMA_ID, **body}


def render_schema(schema: dict[str, Any] | None = None) -> str:
    """``schema`` (default: the generated one) as the exact text of the committed file."""
    return json.dumps(generate_schema() if schema is None else schema, indent=2, ensure_ascii=False) + "\n"


@lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_schema(path: Path | None = None) -> dict[str, Any]:
    """The committed schema (a fresh copy each call, so callers may modify it)."""
    return copy.deepcopy(_load(path or SCHEMA_PATH))


def schema_drift(path: Path | None = None) -> str | None:
    """None when the schema file at ``path`` (default: committed) equals the generated one, else why not."""
    target = path or SCHEMA_PATH
    try:
        committed = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{target} does not exist; run `python -m telemetry schema --write`."
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{target} cannot be read as JSON: {exc}"
    if committed != generate_schema():
        return f"{target} differs from the schema the models generate; run `python -m telemetry schema --write`."
    return None


# --- the committed schema as a pydantic-core validator ----------------------------------------------------------------
#
# Each keyword the generated schema uses maps to a pydantic-core schema that accepts no more than jsonschema does
# (Draft 2020-12, no format assertion, which is how validate.py runs it):
#
#   type string / boolean / null        strict str / bool / None: no coercion from other JSON types
#   type integer (+ minimum)            strict int (ge): rejects 1.0, which jsonschema would take (stricter is safe)
#   type number (+ minimum)             strict float (ge): takes ints, not bools or strings, as jsonschema does
#   type array + items                  list of the items' schema
#   type object + properties, required  typed dict, each property validated when present, required ones required;
#     additionalProperties absent/true  other keys ignored (they are allowed and unconstrained)
#   enum of strings                     literal of those strings
#   anyOf                               union: valid when any branch is (left to right, first match wins)
#   $ref #/$defs/<name>                 a definition reference
#   title, description, default, format, $schema, $id, $defs: annotations only
#
# Any other keyword, or one of these in another form, raises ValueError: a schema change the compiler does not know
# must fail loudly (a test compiles the committed schema), never be skipped. The validator returns the JSON's values
# for the schema's properties only (numbers in number fields as floats); unknown keys are not even built.

_ANNOTATIONS = frozenset({"title", "description", "default", "format", "$schema", "$id", "$defs", "$comment"})
_SCALARS: dict[str, Any] = {
    "string": lambda: core_schema.str_schema(strict=True),
    "boolean": lambda: core_schema.bool_schema(strict=True),
    "null": core_schema.none_schema,
}
_TYPE_KEYWORDS = {
    "string": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
    "integer": frozenset({"minimum"}),
    "number": frozenset({"minimum"}),
    "array": frozenset({"items"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
}


def _compile_node(node: Any, where: str) -> core_schema.CoreSchema:
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a schema must be an object, found {node!r}")
    keywords = set(node) - _ANNOTATIONS
    if "$ref" in keywords:
        ref = node["$ref"]
        if keywords != {"$ref"} or not isinstance(ref, str) or not ref.startswith("#/$defs/"):
            raise ValueError(f"{where}: only a lone '$ref' to '#/$defs/<name>' is supported, found {node!r}")
        return core_schema.definition_reference_schema(ref.removeprefix("#/$defs/"))
    if "anyOf" in keywords:
        branches = node["anyOf"]
        if keywords != {"anyOf"} or not isinstance(branches, list) or not branches:
            raise ValueError(f"{where}: only a lone, non-empty 'anyOf' is supported, found {node!r}")
        # Acceptance does not depend on the order; try the cheap branches first.
        order = sorted(range(len(branches)), key=lambda i: _branch_cost(branches[i]))
        return core_schema.union_schema(
            [_compile_node(branches[i], f"{where}/anyOf/{i}") for i in order], mode="left_to_right"
        )
    if "enum" in keywords:
        values = node["enum"]
        if (
            not keywords <= {"enum", "type"}
            or node.get("type", "string") != "string"
            or not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            raise ValueError(f"{where}: only an 'enum' of strings (with type string) is supported, found {node!r}")
        return core_schema.literal_schema(list(values))
    if not keywords:
        return core_schema.any_schema()
    kind = node.get("type")
    if not isinstance(kind, str) or kind not in _TYPE_KEYWORDS:
        raise ValueError(f"{where}: unsupported schema {node!r}")
    extra = keywords - {"type"} - _TYPE_KEYWORDS[kind]
    if extra:
        raise ValueError(f"{where}: keyword(s) {sorted(extra)} with type {kind!r} are not supported")
    if kind in _SCALARS:
        return _SCALARS[kind]()
    if kind in ("integer", "number"):
        minimum = node.get("minimum")
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int | float)):
            raise ValueError(f"{where}: 'minimum' must be a number, found {minimum!r}")
        make = core_schema.int_schema if kind == "integer" else core_schema.float_schema
        return make(strict=True, ge=minimum)
    if kind == "array":
        items = node.get("items")
        return core_schema.list_schema(
            core_schema.any_schema() if items is None else _compile_node(items, f"{where}/items"), strict=True
        )
    properties = node.get("properties", {})
    required = node.get("required", [])
    if node.get("additionalProperties", True) is not True:
        raise ValueError(f"{where}: only 'additionalProperties': true is supported, found {node!r}")
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise ValueError(f"{where}: 'properties' must be an object and 'required' a list, found {node!r}")
    fields = {
        name: core_schema.typed_dict_field(
            _compile_node(sub, f"{where}/properties/{name}") if name in properties else core_schema.any_schema(),
            required=name in required,
        )
        for name, sub in [*properties.items(), *((n, None) for n in required if n not in properties)]
    }
    return core_schema.typed_dict_schema(fields, extra_behavior="ignore", strict=True)


def _branch_cost(node: Any) -> int:
    kind = node.get("type") if isinstance(node, dict) else None
    if kind in _SCALARS or kind in ("integer", "number"):
        return 0
    if kind == "object" and not node.get("properties") and not node.get("required"):
        return 1  # any object: nothing inside is built
    return 2


def compile_schema(schema: dict[str, Any]) -> SchemaValidator:
    """A validator for JSON text that accepts only what jsonschema accepts under ``schema`` (see the table above)."""
    definitions = schema.get("$defs", {})
    if not isinstance(definitions, dict):
        raise ValueError("'$defs' must be an object")
    compiled = []
    for name, node in definitions.items():
        entry = _compile_node(node, f"#/$defs/{name}")
        entry["ref"] = name
        compiled.append(entry)
    return SchemaValidator(core_schema.definitions_schema(_compile_node(schema, "#"), compiled))


@lru_cache(maxsize=1)
def compiled_schema() -> SchemaValidator:
    """The committed schema compiled by :func:`compile_schema` (built once)."""
    return compile_schema(_load(SCHEMA_PATH))


def _handle(args: argparse.Namespace) -> int:
    """Print, check or write the schema."""
    from .webhooks.events import event_schema_drift, write_event_schemas

    path = Path(args.schema_file) if args.schema_file else SCHEMA_PATH
    if args.check:
        problems = [p for p in (schema_drift(path),) if p] + ([] if args.schema_file else event_schema_drift())
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"{path} is up to date." + ("" if args.schema_file else " So are the webhook event schemas."))
        return 0
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_schema(), encoding="utf-8", newline="\n")
        _load.cache_clear()
        compiled_schema.cache_clear()
        print(f"wrote {path}")
        if not args.schema_file:
            for written in write_event_schemas():
                print(f"wrote {written}")
        return 0
    sys.stdout.write(render_schema())
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``schema`` sub-command."""
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema of artifact-metadata.json",
        description="Print the JSON Schema the models generate, or compare/write the committed copy.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed schema file is out of date")
    mode.add_argument("--write", action="store_true", help="rewrite the committed schema file")
    parser.add_argument(
        "--schema-file", metavar="PATH", help="schema file to check or write (default: the committed one)"
    )
    parser.set_defaults(func=_handle)
