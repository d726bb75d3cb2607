"""Reading a YAML config, applying ``--set key.path=value`` overrides and validating it, reporting every problem
at once with its dotted path."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from anima_core.config.schema import PLUGIN_SECTIONS, default_variant, training_config_model
from anima_core.config.sections import TrainingConfig
from anima_core.plugin_host import Registry
from anima_core.specs import Issue, error, warning

# Kinds every training config needs; the inference sampler only when previews are configured.
_ALWAYS_NEEDED = ("adapter", "optimizer", "lr_scheduler", "loss", "timestep_sampler")


class ConfigError(Exception):
    """A config that cannot be used; ``issues`` holds every error (and any warnings) found."""

    def __init__(self, issues: list[Issue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        super().__init__(self.render())

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        n = len(self.errors)
        lines = [f"{where}{n} error{'s' if n != 1 else ''} in config"]
        lines += [f"  {i.severity}: {i}" for i in self.issues]
        return "\n".join(lines)


@dataclass
class LoadedConfig:
    config: TrainingConfig
    warnings: list[Issue]
    source: str | None = None


def read_config_file(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([error("", f"config file not found: {path}")])
    if not path.is_file():
        raise ConfigError([error("", f"expected a YAML file, found a directory: {path}")])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([error("", f"cannot read {path}: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([error("", f"invalid YAML{where}: {problem}")], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([error("", f"expected a mapping of sections at the top level, found "
                                     f"{type(data).__name__}")], source=str(path))
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``key.path=value`` overrides; the value is parsed as YAML (``1e-4``, ``true``, ``[512, 768]``)."""
    data = copy.deepcopy(data)
    issues: list[Issue] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            issues.append(error("--set", f"expected key.path=value, found {item!r}"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                issues.append(error(key, f"cannot set inside {part!r}: it holds a {type(child).__name__}"))
                break
            node = child
        else:
            node[parts[-1]] = value
    if issues:
        raise ConfigError(issues)
    return data


def _fill_variant_types(data: dict[str, Any], registry: Registry) -> None:
    # A section given without ``type`` means the default variant, as a user writing ``optimizer: {lr: 1e-4}``
    # expects.
    for path, kind in PLUGIN_SECTIONS.items():
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and "type" not in node:
            name = default_variant(registry, kind)
            if name is not None:
                node["type"] = name


def _missing_kind_issues(data: dict[str, Any], registry: Registry) -> list[Issue]:
    issues = []
    for path, kind in PLUGIN_SECTIONS.items():
        if registry.names(kind):
            continue
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        sample = data.get("sample") if isinstance(data.get("sample"), dict) else {}
        needed = kind in _ALWAYS_NEEDED or bool(sample.get("prompts"))
        if node is not None or needed:
            issues.append(error(".".join(path), f"no {kind} variant is installed (a plugin that provides one may "
                                                f"be disabled or have failed to load: see `anima plugins list`)"))
    return issues


def _used_variants(data: dict[str, Any], registry: Registry) -> dict[tuple[str, ...], str]:
    """The variant each plugin section of the config uses: its ``type``, or the default for a needed section left
    out (after :func:`_fill_variant_types`)."""
    used = {}
    sample = data.get("sample") if isinstance(data.get("sample"), dict) else {}
    for path, kind in PLUGIN_SECTIONS.items():
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("type"), str):
            used[path] = node["type"]
        elif node is None and (kind in _ALWAYS_NEEDED or bool(sample.get("prompts"))):
            name = default_variant(registry, kind)
            if name is not None:
                used[path] = name
    return used


def _conflict_issues(data: dict[str, Any], registry: Registry) -> list[Issue]:
    # Two distributions providing one name block only the configs that use that name.
    issues = []
    for path, name in _used_variants(data, registry).items():
        clash = registry.conflict(PLUGIN_SECTIONS[path], name)
        if clash is not None:
            issues.append(error(".".join(path) + ".type", clash))
    return issues


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...], registry: Registry) -> list[str]:
    # Walk the generated model along the error location to list the keys valid where the typo was made.
    current: Any = model
    path: tuple[str, ...] = ()
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        if path in PLUGIN_SECTIONS and isinstance(part, str) and part in registry.names(PLUGIN_SECTIONS[path]):
            current = registry.lookup(PLUGIN_SECTIONS[path], part).spec.options
            continue
        info = current.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return []
        path += (part,)
        kind = PLUGIN_SECTIONS.get(path)
        current = info.annotation if kind is None else current
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _dotted(loc: tuple[Any, ...], registry: Registry) -> str:
    parts: list[str] = []
    for item in loc:
        section = PLUGIN_SECTIONS.get(tuple(parts))
        if section is not None and isinstance(item, str) and item in registry.names(section):
            continue  # the discriminator tag pydantic puts in the location
        parts.append(str(item))
    return ".".join(parts)


def _pydantic_issues(exc: ValidationError, model: type[BaseModel], registry: Registry) -> list[Issue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _dotted(loc, registry)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, _allowed_keys(model, loc, registry), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            issues.append(error(path, f"unknown key{hint}"))
        elif kind == "union_tag_invalid":
            section = PLUGIN_SECTIONS.get(tuple(path.split(".")))
            installed = ", ".join(registry.names(section)) if section else err["ctx"].get("expected_tags")
            hint = registry.missing_hint(section) if section else ""
            issues.append(error(f"{path}.type", f"unknown {section or 'variant'} {err['ctx']['tag']!r} "
                                                f"(installed: {installed}){hint}"))
        else:
            msg = err["msg"].removeprefix("Value error, ") or kind
            msg = msg[0].lower() + msg[1:]
            found = err.get("input")
            if kind == "value_error" or isinstance(found, dict) or "input" not in err:
                issues.append(error(path, msg))  # our own validators already say what they found
                continue
            shown = repr(found)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            issues.append(error(path, f"{msg} (found {shown})"))
    return issues


def _capability_issues(config: TrainingConfig, registry: Registry) -> list[Issue]:
    # Core acts on declared capabilities without naming any optimizer.
    issues: list[Issue] = []
    if config.optimizer is None or config.lr_scheduler is None:
        return issues
    caps = registry.spec("optimizer", config.optimizer.type).capabilities
    if "schedule_free" in caps and config.lr_scheduler.type != "constant":
        issues.append(error("lr_scheduler.type", f"optimizer '{config.optimizer.type}' is schedule-free: only "
                                                 f"the 'constant' scheduler is allowed (found "
                                                 f"'{config.lr_scheduler.type}')"))
    if "adaptive_lr" in caps and config.optimizer.lr != 1.0:
        issues.append(warning("optimizer.lr", f"optimizer '{config.optimizer.type}' adapts its step size: lr is a "
                                              f"multiplier, usually 1.0 (found {config.optimizer.lr})"))
    return issues


def _plugin_issues(config: TrainingConfig, registry: Registry) -> list[Issue]:
    issues: list[Issue] = []
    for path, kind in PLUGIN_SECTIONS.items():
        node: Any = config
        for part in path:
            node = getattr(node, part, None)
        if node is None:
            continue
        spec = registry.spec(kind, node.type)
        if spec.validate is not None:
            issues.extend(spec.validate(node, config))
    return issues


def validate_config(data: dict[str, Any], registry: Registry, source: str | None = None) -> LoadedConfig:
    """Validate a config mapping; raise :class:`ConfigError` with every error, or return config + warnings."""
    data = copy.deepcopy(data)
    _fill_variant_types(data, registry)
    model = training_config_model(registry)
    clashes = _conflict_issues(data, registry)
    issues = _missing_kind_issues(data, registry) + clashes
    config = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        # a clashing section was checked against one provider's options only: its findings would mislead
        clashing = tuple(i.path.removesuffix(".type") for i in clashes)
        issues += [i for i in _pydantic_issues(exc, model, registry)
                   if not any(i.path == c or i.path.startswith(c + ".") for c in clashing)]
    if config is not None and not issues:
        issues += _capability_issues(config, registry) + _plugin_issues(config, registry)
    if config is None or any(i.severity == "error" for i in issues):
        raise ConfigError(issues, source=source)
    return LoadedConfig(config, issues, source)


def load_config(path: Path | str, overrides: Iterable[str], registry: Registry) -> LoadedConfig:
    try:
        data = apply_overrides(read_config_file(path), overrides)
    except ConfigError as exc:
        exc.source = exc.source or str(path)
        raise ConfigError(exc.issues, exc.source) from None
    return validate_config(data, registry, source=str(path))
