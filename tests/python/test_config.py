"""The Rust settings loader against the real Dynaconf package, on the same files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccat_workflow_manager import ConfigurationError, Settings, _core
from ccat_workflow_manager.config import _plain, make_settings, to_rust

FIXTURES = Path(__file__).parent / "fixtures" / "dynaconf"

SCENARIOS = {
    "defaults-and-localdev": {},
    "staging-section": {"ENV_FOR_DYNACONF": "staging"},
    "production-upper-case-env": {"ENV_FOR_DYNACONF": "PRODUCTION"},
    "env-var-overrides-and-casts": {
        "CCAT_WORKFLOW_MANAGER_REDIS_PORT": "6380",
        "CCAT_WORKFLOW_MANAGER_TRIGGER_MANAGER_POLL_INTERVAL": "2.5",
        "CCAT_WORKFLOW_MANAGER_FROM_GLOBAL": "False",
        "CCAT_WORKFLOW_MANAGER_LIST_VALUE": "[1, 'a', 2.0]",
        "CCAT_WORKFLOW_MANAGER_TABLE_VALUE": "{a = 1, b = {c = 'x'}}",
        "CCAT_WORKFLOW_MANAGER_LEADING_ZERO": "007",
        "CCAT_WORKFLOW_MANAGER_QUOTED": "'42'",
        "CCAT_WORKFLOW_MANAGER_WITH_SPACES": "hello world",
        "CCAT_WORKFLOW_MANAGER_INT_CAST": "@int 12",
        "CCAT_WORKFLOW_MANAGER_FLOAT_CAST": "@float 3",
        "CCAT_WORKFLOW_MANAGER_BOOL_CAST": "@bool on",
        "CCAT_WORKFLOW_MANAGER_STR_CAST": "@str 123",
        "CCAT_WORKFLOW_MANAGER_JSON_CAST": '@json {"k": [1, null]}',
        "CCAT_WORKFLOW_MANAGER_NONE_CAST": "@none",
        "CCAT_WORKFLOW_MANAGER_UNKNOWN_CAST": "@unknown stays",
        "CCAT_WORKFLOW_MANAGER_FROM_DEFAULT_ONLY": "@del",
        "CCAT_WORKFLOW_MANAGER_URL": "postgresql://u:p@h:5432/db",
        "ccat_workflow_manager_lower_prefix": "ignored",
        "DYNACONF_FROM_DYNACONF_PREFIX": "dyn",
    },
    "nested-keys": {
        "CCAT_WORKFLOW_MANAGER_DATABASE__HOST": "db-env",
        "CCAT_WORKFLOW_MANAGER_DATABASE__username": "operator",
        "CCAT_WORKFLOW_MANAGER_DATABASE__NEW_KEY": "1",
        "CCAT_WORKFLOW_MANAGER_NESTED__DEEPER__X": "5",
        "CCAT_WORKFLOW_MANAGER_BRAND__NEW__LEAF": "true",
        "CCAT_WORKFLOW_MANAGER_REDIS_HOST__X": "scalar-parent-replaced",
        "CCAT_WORKFLOW_MANAGER_MERGED_TABLE": "@merge {z = 26}",
    },
    "merge-enabled": {"MERGE_ENABLED_FOR_DYNACONF": "true"},
    "explicit-settings-file": {"SETTINGS_FILE_FOR_DYNACONF": str(FIXTURES / "settings.toml")},
}

DYNACONF_PREFIXES = ("CCAT_WORKFLOW_MANAGER_", "DYNACONF_", "CCAT_OPS_DB_")


@pytest.fixture
def clean_env(monkeypatch):
    """An environment without the developer's own settings, in the fixture directory."""
    for key in list(os.environ):
        if key.upper().startswith(DYNACONF_PREFIXES) or key.endswith("_FOR_DYNACONF"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(FIXTURES)
    return monkeypatch


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rust_loader_reads_what_dynaconf_reads(clean_env, scenario):
    for key, value in SCENARIOS[scenario].items():
        clean_env.setenv(key, value)
    expected = _plain(make_settings().as_dict())
    values, files = _core.dynaconf_values(env=dict(os.environ), cwd=str(FIXTURES))
    assert values == expected
    assert [Path(f).name for f in files][: 1] == ["settings.toml"]


@pytest.mark.parametrize("scenario", ["defaults-and-localdev", "staging-section", "production-upper-case-env"])
def test_typed_settings_agree_from_either_side(clean_env, scenario):
    for key, value in SCENARIOS[scenario].items():
        clean_env.setenv(key, value)
    from_python = to_rust(make_settings())
    from_rust = Settings.load()
    assert from_python == from_rust
    shown = from_rust.as_dict()
    assert shown["env"] == (SCENARIOS[scenario].get("ENV_FOR_DYNACONF") or "localdev").lower()
    assert shown["redis"]["password"] == "********"
    for secret in ("not-a-real-secret", "prod-secret"):
        assert secret not in repr(from_rust) and secret not in str(shown)


def test_sections_resolve_as_documented(clean_env):
    shown = Settings.load().as_dict()
    assert shown["hpc_backend"] == "slurm"
    assert shown["slurm_partition"] == "cpu"
    clean_env.setenv("ENV_FOR_DYNACONF", "staging")
    shown = Settings.load().as_dict()
    assert (shown["hpc_backend"], shown["k8s_namespace"]) == ("kubernetes", "ccat-workflows-staging")


def test_invalid_values_raise_configuration_error_naming_the_key(clean_env):
    clean_env.setenv("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "pbs")
    with pytest.raises(ConfigurationError, match="HPC_BACKEND"):
        Settings.load()
    with pytest.raises(ConfigurationError, match="REDIS_PORT"):
        Settings.from_dict({"redis_port": "many"})


def test_ops_db_variables_reach_the_rust_side(clean_env):
    clean_env.setenv("CCAT_OPS_DB_DATABASE_TYPE", "postgresql")
    clean_env.setenv("CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST", "ops-db.example")
    db = to_rust(make_settings()).as_dict()["database"]
    assert db["type"] == "postgresql" and db["host"] == "ops-db.example"
    assert db["password"] == "********"


def test_a_malformed_settings_file_is_a_configuration_error_naming_it(clean_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.toml").write_text("[default\nhpc_backend = 'slurm'\n")
    with pytest.raises(ConfigurationError, match="settings.toml"):
        to_rust(make_settings())
