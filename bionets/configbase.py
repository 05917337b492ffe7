"""The base of every typed config section (unknown keys are errors, values are validated) and the
YAML reader of configs and command-line values."""
from __future__ import annotations

import json
import os
import re
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from bionets.errors import BionetsError, closest

# a random seed: what torch.manual_seed and NumPy take (a larger one overflowed inside them)
Seed = Annotated[int, Field(ge=0, lt=2**63)]
_VALIDATING = ContextVar("validating_a_section", default=False)    # (see Section.__init__)
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

    def __init__(self, **data):
        """A section built in Python (``OptimConfig(lr=-1)``) errs in one line too, as a config file's
        does (pydantic's error spans three lines). pydantic calls this for the sections nested in one
        it validates too: those leave their errors to the outermost, which knows the full key."""
        if _VALIDATING.get():
            super().__init__(**data)
        else:
            type(self).checked(data, into=self)

    @classmethod
    def checked(cls, data: dict, prefix: str = "", into: Section | None = None) -> Section:
        """``data`` validated as this section (``into``: filling that instance), a bad key or value
        one BionetsError line naming it under ``prefix``."""
        token = _VALIDATING.set(True)
        try:
            if into is None:
                return cls.model_validate(data)
            super(Section, into).__init__(**data)
            return into
        except ValidationError as err:
            raise one_line_error(err, cls, prefix) from None
        finally:
            _VALIDATING.reset(token)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info):
        if isinstance(v, bool) and takes_a_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("takes a number, not true or false")
        return v


def _fields_at(cls: type[Section], loc: tuple) -> list[str]:
    """The valid keys of the section that ``loc`` (a pydantic error location) points into."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, Section)):
            return []
        cls = ann
    return list(cls.model_fields)


_TYPE_TAG = re.compile(r"(str|int|float|bool|none|(literal|list|dict|tuple|set)\[.*\]|function-[a-z]+\[.*\])")


def _untagged(loc: tuple) -> tuple:
    """A pydantic error location without the tags it adds for a field of several accepted types
    (``placement.list[str].0`` -> ``placement.0``)."""
    return tuple(p for p in loc if not (isinstance(p, str) and _TYPE_TAG.fullmatch(p)))


def one_line_error(err: ValidationError, cls: type[Section], prefix: str = "") -> BionetsError:
    """pydantic's error for section ``cls`` (at ``prefix``) as one BionetsError line: the key, what it
    takes, the value given."""
    errors = [dict(x, loc=_untagged(tuple(x["loc"]))) for x in err.errors()]
    e = errors[0]
    loc = e["loc"]
    key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
    if e["type"] == "extra_forbidden":
        fields = _fields_at(cls, loc)
        hint = closest(str(loc[-1]), fields) or (f" (valid here: {', '.join(fields)})" if fields else "")
        return BionetsError(f"unknown config key '{key}'{hint}")
    if e["type"] == "missing":
        return BionetsError(f"config key '{key}' is required")
    # a field of several accepted types (e.g. bool | Literal[...]) fails once per type: name every form
    union = [x for x in errors if x["loc"] == loc]
    msg = "; or ".join(dict.fromkeys(x["msg"].replace("Value error, ", "") for x in union))
    got = repr(e.get("input"))
    got = got if len(got) <= 100 else f"{got[:80]}... ({len(got):,} characters)"      # (a 4,000-byte path)
    value = e.get("input")
    if e["type"] == "string_type" and isinstance(value, bool | int | float):
        # YAML read the text as a number or a boolean (name=2024, name=yes): say how to keep it text
        return BionetsError(f"config key '{key}': {msg} (got {got}: YAML reads that as {type(value).__name__}, not "
                            f"text): quote it, {key}=\"'VALUE'\" in a shell, {key}: 'VALUE' in a file")
    return BionetsError(f"config key '{key}': {msg} (got {got})")
