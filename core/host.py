"""The plugin host: finds matcher and backend plugins through the `matchrt` entry-point group."""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pluggy

from . import hookspecs
from .errors import MatchrtError
from .types import BackendInfo, MatcherInfo

GROUP = "matchrt"
ENV_FILTER = "MATCHRT_PLUGINS"


@dataclass
class PluginRecord:
    name: str
    module: str
    distribution: str
    version: str
    builtin: bool
    error: Optional[str] = None


@dataclass
class Host:
    pm: pluggy.PluginManager
    records: dict[str, PluginRecord] = field(default_factory=dict)
    _matchers: Optional[dict[str, MatcherInfo]] = None
    _backends: Optional[dict[str, BackendInfo]] = None
    _owner: dict[str, str] = field(default_factory=dict)

    # -- registration ----------------------------------------------------------------------
    def matchers(self) -> dict[str, MatcherInfo]:
        if self._matchers is None:
            self._matchers = {}
            self._collect("register_matchers", self._matchers)
        return self._matchers

    def backends(self) -> dict[str, BackendInfo]:
        if self._backends is None:
            self._backends = {}
            self._collect("register_backends", self._backends)
        return self._backends

    def _collect(self, hook_name: str, into: dict[str, Any]) -> None:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or "?"

            def register(info: Any, _plugin: str = plugin_name) -> None:
                if info.name in into:
                    warnings.warn(
                        f"plugin {_plugin} registers {info.name!r} again; keeping the one from "
                        f"{self._owner.get(info.name)}",
                        stacklevel=2,
                    )
                    return
                into[info.name] = info
                self._owner[info.name] = _plugin

            others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
            try:
                self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
                warnings.warn(f"plugin {plugin_name} failed in {hook_name}: {exc}", stacklevel=2)

    def matcher(self, name: str) -> MatcherInfo:
        found = self.matchers()
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise MatchrtError(
                f"unknown matcher {name!r}. Installed matchers: {known}. "
                "Run `matchrt plugins` to see what is installed."
            )
        return found[name]

    def backend(self, name: str) -> BackendInfo:
        found = self.backends()
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise MatchrtError(f"unknown backend {name!r}. Installed backends: {known}.")
        info = found[name]
        reason = info.unavailable()
        if reason:
            raise MatchrtError(f"backend {name!r} is not usable here: {reason}")
        return info

    def owner(self, name: str) -> str:
        self.matchers()
        self.backends()
        return self._owner.get(name, "?")

    def invalidate(self) -> None:
        self._matchers = None
        self._backends = None
        self._owner.clear()

    # -- test support ------------------------------------------------------------------------
    @contextmanager
    def plugin(self, obj: Any, name: str) -> Iterator[None]:
        """Register a plugin object for the duration of a `with` block (tests, notebooks)."""
        self.pm.register(obj, name=name)
        self.pm.check_pending()
        self.invalidate()
        try:
            yield
        finally:
            self.pm.unregister(obj)
            self.invalidate()

    def hook_names(self, plugin: Any) -> list[str]:
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(c.name for c in callers)


def _wanted(name: str, builtin: bool) -> bool:
    value = os.environ.get(ENV_FILTER)
    if value is None or builtin:
        return True
    return name in {s.strip() for s in value.split(",") if s.strip()}


def create_host(load_entry_points: bool = True) -> Host:
    """A fresh host; with entry points loaded (built-ins always, third parties per MATCHRT_PLUGINS)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    host = Host(pm=pm)
    if load_entry_points:
        for ep in md.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            builtin = dist == "matchrt"
            record = PluginRecord(ep.name, ep.value, dist, version, builtin)
            if not _wanted(ep.name, builtin) or pm.has_plugin(ep.name):
                continue
            host.records[ep.name] = record
            module = None
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
                # a misspelt hook name fails loudly, and takes only its own plugin down
                pm.check_pending()
            except Exception as exc:  # noqa: BLE001 - name the broken plugin, keep going
                if module is not None and pm.is_registered(module):
                    pm.unregister(module)
                record.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"matchrt plugin {ep.name!r} ({dist}) failed to load: {record.error}",
                              stacklevel=2)
    return host


_HOST: Optional[Host] = None


def get_host() -> Host:
    """The process-wide host, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = create_host()
    return _HOST
