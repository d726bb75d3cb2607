"""Loading plugins from entry points and collecting their variants into a registry.

Nothing happens at import: :func:`make_host` builds a fresh host (tests do this), :func:`get_host` caches the one
the CLI uses. A plugin that fails to import or register is recorded, warned about and skipped, so one broken
distribution never takes ``anima`` down; ``ANIMA_STRICT_PLUGINS=1`` turns that into an exception.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import pluggy

from anima_core import hookspecs
from anima_core.kinds import KINDS, REGISTER_HOOKS, Kind
from anima_core.specs import VariantSpec

ENTRY_POINT_GROUP = "anima_core.plugins"
STRICT_ENV = "ANIMA_STRICT_PLUGINS"
DISABLE_ENV = "ANIMA_DISABLE_PLUGINS"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

Status = Literal["loaded", "failed", "disabled"]


class PluginError(Exception):
    """A plugin could not be loaded or registered, or two plugins clash (raised in strict mode or on use)."""


@dataclass
class PluginRecord:
    """One distribution's plugin, as ``anima plugins list`` shows it."""

    name: str  # entry-point name = the plugin's import name
    distribution: str
    version: str
    status: Status = "loaded"
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)
    failed_to: str | None = None  # "import", "register", "register its variants", "add its commands"
    conflicts: list[str] = field(default_factory=list)  # "<kind> '<name>'" it provides that another one does too

    def as_json(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "version": self.version, "status": self.status,
                "error": self.error, "provides": {k: sorted(v) for k, v in self.provides.items() if v},
                "conflicts": sorted(self.conflicts)}

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}"

    def unavailable_reason(self) -> str:
        """Why this plugin's variants are missing: ``failed to import (RuntimeError: boom)`` or ``is disabled``."""
        if self.status == "disabled":
            return f"is disabled ({DISABLE_ENV})"
        return f"failed to {self.failed_to or 'load'} ({self.error})"


@dataclass(frozen=True)
class Registration:
    """A variant spec and the distribution that provided it."""

    kind: Kind
    spec: VariantSpec
    plugin: PluginRecord

    @property
    def name(self) -> str:
        return self.spec.name


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _disabled_from_env() -> set[str]:
    return {_normalise(n) for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class Registry:
    """The variants of every kind, each attributed to its distribution."""

    def __init__(self, records: Iterable[PluginRecord] = ()) -> None:
        self._variants: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        self._clashes: dict[tuple[Kind, str], str] = {}
        self.conflicts: list[str] = []
        self._records = records if isinstance(records, list) else list(records)  # to explain a missing variant

    def add(self, reg: Registration) -> None:
        existing = self._variants[reg.kind].get(reg.name)
        if existing is not None:
            message = (f"{reg.kind} '{reg.name}' is provided by both {existing.plugin.label} and "
                       f"{reg.plugin.label}: uninstall one of them, or skip one with "
                       f"{DISABLE_ENV}={reg.plugin.name}")
            self.conflicts.append(message)
            self._clashes[(reg.kind, reg.name)] = message
            for record in (existing.plugin, reg.plugin):
                if f"{reg.kind} '{reg.name}'" not in record.conflicts:
                    record.conflicts.append(f"{reg.kind} '{reg.name}'")
            return
        self._variants[reg.kind][reg.name] = reg

    def lookup(self, kind: Kind, name: str) -> Registration | None:
        """The registration kept under a name (for a clash, the first provider's), without raising: for building the
        schema, which must not fail over a variant a config may not use. Runs use :meth:`get` / :meth:`spec`."""
        return self._variants[kind].get(name)

    def conflict(self, kind: Kind, name: str) -> str | None:
        """The message naming both distributions when two provide this variant, else None."""
        return self._clashes.get((kind, name))

    def unavailable(self) -> list[PluginRecord]:
        """Plugins that failed to load or are disabled (their variants are missing from this registry)."""
        return [r for r in self._records if r.status != "loaded"]

    def missing_hint(self, kind: Kind) -> str:
        """For an unknown variant name: the plugins that failed or are disabled, which may be the ones providing it
        (``""`` when every plugin loaded). What a failed import would have registered cannot be known."""
        bad = self.unavailable()
        if not bad:
            return ""
        which = "; ".join(f"{r.label} {r.unavailable_reason()}" for r in bad)
        return f"; not loaded, and possibly what provides this {kind}: {which} (see `anima plugins list`)"

    def names(self, kind: Kind) -> list[str]:
        return sorted(self._variants[kind])

    def registrations(self, kind: Kind) -> list[Registration]:
        return [self._variants[kind][n] for n in self.names(kind)]

    def get(self, kind: Kind, name: str) -> Registration:
        """The variant's registration; :class:`PluginError` for an unknown name or one two distributions provide
        (an error only when that variant is used: other variants keep working)."""
        clash = self._clashes.get((kind, name))
        if clash is not None:
            raise PluginError(clash)
        try:
            return self._variants[kind][name]
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"no {kind} named '{name}' is installed (installed: {installed})"
                              f"{self.missing_hint(kind)}") from None

    def spec(self, kind: Kind, name: str) -> VariantSpec:
        return self.get(kind, name).spec

    def check(self) -> None:
        """Raise if two distributions provide the same variant name anywhere (strict mode, ``plugins list``); a
        config is refused only when it uses such a name (:meth:`get`)."""
        if self.conflicts:
            raise PluginError("; ".join(self.conflicts))


class PluginHost:
    """A pluggy manager plus the records of every plugin it tried to load, and the registry built from them."""

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self._registry: Registry | None = None
        self._registry_error: PluginError | None = None  # strict mode: the failure, raised again without a rebuild

    # -- loading -------------------------------------------------------------------------------------------
    def _fail(self, record: PluginRecord, what: str, exc: BaseException) -> None:
        from anima_core import __version__

        record.status = "failed"
        record.failed_to = what
        record.error = f"{type(exc).__name__}: {exc}"
        if self.pm.get_plugin(record.name) is not None:
            self.pm.unregister(name=record.name)
        if self.strict:
            raise PluginError(f"plugin {record.label} failed to {what}: {record.error}") from exc
        print(f"warning: skipped plugin {record.label}: failed to {what} ({record.error}); "
              f"check it is compatible with anima-core {__version__}", file=sys.stderr)

    def add_plugin(self, plugin: object, *, name: str, distribution: str, version: str = "0") -> PluginRecord:
        """Register an already-imported plugin (module or object); in-process plugins in tests use this."""
        record = PluginRecord(name=name, distribution=distribution, version=version)
        self.records.append(record)
        try:
            self.pm.register(plugin, name=name)
            unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if hc.spec is None]
            if unknown:
                raise PluginError(f"implements unknown hook(s) {', '.join(sorted(unknown))}")
        except Exception as exc:
            self._fail(record, "register", exc)
        self._registry = self._registry_error = None
        return record

    def load_entry_points(self, entry_points: Iterable[md.EntryPoint] | None = None,
                          disabled: Iterable[str] = ()) -> None:
        eps = list(md.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points)
        blocked = {_normalise(n) for n in disabled}
        for ep in sorted(eps, key=lambda e: (e.dist.name if e.dist else "", e.name)):
            dist_name = ep.dist.name if ep.dist else ep.name
            version = ep.dist.version if ep.dist else "unknown"
            if _normalise(ep.name) in blocked or _normalise(dist_name) in blocked:
                self.records.append(PluginRecord(ep.name, dist_name, version, status="disabled"))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                record = PluginRecord(ep.name, dist_name, version)
                self.records.append(record)
                self._fail(record, "import", exc)
                continue
            self.add_plugin(plugin, name=ep.name, distribution=dist_name, version=version)

    # -- registry ------------------------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """Built on first use. In strict mode a failure is kept and raised again on every later use, so a broken
        plugin is not re-run (nor reported) once per caller."""
        if self._registry is None:
            if self._registry_error is not None:
                raise self._registry_error
            try:
                self._registry = self._build_registry()
            except PluginError as exc:
                self._registry_error = exc
                raise
        return self._registry

    def _build_registry(self) -> Registry:
        registry = Registry(self.records)
        for record in self.records:
            record.conflicts = []
            if record.status != "loaded":
                continue
            record.provides = {}
            try:
                found = self._collect(record)
            except Exception as exc:
                self._fail(record, "register its variants", exc)
                continue
            for reg in found:
                registry.add(reg)
                record.provides.setdefault(reg.kind, []).append(reg.name)
        if self.strict:
            registry.check()
        return registry

    def _collect(self, record: PluginRecord) -> list[Registration]:
        from anima_core.options import OPTIONS_BASE

        plugin = self.pm.get_plugin(record.name)
        found: list[Registration] = []
        for kind in KINDS:
            def register(spec: VariantSpec, _kind: Kind = kind) -> None:
                _check_spec(_kind, spec, OPTIONS_BASE[_kind])
                found.append(Registration(_kind, spec, record))

            caller = getattr(self.pm.hook, REGISTER_HOOKS[kind])
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(**{a: register for a in impl.argnames})
        return found

    def add_commands(self, app: Any) -> None:
        """Let every loaded plugin add its CLI sub-commands; a failing plugin is reported and skipped."""
        for record in self.records:
            if record.status != "loaded":
                continue
            plugin = self.pm.get_plugin(record.name)
            for impl in self.pm.hook.anima_register_commands.get_hookimpls():
                if impl.plugin is plugin:
                    try:
                        impl.function(**{a: app for a in impl.argnames})
                    except Exception as exc:
                        self._fail(record, "add its commands", exc)


def _check_spec(kind: Kind, spec: Any, base: type) -> None:
    if not isinstance(spec, VariantSpec):
        raise PluginError(f"{kind} registration must be a VariantSpec, got {type(spec).__name__}")
    if not _NAME_RE.match(spec.name):
        raise PluginError(f"{kind} name {spec.name!r} must be lower_snake_case")
    if not (isinstance(spec.options, type) and issubclass(spec.options, base)):
        raise PluginError(f"{kind} '{spec.name}': options must subclass anima_core.options.{base.__name__}")
    if spec.type_literal() != (spec.name,):
        raise PluginError(f"{kind} '{spec.name}': options.type must be Literal[{spec.name!r}] "
                          f"(found {spec.type_literal() or 'no Literal'})")
    if not callable(spec.build):
        raise PluginError(f"{kind} '{spec.name}': build must be callable")


def make_host(*, entry_points: Iterable[md.EntryPoint] | None = None, disabled: Iterable[str] | None = None,
              strict: bool | None = None, plugins: Iterable[tuple[str, object]] = ()) -> PluginHost:
    """A fresh host: installed entry points (or the given ones) plus in-process ``(name, plugin)`` pairs.

    ``disabled`` and ``strict`` default to ``ANIMA_DISABLE_PLUGINS`` and ``ANIMA_STRICT_PLUGINS``.
    """
    host = PluginHost(strict=_truthy(os.environ.get(STRICT_ENV)) if strict is None else strict)
    host.load_entry_points(entry_points, _disabled_from_env() if disabled is None else disabled)
    for name, plugin in plugins:
        module = plugin if isinstance(plugin, types.ModuleType) else None
        dist = getattr(module, "__name__", name) if module else name
        host.add_plugin(plugin, name=name, distribution=dist, version="in-process")
    return host


_HOST: PluginHost | None = None
_HOST_ERROR: PluginError | None = None


def get_host() -> PluginHost:
    """The process-wide host, built on first use. A strict-mode failure is kept: later calls raise the same error
    without importing the plugins again."""
    global _HOST, _HOST_ERROR
    if _HOST is None:
        if _HOST_ERROR is not None:
            raise _HOST_ERROR
        try:
            _HOST = make_host()
        except PluginError as exc:
            _HOST_ERROR = exc
            raise
    return _HOST


def set_host(host: PluginHost | None) -> None:
    """Replace (or with None, drop) the process-wide host and everything derived from it."""
    global _HOST, _HOST_ERROR
    _HOST, _HOST_ERROR = host, None
    from anima_core.config import schema

    schema.reset()
