"""Load a profile's YAML config and validate it against config/schema.yaml.

Errors name the file and the offending key (dotted path), so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

from vclr.errors import VclrError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def _is_bad_name(error: jsonschema.ValidationError) -> bool:
    """A key whose NAME is not allowed (schema `propertyNames`)."""
    return "propertyNames" in error.relative_schema_path


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        if unknown:
            parts.append(unknown[0])
    if _is_bad_name(error):
        parts.append(str(error.instance))
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else ""
        parts.append(missing)
    return ".".join(parts) or "<top level>"


def _one_of_choices(schema: dict) -> str:
    names = [" + ".join(option.get("required", [])) for option in schema.get("oneOf", [])]
    return " or ".join(f"'{n}'" for n in names)


def load_schema(schema_path: str | Path = SCHEMA_PATH) -> dict:
    with open(schema_path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def validate_config(config: object, source: str, schema: dict | None = None) -> dict:
    """Raise VclrError naming `source` and the key of the first (deepest) schema violation."""
    schema = load_schema() if schema is None else schema
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(config))
    if errors:
        # An unknown key explains everything below it, so it wins; else the deepest error.
        unknown = [e for e in errors if e.validator == "additionalProperties" or _is_bad_name(e)]
        error = max(unknown or errors, key=lambda e: len(e.absolute_path))
        message = error.message
        if error.validator == "oneOf" and isinstance(error.instance, dict):
            message = f"needs exactly one of {_one_of_choices(error.schema)}"
        raise VclrError(f"{source}: key '{_key_path(error)}': {message}")
    return config  # type: ignore[return-value]


def load_config(path: str | Path) -> dict:
    """Read, parse and validate one config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VclrError(f"config file not found: {path}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise VclrError(f"{path}{where}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise VclrError(f"{path}: the config must be a mapping of keys, got {type(config).__name__}")
    return validate_config(config, str(path))


# Sections that only say how results are presented: editing them must not orphan the metrics records.
PRESENTATION_KEYS = ("report",)


def config_hash(config: dict) -> str:
    """Stable short hash of what a config makes the pipeline compute (key order and formatting do
    not matter; the presentation sections are left out)."""
    computed = {key: value for key, value in config.items() if key not in PRESENTATION_KEYS}
    canonical = json.dumps(computed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
