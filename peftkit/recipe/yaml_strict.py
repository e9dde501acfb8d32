"""The YAML reader of recipes: YAML 1.2 booleans and no duplicate keys.

PyYAML follows YAML 1.1, where `yes`, `no`, `on` and `off` are booleans: `trust_remote_code: on`
would silently switch remote code on. Here only `true` / `false` are booleans (`on` stays the
string 'on', which a boolean field then refuses or reads as pydantic does). A key given twice in
one mapping is an error naming both lines, not "the last one wins".
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKeyError(
                    f"key {key!r} is given twice in the same section (lines {seen[key]} and {line}); "
                    "remove one"
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep)


_BOOL = "tag:yaml.org,2002:bool"
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load(text: str) -> Any:
    """Parse YAML text with `StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: builds no Python objects
