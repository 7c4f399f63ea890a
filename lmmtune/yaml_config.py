"""Config files read as plain data: `load_yaml_config`, for recipes and a run's saved config.

A YAML file may come from anyone (a recipe file, a run folder someone shared), so it is
checked before OmegaConf builds it: no tags of other types, and no aliases expanding past
MAX_YAML_VALUES."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

MAX_YAML_VALUES = 100_000
"""Values a YAML config may hold once its aliases are expanded (recipes hold about 50)."""
PLAIN_YAML_TAGS = {
    f"tag:yaml.org,2002:{kind}"
    for kind in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")
}
"""The tags plain YAML data resolves to; an explicit other tag (`!!python/...`) is refused."""


def load_yaml_config(path: Path, what: str = "config file"):
    """A YAML file as OmegaConf loads it, after checking it is plain data: no tags of
    other types and no aliases expanding past MAX_YAML_VALUES (a "billion laughs" of
    700 bytes expands to 10**9 values and OmegaConf would build them all). Refused in
    one line naming the file."""
    import yaml

    from lmmtune.errors import LmmtuneError

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if root is not None:
            _expanded_values(root, {}, set(), f"{what} {path}")
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LmmtuneError(f"{what} {path}{line}: not valid YAML ({reason})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LmmtuneError(f"{what} {path} cannot be read: {exc}") from None


def _expanded_values(node, sizes: dict, open_nodes: set, where: str) -> int:
    """How many values `node` holds with aliases expanded; LmmtuneError past the bound."""
    from lmmtune.errors import LmmtuneError

    if id(node) in sizes:
        return sizes[id(node)]
    line = node.start_mark.line + 1
    if node.tag not in PLAIN_YAML_TAGS:
        raise LmmtuneError(
            f"{where}, line {line}: the YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')} "
            "is refused (configs are plain data: text, numbers, lists and mappings)"
        )
    if id(node) in open_nodes:
        raise LmmtuneError(f"{where}, line {line}: an alias refers to itself; refused")
    open_nodes.add(id(node))
    children = node.value if isinstance(node.value, list) else []
    items = [
        part for child in children for part in (child if isinstance(child, tuple) else [child])
    ]
    size = 1 + sum(_expanded_values(item, sizes, open_nodes, where) for item in items)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise LmmtuneError(
            f"{where}, line {line}: its aliases expand to more than {MAX_YAML_VALUES:,} values "
            '(a "billion laughs"); refused'
        )
    sizes[id(node)] = size
    return size
