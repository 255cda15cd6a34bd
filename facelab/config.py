"""Compose the YAML under ``conf/`` with command-line overrides into one run config.

``conf/<config_name>.yaml`` names one choice per group in its ``defaults:`` mapping
(``method: specular``); each group is a folder of YAML files (``conf/method/specular.yaml``)
whose content lands under the group's key (``cfg.method``). The primary file's own keys are
merged over the group files, so a primary config may adjust a group value. ``conf/sweep/`` holds
W&B sweep files, not config fragments, and is not a group.

A group file may carry two keys of its own, which do not land under its group: ``defaults``
(choices for other groups, used unless the command line selects them: trainer/gpu.yaml picks the
full face model) and ``global`` (values set over the composed config after the primary's body,
where that key exists: trainer/cpu.yaml makes the run small). This is how one ``trainer=``
choice switches between the minutes-long CPU default and the paper's settings.

Override forms (the same ``key=value`` dotlist that W&B sweep agents pass)::

    method=cest              select a group's file (applied before every other override)
    trainer.max_steps=50     set an existing key; the value is parsed as YAML (50 -> int)
    +foo.bar=1               add a key that does not exist yet
    ~run.name                delete a key (``~logger`` drops the whole group)

Unknown keys and choices fail with a :class:`ConfigError` naming the nearest valid ones.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

NON_GROUP_DIRS = frozenset({"sweep"})
"""Folders under conf/ that hold other YAML (W&B sweeps) and are not config groups."""

OVERRIDE_FORMS = "group=choice, key.path=value, +key.path=value (add), ~key.path (delete)"

_KEY_PATH = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_PLAIN_STRING = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./\-]*")
_MISSING = object()


class ConfigError(ValueError):
    """A config file, override or interpolation is invalid; the message says how to fix it."""


def conf_dir() -> Path:
    """Folder holding ``train.yaml`` and the group folders.

    ``$FACELAB_CONF`` if set, else ``conf/`` next to the ``facelab`` package (a source checkout).
    Raises ConfigError if the folder does not exist.
    """
    env = os.environ.get("FACELAB_CONF")
    root = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not root.is_dir():
        source = "$FACELAB_CONF" if env else "the source checkout"
        raise ConfigError(
            f"config folder {root} (from {source}) does not exist; set FACELAB_CONF to the "
            "folder that holds train.yaml and the group folders (method/, data/, ...)"
        )
    return root


def groups(conf_root: str | Path | None = None) -> dict[str, list[str]]:
    """Group name -> sorted choices (YAML file stems) for every group folder under conf_root."""
    root = Path(conf_root) if conf_root is not None else conf_dir()
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(root.iterdir())
        if folder.is_dir() and folder.name not in NON_GROUP_DIRS and not folder.name.startswith(".")
    }


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    conf_root: str | Path | None = None,
) -> DictConfig:
    """Build the run config from ``conf/<config_name>.yaml``, its group choices and overrides.

    overrides: strings in the forms of the module docstring; group selections apply first
        (wherever they stand), then the other overrides in order.
    Returns a resolved, struct-mode DictConfig (reading or setting a missing key raises) with
    ``cfg.choices`` = {group: choice} and ``run.name`` null filled as
    ``<method.name>-<YYYYmmdd-HHMMSS>``. Raises ConfigError on any invalid input.
    """
    root = Path(conf_root) if conf_root is not None else conf_dir()
    available = groups(root)
    primary = _load(root / f"{config_name}.yaml", what=f"config '{config_name}'", root=root)
    choices = _default_choices(primary, available)

    parsed = [_parse_override(text) for text in overrides]
    selected = {}
    for op, key, value, text in parsed:
        if op == "set" and key in available:
            selected[key] = _group_choice(key, value, available[key], text)
    choices.update(selected)

    loaded = {group: _load(root / group / f"{choice}.yaml", what=f"{group}={choice}")
              for group, choice in choices.items() if choice is not None}
    nested = {}  # the chosen files' own defaults, one level deep (a file they pick does not chain)
    for group, content in loaded.items():
        if "defaults" in content:
            picks = _nested_defaults(content.pop("defaults"), group, choices[group], available)
            nested.update({other: choice for other, choice in picks.items() if other not in selected and other in choices})
    for other, choice in nested.items():
        choices[other] = choice
        loaded[other] = _load(root / other / f"{choice}.yaml", what=f"{other}={choice}")
        loaded[other].pop("defaults", None)
    # the final files' `global` blocks, applied after the primary body
    profile = [(f"{group}={choices[group]}", content.pop("global")) for group, content in loaded.items()
               if "global" in content]
    cfg = OmegaConf.create()
    for group, choice in choices.items():
        if choice is not None:
            cfg[group] = loaded[group]
    cfg = OmegaConf.merge(cfg, primary)
    for source, overlay in profile:
        _merge_existing(cfg, overlay, source)
    if "choices" in cfg:
        raise ConfigError("'choices' is reserved for the selected group choices; rename that key")

    for op, key, value, text in parsed:
        if op == "set" and key in available:
            continue
        if op == "add":
            _add(cfg, key, value, text)
        elif op == "delete":
            parent, last = _walk(cfg, key, text)
            del parent[int(last) if isinstance(parent, ListConfig) else last]
            if key in choices:
                choices[key] = None
        else:
            _walk(cfg, key, text)  # the key must exist: typos fail here, not silently add
            OmegaConf.update(cfg, key, value, merge=False)

    if "run" in cfg and isinstance(cfg.run, DictConfig) and cfg.run.get("name", "") is None:
        method = cfg.get("method")
        method_name = method.get("name") if isinstance(method, DictConfig) else None
        cfg.run.name = f"{method_name or config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    cfg.choices = {group: choice for group, choice in choices.items() if choice is not None}
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve an interpolation: {error}") from error
    OmegaConf.set_struct(cfg, True)
    return cfg


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write cfg, resolved, to ``<run_dir>/config.yaml`` (creating run_dir) and return that path."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def to_dotlist(cfg: DictConfig) -> list[str]:
    """Flatten cfg into overrides: ``group=choice`` from ``cfg.choices``, then ``key=value``.

    One entry per leaf (lists and empty mappings are one value, in YAML flow form); values are
    written so that YAML parsing gives them back (strings quoted where needed). ``choices`` is
    not emitted as values, and ``run.name`` is emitted as it stands, so the name is kept.
    ``compose(to_dotlist(cfg))`` reproduces cfg when cfg was composed from the same conf/ tree
    with selections and value overrides; keys added with ``+`` or removed with ``~`` are not
    marked as such and make that compose fail (added) or come back (removed).
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    selected = container.pop("choices", None) or {}
    out = [f"{group}={choice}" for group, choice in selected.items()]

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, f"{path}.")
            else:
                out.append(f"{path}={_render(value)}")

    walk(container, "")
    return out


def _load(path: Path, what: str, root: Path | None = None) -> DictConfig:
    if not path.is_file():
        hint = ""
        if root is not None:
            hint = "; available: " + ", ".join(sorted(p.stem for p in root.glob("*.yaml")))
        raise ConfigError(f"{what}: file {path} not found{hint}")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"{what}: {path} is not valid YAML: {error}") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what}: {path} must hold a mapping at the top level")
    return loaded


def _nested_defaults(nested: Any, group: str, choice: str, available: dict[str, list[str]]) -> dict[str, str]:
    """A group file's own ``defaults`` (e.g. trainer/gpu.yaml picks face_model=ict-face): checked
    like the primary's; they give way to choices made on the command line."""
    if not isinstance(nested, DictConfig):
        raise ConfigError(f"{group}={choice}: 'defaults' must be a mapping group -> choice")
    out = {}
    for other, value in nested.items():
        if other not in available or other == group:
            raise ConfigError(f"{group}={choice}: defaults names '{other}', not another group; groups: "
                              + ", ".join(_ranked(str(other), [g for g in available if g != group])))
        out[other] = _group_choice(other, value, available[other], f"{group}={choice}: defaults.{other}")
    return out


def _merge_existing(cfg: DictConfig, overlay: Any, source: str, prefix: str = "") -> None:
    """Set the leaves of a group file's ``global`` block where cfg has that key. A profile
    (trainer=cpu) may name settings that only some methods have; the others skip them."""
    if not isinstance(overlay, DictConfig):
        raise ConfigError(f"{source}: 'global' must be a mapping of config paths to values")
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        existing = OmegaConf.select(cfg, path, default=_MISSING)
        if existing is _MISSING:
            continue
        if isinstance(value, DictConfig) and isinstance(existing, DictConfig):
            _merge_existing(cfg, value, source, f"{path}.")
        else:
            OmegaConf.update(cfg, path, value, merge=False)


def _default_choices(primary: DictConfig, available: dict[str, list[str]]) -> dict[str, Any]:
    """Pop ``defaults`` from the primary config and check it against the group folders."""
    defaults = primary.pop("defaults", None)
    defaults = OmegaConf.create() if defaults is None else defaults
    if not isinstance(defaults, DictConfig):
        raise ConfigError("'defaults' must be a mapping group -> choice, e.g. {method: specular}")
    choices: dict[str, Any] = {}
    for group, choice in defaults.items():
        if group not in available:
            valid = ", ".join(_ranked(group, available))
            raise ConfigError(f"defaults: no group folder '{group}'; groups: {valid}")
        choices[group] = _group_choice(group, choice, available[group], f"defaults.{group}")
    return choices


def _group_choice(group: str, choice: Any, valid: list[str], text: str) -> str | None:
    if choice is None:
        return None
    if str(choice) not in valid:
        raise ConfigError(
            f"'{text}': no {group} named '{choice}'; valid choices: "
            + ", ".join(_ranked(str(choice), valid))
        )
    return str(choice)


def _parse_override(text: str) -> tuple[str, str, Any, str]:
    """Split one override into (op, key, value, text); op is 'set', 'add' or 'delete'."""
    op, body = {"+": ("add", text[1:]), "~": ("delete", text[1:])}.get(text[:1], ("set", text))
    key, has_value, raw = body.partition("=")
    if op == "delete" and has_value:
        raise ConfigError(
            f"override '{text}' is malformed: ~key takes no value; accepted forms: {OVERRIDE_FORMS}"
        )
    if (op != "delete" and not has_value) or not _KEY_PATH.fullmatch(key):
        raise ConfigError(f"override '{text}' is malformed; accepted forms: {OVERRIDE_FORMS}")
    return op, key, parse_value(raw) if has_value else None, text


def _walk(cfg: DictConfig, key: str, text: str) -> tuple[DictConfig | ListConfig, str]:
    """Return (parent node, last part) of an existing key, or raise naming the first bad part."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(
                    f"'{text}': '{prefix}' is a list of {len(node)} items; '{part}' is not an index"
                )
        elif isinstance(node, DictConfig):
            if part not in node:
                raise ConfigError(_unknown_key_message(node, prefix, part, text))
        else:
            raise ConfigError(f"'{text}': '{prefix}' is a value ({node!r}), not a mapping")
        if depth < len(parts) - 1:
            try:
                node = node[int(part) if isinstance(node, ListConfig) else part]
            except OmegaConfBaseException:  # an interpolation that does not resolve yet
                node = "an interpolation"
    return node, parts[-1]


def _unknown_key_message(node: DictConfig, prefix: str, part: str, text: str) -> str:
    full = f"{prefix}.{part}" if prefix else part
    at = f"under '{prefix}'" if prefix else "at the top level"
    keys = [str(k) for k in node.keys()]
    if not keys:
        return f"'{text}': unknown key '{full}': '{prefix}' is empty; add keys with +{full}=..."
    paths = [f"{prefix}.{k}" if prefix else k for k in _ranked(part, keys)]
    close = difflib.get_close_matches(part, keys, n=1)
    guess = f"did you mean '{paths[0]}'? " if close else ""
    return f"'{text}': unknown key '{full}'; {guess}valid keys {at}: {', '.join(paths)}"


def _add(cfg: DictConfig, key: str, value: Any, text: str) -> None:
    """Add a new key; its missing parents become mappings, an existing parent must be one."""
    parts = key.split(".")
    try:
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            existing = OmegaConf.select(cfg, prefix, default=_MISSING)
            if depth == len(parts) and existing is not _MISSING:
                raise ConfigError(f"'{text}': key '{key}' exists already; set it with {key}=...")
            if existing is not _MISSING and not isinstance(existing, (DictConfig, ListConfig)):
                raise ConfigError(f"'{text}': '{prefix}' is a value ({existing!r}), not a mapping")
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as error:
        raise ConfigError(f"'{text}': cannot add '{key}': {error}") from error


def _ranked(word: str, candidates: Sequence[str]) -> list[str]:
    """Candidates, the close matches of word first (nearest first), then the rest sorted."""
    close = difflib.get_close_matches(word, candidates, n=len(candidates), cutoff=0.6)
    return close + sorted(c for c in candidates if c not in close)


def _render(value: Any) -> str:
    """Write value so that the dotlist parser (YAML) reads back the same value and type."""
    if value is None or isinstance(value, (bool, int)):
        return json.dumps(value)  # null, true, false, 12
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {"nan": ".nan", "inf": ".inf"}.get(
            repr(value), "-.inf"
        )
    if isinstance(value, str):
        plain = _PLAIN_STRING.fullmatch(value) and parse_value(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_render(str(k))}: {_render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as an override value")


def parse_value(raw: str) -> Any:
    """A command-line override's value as `facelab train` reads it (OmegaConf's dotlist rules)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
