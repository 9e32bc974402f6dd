"""Griffe extension of the docs build: the docstrings' transformers-style references, [`name`], become links.

The types in those docstrings (`name (`int`, *optional*)`, `` [`ValueError`]: ``) lose their Markdown, which the
API page would show literally in its type column.

A name is looked up where the docstring is (the class, its module), then in `hf_collapse` and its modules. A
name documented on the API page becomes a cross-reference to it; a name that exists but has no entry there (a
private helper, a class of another library: `[`~transformers.Trainer`]`) stays code. A name found nowhere is
handed to autorefs as a cross-reference all the same, so that `mkdocs build --strict` fails on it: a reference to
something that was renamed or removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from griffe import AliasResolutionError, CyclicAliasError, Extension, Module, Object

REFERENCE = re.compile(r"\[`(~?)([A-Za-z_][\w.]*)`\](?![\[(])")
# An entry of an `Args:` section, `name (`type`, *optional*, defaults to `x`): ...`: the type column shows the part
# in brackets as code, so its Markdown (backticks, emphasis, reference brackets) is dropped there.
ARGUMENT = re.compile(r"^(\s+[\w*][\w*, .]*?) \((.+)\):", re.MULTILINE)
# An entry of a `Returns:` or `Raises:` section, `` `ValueError`: ... ``, the same.
RESULT = re.compile(r"^(\s+)\[?`~?([\w.\[\], ]+)`\]?:", re.MULTILINE)
API_PAGE = Path(__file__).with_name("api.md")


def _lookup(scope: Object, dotted: str) -> Object | None:
    """The object `dotted` names from `scope` (aliases followed), or None."""
    obj = scope
    for part in dotted.split("."):
        try:
            if part not in obj.members:
                return None
            obj = obj.members[part]
            obj = obj.final_target if obj.is_alias else obj
        except (AliasResolutionError, CyclicAliasError):
            return None
    return obj


def _plain_type(match: re.Match) -> str:
    kind = re.sub(r"\[`~?(?:[\w]+\.)*([\w]+)`\]", r"\1", match[2])
    return f"{match[1]} ({kind.replace('`', '').replace('*', '')}):"


def _modules(module: Module):
    """The package first, then every module and subpackage in it."""
    yield module
    for sub in module.modules.values():
        yield from _modules(sub)


class DocstringCrossRefs(Extension):
    def on_package(self, *, pkg: Module, **kwargs) -> None:
        if pkg.name != "hf_collapse":
            return
        documented = self._documented(pkg)
        for obj in self._objects(pkg):
            if obj.docstring is not None:
                value = RESULT.sub(r"\1\2:", ARGUMENT.sub(_plain_type, obj.docstring.value))
                obj.docstring.value = REFERENCE.sub(lambda m: self._link(m, obj, pkg, documented), value)

    @staticmethod
    def _objects(obj: Object):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from DocstringCrossRefs._objects(member)

    @staticmethod
    def _documented(pkg: Module) -> dict[str, str]:
        """Canonical path → the identifier the API page renders it under, for each `:::` object and its members."""
        documented = {}
        for line in API_PAGE.read_text().splitlines():
            if line.startswith("::: hf_collapse."):
                identifier = line.split()[1]
                obj = _lookup(pkg, identifier.removeprefix("hf_collapse."))
                if obj is None:
                    continue  # mkdocstrings itself fails the build on it
                documented[obj.canonical_path] = identifier
                for name, member in obj.members.items():
                    if not name.startswith("_") and not member.is_alias and member.docstring is not None:
                        documented[member.canonical_path] = f"{identifier}.{name}"
        return documented

    @staticmethod
    def _link(match: re.Match, obj: Object, pkg: Module, documented: dict[str, str]) -> str:
        tilde, name = match.groups()
        text = name.rsplit(".", 1)[-1] if tilde else name
        if name.split(".")[0] not in ("hf_collapse", *pkg.members, *obj.module.members) and "." in name:
            return f"`{text}`"  # another library's object: no inventory of theirs to link to
        # Where the docstring is, then the package; a bare name may also be a function of another module.
        scopes = [s for s in (obj, obj.parent, obj.module, *_modules(pkg)) if s is not None]
        target = next((t for s in scopes if (t := _lookup(s, name.removeprefix("hf_collapse."))) is not None), None)
        if target is None:  # not found, or imported from another library (an alias griffe cannot follow)
            imported = any(s.members.get(name.split(".")[0]) is not None for s in scopes)
            return f"`{text}`" if imported else f"[`{text}`][{name}]"
        identifier = documented.get(target.canonical_path)
        return f"[`{text}`][{identifier}]" if identifier else f"`{text}`"
