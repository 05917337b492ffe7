"""The base of every typed config section (unknown keys are errors, values are validated) and the
YAML reader of configs and command-line values."""
from __future__ import annotations

import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# a random seed: what torch.manual_seed and NumPy take (a larger one overflowed inside them)
Seed = Annotated[int, Field(ge=0, lt=2**63)]
PATH_BYTES = 4000      # under Linux's PATH_MAX (4096), leaving room for the file names a run adds


def check_path(text: str) -> str:
    """``text`` if it can be a path here, else a ValueError saying why: a NUL byte (which the OS
    refuses: a ValueError deep inside), a line break (legal, but it split our one-line messages),
    more bytes than the OS takes (an OSError at the first write), or a ``~user`` prefix naming no
    user (a RuntimeError from ``expanduser``)."""
    if "\0" in text:
        raise ValueError("holds a NUL byte, which no path can hold: retype it")
    if "\n" in text or "\r" in text:
        raise ValueError("holds a line break: give the path on one line")
    if len(os.fsencode(text)) > PATH_BYTES:
        raise ValueError(f"is {len(os.fsencode(text)):,} bytes long, more than paths may be: shorten it")
    try:
        Path(text).expanduser()
    except RuntimeError:
        raise ValueError(f"starts with '{text.split('/')[0]}', and no such user has a home folder here: write the "
                         "path in full") from None
    return text


# a config value that is a file or folder path
PathText = Annotated[str, AfterValidator(check_path)]


def takes_a_number(annotation) -> bool:
    """Whether ``annotation`` is int or float, or one of them or None (``float | None``): where
    pydantic reads true and false as 1 and 0, which no config key or experiment option means."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    return bool(kinds & {int, float}) and kinds <= {int, float, type(None)}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1, plus floats written without a dot (``1e-3``, YAML 1.2's), which YAML
    1.1 reads as strings: typed fields converted them, free-form ones (``model.kwargs``,
    ``optim.kwargs``) passed the string on to fail deep inside timm; and a key given twice in one
    mapping is an error: PyYAML keeps the last silently, and a second ``train:`` section replaced
    the first one whole; so is a key that is a list or mapping (``? [a, b]``), which no config key
    is and which failed as a TypeError."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)):
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"a key is a {type(key).__name__} ({key!r}); keys are names", key_node.start_mark)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"key {key!r} appears twice (the second would replace the first)", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes the strings :class:`_Loader` would read as floats ('1e5')."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


def load_yaml(text: str):
    """``text`` parsed as YAML by :class:`_Loader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data) -> str:
    """``data`` as YAML that :func:`load_yaml` reads back the same (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def quoted(text: str) -> str:
    """``text`` as a YAML string (a JSON one: double quotes, escapes), for a key=value override that
    must stay this exact string, such as a path."""
    return json.dumps(str(text), ensure_ascii=False)       # (ASCII escapes split emoji into surrogates)


class Section(BaseModel):
    """A config section. ``extra='forbid'`` turns a misspelt key into an error naming it; no number
    may be infinite or NaN (``d_max=inf`` failed deep in the first step), and no number true or false
    (pydantic reads ``train.epochs=true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info):
        if isinstance(v, bool) and takes_a_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("takes a number, not true or false")
        return v
