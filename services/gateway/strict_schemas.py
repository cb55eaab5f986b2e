"""Structured Outputs' rules for `strict` schemas (function parameters, `json_schema` response formats), checked
when they are given, as hosted refused them: every object sets `additionalProperties: false` and lists every
property in `required`, and the root is an object. The model could not enforce a schema that breaks them."""

from collections.abc import Sequence
from typing import Any

from gateway.errors import bad_request, echo

Path = tuple[str | int, ...]


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in node


def _children(node: dict[str, Any], path: Path) -> list[tuple[Any, Path]]:
    """The subschemas of `node` with their paths: properties, definitions, items, and the members of anyOf."""
    found: list[tuple[Any, Path]] = []
    for key in ("properties", "$defs", "definitions"):
        named = node.get(key)
        if isinstance(named, dict):
            found += [(child, (*path, key, name)) for name, child in named.items()]
    if isinstance(node.get("items"), dict):
        found.append((node["items"], (*path, "items")))
    for key in ("anyOf", "allOf"):
        members = node.get(key)
        if isinstance(members, list):
            found += [(child, (*path, key, i)) for i, child in enumerate(members)]
    return found


def root_problem(schema: Any) -> str | None:
    """What is wrong with a root that is not an object schema, in hosted's words, else None: function arguments
    are a JSON object, strict or not (hosted refused `{"type": "string"}` parameters at assistant creation)."""
    if isinstance(schema, dict) and schema and not _is_object(schema):
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{echo(schema.get('type'))}\"'."
    return None


def strict_schema_problem(schema: Any) -> str | None:
    """The first rule of strict mode that `schema` breaks, in hosted's words, else None."""
    if (problem := root_problem(schema)) is not None:
        return problem
    pending: list[tuple[Any, Path]] = [(schema, ())]
    while pending:
        node, path = pending.pop(0)
        if not isinstance(node, dict):
            continue
        if _is_object(node):
            if node.get("additionalProperties") is not False:
                return f"In context={path!r}, 'additionalProperties' is required to be supplied and to be false."
            properties = node.get("properties")
            required = node.get("required")
            listed = required if isinstance(required, list) else []
            missing = [key for key in properties if key not in listed] if isinstance(properties, dict) else []
            if missing:
                return (f"In context={path!r}, 'required' is required to be supplied and to be an array including "
                        f"every key in properties. Missing '{echo(missing[0])}'.")
        pending += _children(node, path)
    return None


def check_strict_functions(tools: Sequence[dict[str, Any]], param: str = "tools") -> None:
    """400 naming the first function whose parameters are not an object schema, or, strict, break a rule strict
    mode needs to enforce them."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type") == "function" else None
        if not function or function.get("parameters") is None:
            continue
        check = strict_schema_problem if function.get("strict") is True else root_problem
        problem = check(function["parameters"])
        if problem:
            raise bad_request(f"Invalid schema for function '{function['name']}': {problem}",
                              f"{param}[{i}].function.parameters", "invalid_function_parameters")


def check_strict_response_format(value: Any) -> None:
    """400 for a strict `json_schema` response format whose schema strict mode cannot enforce."""
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        return
    json_schema = value["json_schema"]
    if json_schema.get("strict") is not True or json_schema.get("schema") is None:
        return
    problem = strict_schema_problem(json_schema["schema"])
    if problem is not None:
        raise bad_request(f"Invalid schema for response_format '{json_schema['name']}': {problem}", "response_format",
                       "invalid_json_schema")
