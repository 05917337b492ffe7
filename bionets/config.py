"""Run configs: YAML files under ``configs/`` loaded into typed, validated sections.

A config file may name a ``base:`` config (by name or relative path) whose values it overrides, so
that a table row is a few lines on top of its recipe. ``key=value`` overrides from the command line
use dotted keys (``train.epochs=2``) and YAML typing. Every error (unknown key, wrong type,
missing value) is raised before any work as one :class:`BionetsError` line naming the key and the
closest valid one.
"""
from __future__ import annotations

import copy
import os
import re
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from bionets.configbase import PATH_BYTES, PathText, Section, Seed, load_yaml
from bionets.data.config import DataConfig
from bionets.engine.optim import OptimConfig, SchedConfig, sgd_like, timm_optimizer
from bionets.errors import BionetsError, closest

DEFAULT_CONFIG = "digits"


class ModelConfig(Section):
    name: str = "resnet20_cifar"            # any timm model name (bionets registers its own)
    kwargs: dict[str, Any] = {}              # passed to timm.create_model
    init: PathText | None = None             # start from these weights: a checkpoint of bionets train or export


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    loss: Literal["ce", "mse_onehot"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: Literal["off", "bf16", "fp16"] = "off"          # autocast dtype (the CPU takes bf16 only)
    channels_last: bool | Literal["auto"] = "auto"       # auto: on for conv nets (see use_channels_last)
    grad_accum: int = Field(1, ge=1)
    clip_grad: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: Seed = 0
    device: str = "auto"                                 # auto | cpu | cuda | cuda:N
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = False   # torch.compile the model (mode)
    progress: bool = True                                # progress bar (rank 0)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v   # YAML reads a bare `off` as false


class RunConfig(Section):
    name: PathText = "run"
    out_dir: PathText = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    train: TrainConfig = TrainConfig()
    mechanisms: dict[str, Any] = {}
    resume: PathText | None = None
    # start-up notes from reading the config (not part of it: never saved, never compared on resume)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("mechanisms", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v

    @field_validator("name")
    @classmethod
    def _names_a_directory(cls, v):
        if not v.strip("/\\ "):
            raise ValueError("must name the run's directory under out_dir, e.g. name=digits")
        parts = Path(v).parts
        if not parts:                       # '.' or './': the runs' folder itself, among other runs' folders
            raise ValueError("must name a directory under out_dir, not out_dir itself: e.g. name=digits")
        if Path(v).is_absolute() or ".." in parts:
            raise ValueError("must name a directory under out_dir (no '..', not an absolute path): set out_dir "
                             "for where the runs go")
        if any(len(part.encode()) > 255 for part in parts):
            raise ValueError("has a folder name over 255 bytes, more than file systems allow: choose a shorter name")
        return v

    @model_validator(mode="after")
    def _typed_mechanisms(self):
        from bionets.mechanisms import get_mechanism, parse_mechanisms

        raw = {k: (v.model_dump() if isinstance(v, Section) else v) for k, v in self.mechanisms.items()}
        object.__setattr__(self, "mechanisms", parse_mechanisms(raw))
        self._default_sgd_rates()
        for name in self.mechanisms:
            for former, current in get_mechanism(name).renamed.items():
                if stale := [pat for pat in self.optim.lr_mult if pat.endswith(former)]:
                    raise BionetsError(f"optim.lr_mult {stale}: mechanisms.{name}'s parameters named '*{former}' are "
                                       f"'*{current}' now, which it would not match: write "
                                       f"'{stale[0][:-len(former)]}{current}'")
            needed = get_mechanism(name).optimizer
            if needed is not None and self.optim.name != needed:
                raise BionetsError(f"mechanisms.{name} trains with optim.name={needed}, got optim.name="
                                   f"{self.optim.name}: set optim.name={needed} (without it the mechanism's own "
                                   "update never runs)")
        if len(os.fsencode(self.run_dir)) > PATH_BYTES:
            raise BionetsError(f"out_dir/name is {len(os.fsencode(self.run_dir)):,} bytes long, more than paths may be: "
                               "choose a shorter out_dir or name")
        if self.sched.min_lr > self.optim.lr:
            raise BionetsError(f"sched.min_lr={self.sched.min_lr:g} is above optim.lr={self.optim.lr:g}: the schedule "
                               "would raise the rate to it; set sched.min_lr below optim.lr (default 0)")
        return self

    def _default_sgd_rates(self) -> None:
        """Under an SGD-like optimizer, give each mechanism's parameters the lr multipliers it asks for
        (RAA's v and c: 1/100) where ``optim.lr_mult`` does not set their patterns; a start-up note
        says so. The saved config holds them, so a resumed run reads the same rates."""
        from bionets.mechanisms import get_mechanism

        if not sgd_like(self.optim.name):
            return
        for name, section in self.mechanisms.items():
            rates = get_mechanism(name).sgd_lr_mult
            added = {k: v for k, v in (rates(section) if rates else {}).items() if k not in self.optim.lr_mult}
            if added:
                object.__setattr__(self, "optim", self.optim.model_copy(
                    update={"lr_mult": {**self.optim.lr_mult, **added}}))
                self._notes.append(f"mechanisms.{name} under optim.name={self.optim.name}: optim.lr_mult takes "
                                   f"{added}, the multipliers {name} asks for under SGD (at the base rate its "
                                   "parameters can diverge); set these patterns in optim.lr_mult to choose other "
                                   "rates")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude={"mechanisms"})
        d["mechanisms"] = {k: v.model_dump(mode="json") for k, v in self.mechanisms.items()}
        return d


def validate_section(cls: type[Section], data: dict, prefix: str = "") -> Section:
    """Build a typed section from raw data; a bad key or value becomes one BionetsError line."""
    if not isinstance(data, dict):
        raise BionetsError(f"config section '{prefix}' must be a mapping, got {data!r}")
    return cls.checked(data, prefix)


def config_root():
    """The folder of bundled configs (``bionets/configs``: in the repository a link to its ``configs/``)."""
    return resources.files("bionets") / "configs"


def list_configs() -> list[str]:
    root = Path(str(config_root()))
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(name: str, relative_to: Path | None = None) -> Path:
    """A config path from a file path or a bundled config name (``dnrt/digits``). A ``base:`` names
    a file beside the config that names it (``relative_to``) first, then a bundled config, then a
    path from the current folder: a ``resnet20.yaml`` of the user's own in the current folder must
    not replace the bundled ``cifar100/resnet20`` that ``cifar100/dit_resnet20`` builds on."""
    root = Path(str(config_root()))
    here = [Path(name), Path(name + ".yaml")]
    bundled = [root / name, root / (name + ".yaml")]
    if relative_to is None:
        candidates = here + bundled
    else:
        candidates = [relative_to / name, relative_to / (name + ".yaml")] + bundled + here
    for path in candidates:
        if path.is_file():
            return path
    key = re.match(r"([a-z_]+)\.[\w.]+[:]", name)
    if key and key.group(1) in RunConfig.model_fields:      # train.epochs:3, a key written as YAML writes it
        example = name.replace(':', '=', 1).replace('= ', '=')
        raise BionetsError(f"no config file named '{name}': an override is written key=value, "
                           f"e.g. {example + 'VALUE' if example.endswith('=') else example} (no spaces)")
    raise BionetsError(f"no config file or bundled config named {name!r}{closest(name, list_configs())}"
                       " (see 'bionets configs')")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The config at ``path`` merged over its ``base:`` chain; a top-level file without a ``name``
    is named after itself (not after its base, whose run directory it would share)."""
    if path.resolve() in seen:
        raise BionetsError(f"config '{path}' inherits from itself through 'base:'")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        if zipfile.is_zipfile(path):
            raise BionetsError(f"config '{path}' is a checkpoint, not a YAML config: continue its run with "
                               f"'bionets train --resume {path}', or evaluate it with 'bionets eval {path}'") from None
        raise BionetsError(f"config '{path}' is not a text file: give a YAML config (bionets configs lists them)") from None
    except OSError as err:
        raise BionetsError(f"cannot read config '{path}' ({err.strerror}): give a readable YAML file") from None
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = (f" at line {mark.line + 1}" if mark else "") + (f" ({problem})" if problem else "")
        raise BionetsError(f"config '{path}' is not valid YAML{where}: fix the file") from None
    if not isinstance(data, dict):
        raise BionetsError(f"config '{path}' must hold a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise BionetsError(f"config '{path}': base must name one config (a bundled name or a path), got {base!r}")
    try:
        found = resolve_config(base, path.parent)
    except BionetsError:
        raise BionetsError(f"config '{path}': its base {base!r} names no config file (beside it or in the current "
                           f"folder) or bundled config{closest(base, list_configs())} (see 'bionets configs')") from None
    merged = merge(_read_yaml(found, seen + (path.resolve(),)), data)
    if not seen and "name" not in data:
        merged["name"] = path.stem
    return merged


def merge(base: dict, top: dict) -> dict:
    """Deep-merge ``top`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: list[str], notes: list[str] | None = None) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a raw config mapping. A mapping value
    replaces the mapping there (``mechanisms={raa: {}}`` leaves no other mechanism); where that drops
    keys, a line saying which is appended to ``notes``."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise BionetsError(f"override '{item}' must look like key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError as err:
            if raw.lstrip()[:1] in ("{", "["):       # meant as a mapping or list: say what is wrong with it
                problem = getattr(err, "problem", None) or "not valid YAML"
                raise BionetsError(f"override '{item}': {problem} (a mapping is {{a: 1, b: 2}}, a list "
                                   "[1, 2])") from None
            value = raw                                # a plain string that YAML cannot read: kept as it is
        if "#" in raw and "#" not in yaml.safe_dump(value):
            raise BionetsError(f"override '{item}': YAML reads the text from '#' on as a comment and drops it: quote "
                               f"the value to keep it ({key}=\"'{raw.strip()}'\" in a shell), or leave the comment out")
        if glued := _glued_key(value):
            raise BionetsError(f"override '{item}': YAML reads '{glued}' as a key without a value: put a space after "
                               f"the colon ('{glued.replace(':', ': ', 1)}')")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        old = node.get(parts[-1])
        if notes is not None and isinstance(old, dict) and (isinstance(value, dict) or value is None or value is True):
            # (a mechanism given true or null takes its defaults, not the settings it had)
            if dropped := [str(k) for k in old if not isinstance(value, dict) or k not in value]:
                shown = "{...}" if isinstance(value, dict) else raw.strip()
                notes.append(f"note: the override {key.strip()}={shown} replaces that whole mapping, so it drops "
                             f"{', '.join(dropped)}; to change one entry, use {key.strip()}.KEY=VALUE")
        node[parts[-1]] = value
    return data


def _glued_key(value) -> str | None:
    """A mapping key like 'hidden:7' with no value inside ``value``: YAML's reading of ``{hidden:7}``
    (a flow mapping needs a space after the colon), which would otherwise pass as an option set to null."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                return k
            if found := _glued_key(v):
                return found
    return None


# keys a resumed run may change: where things are and how the run is shown, not what it computes
RESUMABLE_CHANGES = ("name", "out_dir", "resume", "data.root", "data.download", "data.workers", "data.eval_batch_size",
                     "train.device", "train.progress", "train.compile", "train.channels_last")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


# options a config may leave unset (the optimizer's own value) where the checkpoint's config set them:
# the resumed optimizer state holds the values the run used (configs saved before 2026-11-29 set betas
# and eps for every optimizer)
UNSET_RESUMES_SAVED = ("optim.betas", "optim.eps")


def check_resume_config(saved: dict, cfg: RunConfig, source: str) -> None:
    """One error line when ``cfg`` changes what the checkpoint's run computes (its optimizer and
    schedule state would otherwise silently keep the old values): a resumed run continues exactly."""
    before, after = _flat(saved_config(saved, source).to_dict()), _flat(cfg.to_dict())
    changed = [k for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and not any(k == a or k.startswith(a + ".") for a in RESUMABLE_CHANGES)
               and not (k in UNSET_RESUMES_SAVED and after.get(k) is None)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise BionetsError(f"resuming {source} (--resume, or the config's resume key): this config changes the run "
                           f"({shown}{more}), but a resumed run continues its saved optimizer and schedule exactly: "
                           "resume without these changes (the checkpoint holds its config), or start a new run from "
                           f"its weights: {_fresh_start(source)}")


def _fresh_start(source: str) -> str:
    """How to start a new run from checkpoint ``source``'s weights: with its run's config.yaml where
    it lies beside it, since the weights load only into the same model with the same mechanisms
    (``model.init`` alone, on the default config, was refused for a checkpoint with mechanisms)."""
    config = Path(source).parent / "config.yaml"
    if config.is_file():
        return f"'bionets train {config} model.init={source}' and your changes, instead of --resume"
    return f"model.init={source} instead of --resume, with the checkpoint's model.name and mechanisms"



def resume_config(saved: dict, overrides: list[str], source: str) -> RunConfig:
    """The resolved config of a loaded checkpoint (``saved``, read from ``source``) with ``overrides``
    applied: what ``bionets train --resume CKPT`` runs when no CONFIG is given."""
    saved_config(saved["config"], source)          # (its own errors name the checkpoint, not the overrides)
    notes, data = [], _without_ignored_optim_options(dict(saved["config"]))
    run_dir = Path(source).parent
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if not given & {"name", "out_dir"} and _run_name_in(run_dir) == data.get("name"):
        # a checkpoint in its run's directory continues there, wherever that directory is now (moved,
        # or named from another folder: the saved out_dir is relative to the folder the run started in)
        run_dir = run_dir if run_dir.name else run_dir.resolve()
        data.update(out_dir=str(run_dir.parent), name=run_dir.name)
    return _with_notes(apply_overrides(data, overrides, notes), notes)


def _run_name_in(run_dir: Path) -> str | None:
    """The run name that ``run_dir``'s config.yaml records (None: no readable one)."""
    try:
        saved = load_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved.get("name") if isinstance(saved, dict) else None


def saved_config(data: dict, source: str) -> RunConfig:
    """A checkpoint's saved config, checked as this bionets reads configs; one error line naming the
    checkpoint where it cannot (a key of another version, a model it does not have): the messages of
    the config checks alone blamed a key the user never typed."""
    import timm

    import bionets.models  # noqa: F401  (registers bionets' models)
    try:
        cfg = config_from_dict(_without_ignored_optim_options(data))
        if not timm.is_model(cfg.model.name):
            raise BionetsError(f"model '{cfg.model.name}' is not a model of this bionets or timm")
    except BionetsError as err:
        raise BionetsError(f"checkpoint '{source}' holds a config this bionets cannot read ({err}): use the bionets "
                           f"version that wrote it, or start a new run from its weights with "
                           f"model.init={source}") from None
    return cfg


def _without_ignored_optim_options(data: dict) -> dict:
    """``data`` without the betas and eps that configs saved before 2026-11-29 held for every optimizer
    at (0.9, 0.999) and 1e-8, where the optimizer takes none (SGD): that bionets passed them to no such
    optimizer, and a resumed run noted them as ignored."""
    optim = data.get("optim")
    if not isinstance(optim, dict) or not isinstance(optim.get("name"), str):
        return data
    info = timm_optimizer(optim["name"].lower())
    old = {"betas": ([0.9, 0.999], (0.9, 0.999)), "eps": (1e-8,)}
    drop = [k for k in old if info is not None and not getattr(info, f"has_{k}") and optim.get(k) in old[k]]
    return {**data, "optim": {k: v for k, v in optim.items() if k not in drop}} if drop else data


def load_config(name: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config by path or bundled name (None: the embedded default) with overrides."""
    path = resolve_config(name or DEFAULT_CONFIG)
    notes = []
    data = apply_overrides(_read_yaml(path), overrides or [], notes)
    data.setdefault("name", path.stem)
    return _with_notes(data, notes)


def _with_notes(data: dict, notes: list[str]) -> RunConfig:
    """The run config of ``data``, carrying the start-up ``notes`` of reading it."""
    cfg = validate_section(RunConfig, data)
    cfg._notes = notes + cfg._notes
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    return validate_section(RunConfig, data)
