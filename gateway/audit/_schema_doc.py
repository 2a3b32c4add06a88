"""The record-schema section of ``gateway/audit/README.md``, generated from the JSON Schema.

    python -m gateway.audit._schema_doc          # rewrite the section in place

A test renders it again and compares, so the README cannot drift from ``record.schema.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA = Path(__file__).with_name("record.schema.json")
README = Path(__file__).with_name("README.md")
BEGIN = "<!-- record schema: generated from record.schema.json by gateway.audit._schema_doc -->"
END = "<!-- end of record schema -->"


def _resolve(node: dict, defs: dict) -> dict:
    while "$ref" in node:
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**defs[node["$ref"].rsplit("/", 1)[1]], **extra}
    return node


def _type(node: dict, defs: dict) -> str:
    ref = node.get("$ref", "")
    named = {"hex64": "hex SHA-256 (64 digits)", "index": "int", "count": "int",
             "status": "gRPC status name"}
    if ref.rsplit("/", 1)[-1] in named:
        return named[ref.rsplit("/", 1)[-1]]
    node = _resolve(node, defs)
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "anyOf" in node:
        return " or ".join(_type(n, defs) for n in node["anyOf"])
    types = node.get("type", "object")
    types = types if isinstance(types, list) else [types]
    words = {"integer": "int", "string": "string", "boolean": "bool", "null": "null",
             "object": "object", "array": "array"}
    return " or ".join(words[t] for t in types)


def _meaning(node: dict, defs: dict) -> str:
    text = node.get("description", "")
    node = _resolve(node, defs)
    if not text:
        text = node.get("description", "")
    if "anyOf" in node:
        node = next((_resolve(n, defs) for n in node["anyOf"] if "properties" in
                     _resolve(n, defs)), node)
    props = node.get("properties")
    if props:
        parts = [f"`{k}` ({_type(v, defs)}{'' if k in node.get('required', ()) else ', optional'})"
                 + (f": {v['description']}" if v.get("description") else "")
                 for k, v in props.items()]
        text = (text + ". " if text else "") + "; ".join(parts)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(definition: dict, defs: dict) -> list[str]:
    rows = ["| key | type | meaning |", "| --- | --- | --- |"]
    required = definition.get("required", ())
    for key, node in definition.get("properties", {}).items():
        optional = "" if key in required else " (optional)"
        rows.append(f"| `{key}`{optional} | {_type(node, defs)} | {_meaning(node, defs)} |")
    return rows


def render(schema: dict) -> str:
    """The README section for ``schema`` (markers included)."""
    defs = schema["$defs"]
    lines = [BEGIN, "", schema["description"], "", "Every record:", "", *_table(schema, defs)]
    for rule in schema["allOf"]:
        kind = rule["if"]["properties"]["kind"]["const"]
        definition = _resolve(rule["then"], defs)
        lines += ["", f"`{kind}`: {definition.get('description', '')}.", ""]
        lines += _table(definition, defs)
        for n, alternative in enumerate(definition.get("oneOf", ()), start=1):
            lines.append(f"\nForm {n}: " + ", ".join(f"`{k}`" for k in alternative["required"]))
    lines += ["", END]
    return "\n".join(lines)


def section(readme: str) -> str:
    """The generated section as it stands in ``readme`` (markers included)."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0:
        raise ValueError(f"{README} has no generated record-schema section")
    return readme[start:end + len(END)]


def main() -> int:
    readme = README.read_text(encoding="utf-8")
    fresh = render(json.loads(SCHEMA.read_text(encoding="utf-8")))
    README.write_text(readme.replace(section(readme), fresh), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
