"""A study config -> one validated run config per run, before any run starts.

A study file (``configs/study/<name>.py``) defines ``get_config(arg)`` returning a ConfigDict:

    name       the study's name (report title)
    size       base size of every run: 'tiny' | '390m' | '1.5b' | '8b'
    steps      train.steps of every run
    stress     nested run-config fields set on every run: how the study stresses training
               (e.g. {'optim': {'peak_lr': 1e-2, 'warmup_steps': 10}, 'train': {'batch_size': 8}})
    common     nested run-config fields set on every run besides the stress (cadence, data, ...)
    reference  name of the run the others are compared with (e.g. the BF16 Llama3), or ''
    runs       list of {name, arch, recipe, overrides}: overrides are nested run-config fields
               of that run alone (an LR multiple, a seed, ...), applied last

Each run config is the ordinary ``config_lib.get_config(arch, size)`` with the fields above set,
then checked by :func:`fogjax.train.preflight.validate_train_config`; any failure is a ValueError
that names the study entry and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import traceback
from collections.abc import Mapping
from typing import Any

import ml_collections

from fogjax import config_lib
from fogjax.precision import registry
from fogjax.train import preflight

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The top-level fields of a study config (the module docstring says what each is).
STUDY_FIELDS = ("name", "size", "steps", "stress", "common", "reference", "runs")


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of a study: its name (= its folder), the flat overrides and the run config."""

    name: str
    arch: str
    recipe: str
    size: str
    fields: dict[str, Any]  # {'optim.peak_lr': 0.01, ...}: every field set on the base config
    config: ml_collections.ConfigDict

    def train_args(self) -> list[str]:
        """The same run as ``python -m fogjax.train`` arguments (without --workdir)."""
        flags = [f"--config=configs/{self.arch}.py:{self.size}"]
        return flags + [f"--config.{path}={value}" for path, value in self.fields.items()]


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    size: str
    steps: int
    reference: str
    runs: list[StudyRun]
    source: str  # the study file, as given


def _plain(value: Any) -> Any:
    """ConfigDicts and mappings -> dicts, recursively (lists of run entries included)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def flatten(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'peak_lr': 1e-2}} -> {'optim.peak_lr': 1e-2}."""
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def load_study_config(path: str) -> ml_collections.ConfigDict:
    """Runs ``get_config(arg)`` of ``path[:arg]``; ValueError if the file is missing or bad."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")
        shipped = sorted(
            f"configs/study/{f}"
            for f in os.listdir(os.path.join(here, "study"))
            if f.endswith(".py") and not f.startswith("_")
        )
        raise ValueError(f"Study config {file} does not exist. Shipped studies: {shipped}.")
    spec = importlib.util.spec_from_file_location("fogjax_study_config", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"Study config {file} defines no get_config(arg).")
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        if str(e).startswith(f"Study config {file}"):
            raise
        raise ValueError(_load_error(file, e)) from None
    except Exception as e:  # The file is Python: a NameError, a SyntaxError, anything.
        raise ValueError(_load_error(file, e)) from None


def _load_error(file: str, error: BaseException) -> str:
    """'Study config F raised NameError at line 12: name 'x' is not defined; fix the file.'"""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(file):
            line = lineno  # The innermost line of the study file itself.
    where = f" at line {line}" if line else ""
    text = error.msg if isinstance(error, SyntaxError) else str(error)
    return (
        f"Study config {file} raised {type(error).__name__}{where}: {text}. Fix the file "
        "(its fields: fogjax/study/spec.py)."
    )


def _set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *sections, field = path.split(".")
    node = config
    for section in sections:
        node = getattr(node, section)
        if not isinstance(node, ml_collections.ConfigDict):
            raise AttributeError(f"{section!r} is not a config section")
    if field not in node:  # A locked ConfigDict raises too, but only for some spellings.
        raise AttributeError(f"unknown field {field!r}")
    setattr(node, field, value)


def build_run(study: Mapping[str, Any], entry: Mapping[str, Any], where: str) -> StudyRun:
    """The run config of one ``runs`` entry; ValueError starting with ``where`` on any fault."""
    unknown = set(entry) - {"name", "arch", "recipe", "overrides"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use name, arch, recipe, "
                         "overrides.")  # fmt: skip
    name, arch, recipe = entry.get("name", ""), entry.get("arch", ""), entry.get("recipe", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: name={name!r} must be a folder name ([A-Za-z0-9_.-]).")
    if arch not in config_lib.ARCHS:
        raise ValueError(f"{where}: unknown arch={arch!r}; choose one of {list(config_lib.ARCHS)}.")
    if recipe not in registry.available():
        raise ValueError(
            f"{where}: unknown recipe={recipe!r}; choose one of {registry.available()}."
        )
    fields = {
        **flatten(study.get("stress", {})),
        **flatten(study.get("common", {})),
        **flatten(entry.get("overrides", {})),
        "train.steps": study["steps"],
        "precision.recipe": recipe,
    }
    config = config_lib.get_config(arch, study["size"])
    for path, value in fields.items():
        try:
            _set_field(config, path, value)
        except (AttributeError, KeyError, TypeError) as e:
            text = str(e.args[0] if e.args else e).strip("'\"")
            raise ValueError(f"{where}: cannot set {path}={value!r}: {text}.") from None
    try:
        preflight.validate_train_config(config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return StudyRun(name, arch, recipe, study["size"], fields, config)


def build_study(source: str) -> Study:
    """Loads and validates the study at ``source`` (``path[:arg]``): every run config is built
    and checked here, so a bad entry fails before any run starts."""
    raw = _plain(load_study_config(source))
    file = source.partition(":")[0]
    unknown = sorted(set(raw) - set(STUDY_FIELDS))
    if unknown:  # A misspelt field (c.stres) would be ignored: the study would run unstressed.
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k)
            for k in unknown
            for close in [difflib.get_close_matches(k, STUDY_FIELDS, n=1)]
        ]
        raise ValueError(
            f"Study {file}: unknown field(s) {', '.join(hints)}; a study's fields are "
            f"{', '.join(STUDY_FIELDS)} (see fogjax/study/spec.py)."
        )
    missing = [k for k in ("size", "steps", "runs") if k not in raw]
    if missing:
        raise ValueError(f"Study {file}: missing fields {missing} (see fogjax/study/spec.py).")
    if raw["size"] not in config_lib.SIZES:
        raise ValueError(
            f"Study {file}: size={raw['size']!r}; choose one of {list(config_lib.SIZES)}."
        )
    if not isinstance(raw["steps"], int) or raw["steps"] < 1:
        raise ValueError(f"Study {file}: steps={raw['steps']!r} must be an int >= 1.")
    if not raw["runs"]:
        raise ValueError(f"Study {file}: runs is empty.")
    runs, seen = [], set()
    for i, entry in enumerate(raw["runs"]):
        label = entry.get("name", "?") if isinstance(entry, Mapping) else "?"
        where = f"Study {file}: runs[{i}] ({label})"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: each run is a dict of name, arch, recipe, overrides.")
        run = build_run(raw, entry, where)
        if run.name in seen:
            raise ValueError(f"{where}: the name {run.name!r} is used twice.")
        seen.add(run.name)
        runs.append(run)
    reference = raw.get("reference", "") or ""
    if reference and reference not in seen:
        raise ValueError(f"Study {file}: reference={reference!r} is not one of the runs {seen}.")
    name = raw.get("name") or os.path.splitext(os.path.basename(file))[0]
    return Study(name, raw["size"], raw["steps"], reference, runs, source)
