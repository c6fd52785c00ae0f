"""Settings, following the data center's Dynaconf conventions (SPEC §8).

``settings`` is a Dynaconf object reading ``settings.toml`` and ``.secrets.toml``
(``[default]`` plus the environment chosen by ``ENV_FOR_DYNACONF``, ``localdev`` unless
set) and ``CCAT_WORKFLOW_MANAGER_*`` environment variables. The Rust core reads the same
files the same way; :func:`to_rust` hands a Dynaconf object's values to it.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from dynaconf import Dynaconf

from ccat_workflow_manager._core import ConfigurationError, Settings, dynaconf_values

ENVVAR_PREFIX = "CCAT_WORKFLOW_MANAGER"
DEFAULT_ENV = "localdev"
SETTINGS_FILES = ["settings.toml", ".secrets.toml"]


def make_settings(**overrides: Any) -> Dynaconf:
    """A Dynaconf object configured like the Rust loader; keyword arguments pass through."""
    options: dict[str, Any] = {
        "envvar_prefix": ENVVAR_PREFIX,
        "settings_files": SETTINGS_FILES,
        "environments": True,
        "env": DEFAULT_ENV,
    }
    options.update(overrides)
    return Dynaconf(**options)


settings = make_settings()


def _plain(value: Any) -> Any:
    """Dynaconf values as JSON-like data (TOML dates become ISO 8601 text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    return value


def to_rust(dynaconf_settings: Dynaconf | None = None) -> Settings:
    """The typed Rust settings for a Dynaconf object (default: :data:`settings`).

    Raises :class:`ccat_workflow_manager.ConfigurationError` naming the bad key.
    """
    source = settings if dynaconf_settings is None else dynaconf_settings
    try:
        values = source.as_dict()
    except Exception as e:  # Dynaconf raises its parsers' own errors (TOMLDecodeError, ...)
        files = _settings_files(source)
        # The Rust loader reads the same files and names the one that is broken.
        try:
            dynaconf_values(files)
        except ConfigurationError as named:
            raise named from e
        raise ConfigurationError(f"the settings ({', '.join(files)}) cannot be read: {e}") from e
    return Settings.from_dict(_plain(values))


def _settings_files(source: Dynaconf) -> list[str]:
    """The settings files a Dynaconf object was made with (read without loading them)."""
    kwargs = getattr(source, "_kwargs", {}) or {}
    files = kwargs.get("settings_files") or kwargs.get("SETTINGS_FILE_FOR_DYNACONF") or SETTINGS_FILES
    if isinstance(files, str):
        files = [f.strip() for f in files.replace(";", ",").split(",") if f.strip()]
    return [str(f) for f in files]
