"""The published JSON Schema of ``artifact-metadata.json``: generated from the models, committed, loaded for checks.

``python -m telemetry schema`` prints the schema the models generate; ``--check`` exits 1 when the committed file
(``telemetry/schemas/artifact-metadata.schema.json``) differs from it, ``--write`` rewrites the committed file.
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

from .models import ArtifactMetadata

__all__ = ["SCHEMA_ID", "SCHEMA_PATH", "generate_schema", "load_schema", "register", "render_schema", "schema_drift"]

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


def _handle(args: argparse.Namespace) -> int:
    """Print, check or write the schema."""
    path = Path(args.schema_file) if args.schema_file else SCHEMA_PATH
    if args.check:
        problem = schema_drift(path)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{path} is up to date.")
        return 0
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_schema(), encoding="utf-8", newline="\n")
        _load.cache_clear()
        print(f"wrote {path}")
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
