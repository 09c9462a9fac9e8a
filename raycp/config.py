"""Typed run configuration: YAML file < CLI ``--set key=value`` overrides.

Science knobs (what the paper fixes: channels, crop size ...) live apart from compute knobs
(where and how fast it runs), so a run's science is reproducible on any cluster. The resolved
config is written next to every run's outputs, without credentials.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raycp.errors import ConfigError, InputError
from raycp.io import urls
from raycp.io.index import DEFAULT_CHANNELS, check_channels

_SECRET = re.compile(r"(secret|password|token|credential|access_key|session_key)", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_ray_resources(value: dict[str, float]) -> dict[str, float]:
    """Validator of the ``resources`` settings (other Ray resources a task, actor or Train worker asks
    for): positive amounts of custom resources; CPUs, GPUs and memory have settings of their own."""
    own = {"CPU", "GPU", "memory", "object_store_memory"}
    for name, amount in value.items():
        if name in own or not name.strip():
            raise ValueError(f"resources: {name!r} has its own setting (cpus/gpus/memory); list custom resources only")
        if not amount > 0:
            raise ValueError(f"resources: {name!r} must be a positive amount, got {amount}")
    return value


class ComputeConfig(_Strict):
    """Where and how fast: never changes the science."""

    ray_address: str | None = Field(None, description="Ray cluster to join; default: RAY_ADDRESS or a local cluster")
    num_cpus: int | None = Field(None, ge=1, description=(
        "CPUs of a local cluster (default: all); on a joined autoscaling cluster, the CPUs it can grow to "
        "(raycp sizes its pools for them; default: the CPUs it has when a stage starts)"))
    num_gpus: int | None = Field(None, ge=0, description=(
        "GPUs of a local cluster (default: detected); on a joined autoscaling cluster, the GPUs it can grow "
        "to (CUDA is chosen and GPUs asked for before the autoscaler adds them)"))
    object_store_memory_gb: float = Field(1.0, gt=0, description="object store cap of a local cluster")
    include_dashboard: bool = False
    read_concurrency: int | None = Field(None, ge=1, description="parallel site readers (default: CPUs)")
    batch_size: int = Field(64, ge=1, description="rows per batch between stages")


class DataConfig(_Strict):
    """Inputs and outputs, as fsspec URLs."""

    index: str = Field(..., description="screen index (Parquet written by `raycp index build`)")
    output: str = Field(..., description="output folder URL of the run")
    channels: list[str] = Field(default_factory=lambda: list(DEFAULT_CHANNELS))

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        try:
            return check_channels(value)
        except InputError as exc:
            raise ValueError(exc.one_line()) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_value(raw: str) -> Any:
    """An override's value as YAML (``96`` → 96, ``[a, b]`` → a list); blank → None."""
    return yaml.safe_load(raw) if raw.strip() else None


def parse_overrides(overrides: list[str] | tuple[str, ...] | None) -> dict:
    """``["data.index=s3://b/i.parquet", "crops.size=96"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE", fix="write e.g. --set crops.size=96")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), parse_value(raw))
    return tree


def with_options(overrides: list[str] | None, options: Mapping[str, Any]) -> list[str]:
    """``--set`` overrides followed by a command's shortcut options as overrides (``{"data.index":
    "--index value"}``); an option left unset (None or empty text) adds nothing. Shortcuts win."""
    return [*(overrides or ()), *(f"{key}={value}" for key, value in options.items() if value not in (None, ""))]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


RUN_SECTIONS = ("data", "illumination", "compression", "nuclei", "crops", "compute", "imagenet_weights", "source_run", "train",
                "features", "inference", "cellprofiler", "outputs", "profiles", "retrieval")
"""Every top-level section a ``raycp run`` YAML may hold. A command that needs fewer (``raycp
preprocess``, ``raycp index summarize``) reads the same file and skips the sections of the other
stages; a key in no section is still an error (a test keeps this list equal to the run config's)."""


def _override_keys(overrides) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides or () if "=" in item}


def _config_error(exc: ValidationError, source: str, overrides=(), label: str = "--set") -> ConfigError:
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo first: it explains the rest
    where = ".".join(str(p) for p in err["loc"])
    given = _override_keys(overrides)
    if where and any(where == k or where.startswith(f"{k}.") or k.startswith(f"{where}.") for k in given):
        source = f"{label} {where}"
    if err["type"] == "extra_forbidden":
        return ConfigError(f"{source}: unknown key {where!r}", fix="remove it or check its spelling")
    if err["type"] == "missing":
        return ConfigError(f"{source}: missing key {where!r}", fix=f"set it in the file or with --set {where}=...")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not where:
        return ConfigError(f"{source}: {msg}", fix="fix the config file or pass --set KEY=VALUE")
    if any(str(p).isdigit() for p in err["loc"]):  # an item of a list: --set cannot address it
        return ConfigError(f"{source}: {where}: {msg}", fix=f"fix item {where} in the file, or --set the whole list")
    return ConfigError(f"{source}: {where}: {msg}", fix=f"fix {where} in the file or with --set {where}=...")


def build_config(model: type[BaseModel], path: str | None = None,
                 overrides: list[str] | tuple[str, ...] | None = None, *, base: dict | None = None,
                 source: str | None = None, skip_other_sections: bool = False) -> Any:
    """Load ``model`` from ``base`` (e.g. a preset) < a YAML file (optional) < CLI overrides.

    ``skip_other_sections``: a run YAML's sections that ``model`` does not have
    (:data:`RUN_SECTIONS`) are skipped, so one file serves every stage command. Raises
    :class:`ConfigError` naming the file, or ``--set KEY`` when the bad key came from the command
    line; an unknown key is reported before any other problem."""
    tree: dict = {}
    source = path or source or "config"
    if path is not None:
        try:
            tree = yaml.safe_load(urls.read_bytes(path)) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found", fix="check the path") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML", fix="fix the YAML syntax") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping", fix="write key: value pairs")
    tree = _merge(_merge(copy.deepcopy(base or {}), tree), parse_overrides(overrides))
    if skip_other_sections:
        tree = {k: v for k, v in tree.items() if k in model.model_fields or k not in RUN_SECTIONS}
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise _config_error(exc, source, overrides) from None


def apply_overrides(config: BaseModel, overrides: Mapping[str, Any]) -> Any:
    """A validated copy of ``config`` with dotted keys set: ``apply_overrides(cfg,
    {"data.output": "s3://b/trial-3", "profiles.sphere_lambda": 1e-3})``. What a sweep trial or a
    job changes of a run (values are Python values, not YAML text; ``config`` is not modified).

    Raises :class:`ConfigError` for an unknown key or an invalid value, naming the key."""
    tree = config.model_dump(mode="json")
    for key, value in overrides.items():
        _set_dotted(tree, str(key), value)
    try:
        return type(config).model_validate(tree)
    except ValidationError as exc:
        raise _config_error(exc, "overrides", [f"{k}=" for k in overrides], label="override") from None


def redact(tree: Any) -> Any:
    """Drop values of secret-looking keys (the written config never holds credentials)."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False)


def save_resolved(config: BaseModel, folder: str, name: str = "config.yaml") -> str:
    """Write the resolved config next to a run's outputs (atomic); returns its URL."""
    url = urls.join(folder, name)
    urls.atomic_write_text(url, dump_config(config))
    return url
