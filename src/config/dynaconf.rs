//! A settings loader that gives the same values as Python Dynaconf 3 configured as
//!
//! ```python
//! Dynaconf(envvar_prefix="CCAT_WORKFLOW_MANAGER", environments=True, env="localdev",
//!          settings_files=["settings.toml", ".secrets.toml"])
//! ```
//!
//! so that the Rust managers and the Python workers read one configuration the same way.
//! What it follows (checked against dynaconf 3.2 and 3.3; `tests/python/test_config.py`
//! runs the real package on the same fixtures):
//!
//! * Each file applies its tables `[default]`, `[<prefix>]`, `[<env>]`, `[global]` in that
//!   order (table names case-insensitive); keys outside those tables are ignored. A later
//!   file overrides an earlier one whatever the table.
//! * Top-level keys are upper-cased; nested keys keep their case. `a__b` (or `a.b`) in a
//!   key is a nested path. A later value replaces an earlier one unless a `dynaconf_merge`
//!   marker (or `MERGE_ENABLED_FOR_DYNACONF`) asks for a deep merge.
//! * Environment variables `DYNACONF_*` then `<PREFIX>_*` (prefix case-sensitive) override
//!   everything; values are parsed as TOML with the raw string as fallback; `__` paths
//!   always merge into existing tables, matching existing keys case-insensitively.
//! * `@int @float @bool @json @str @none @del @merge` casts, in files and environment.
//!
//! Not supported, and reported as errors naming the key: the lazy casts (`@format`,
//! `@jinja`, `@get`, `@read_file`) and Dynaconf's search next to the running Python script
//! (files are searched from `ROOT_PATH_FOR_DYNACONF` or the working directory upwards).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The envvar prefix, and (lower-cased) the name of the legacy per-project table.
pub const PREFIX: &str = "CCAT_WORKFLOW_MANAGER";
/// The environment used when `ENV_FOR_DYNACONF` is not set.
pub const DEFAULT_ENV: &str = "localdev";
/// The settings files searched for, in load order.
pub const SETTINGS_FILES: &[&str] = &["settings.toml", ".secrets.toml"];

const MERGE_MARKER: &str = "dynaconf_merge";
const MERGE_UNIQUE_MARKER: &str = "dynaconf_merge_unique";

#[derive(Debug, thiserror::Error)]
pub enum DynaconfError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("setting {key} (from {origin}): {message}")]
    Value {
        key: String,
        origin: String,
        message: String,
    },
}

/// What the loader reads from the process: environment variables and the working directory.
/// Passed in explicitly so tests (and Python) can give their own.
#[derive(Debug, Clone)]
pub struct LoadContext {
    pub env_vars: BTreeMap<String, String>,
    pub cwd: PathBuf,
}

impl LoadContext {
    /// A context of the given variables and working directory, not this process's.
    pub fn new<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
        cwd: impl Into<PathBuf>,
    ) -> Self {
        LoadContext {
            env_vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            cwd: cwd.into(),
        }
    }

    pub fn from_process() -> Self {
        LoadContext {
            env_vars: std::env::vars().collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env_vars.get(name).map(String::as_str)
    }

    /// The environments to load, lower-cased: `ENV_FOR_DYNACONF` or [`DEFAULT_ENV`].
    pub fn environments(&self) -> Vec<String> {
        let env = self.var("ENV_FOR_DYNACONF").unwrap_or(DEFAULT_ENV);
        env.split(',')
            .map(|e| e.trim().to_lowercase())
            .filter(|e| !e.is_empty())
            .collect()
    }

    fn merge_enabled(&self) -> bool {
        self.var("MERGE_ENABLED_FOR_DYNACONF").is_some_and(|v| {
            matches!(
                v.trim().to_lowercase().as_str(),
                "true" | "1" | "on" | "yes"
            )
        })
    }
}

/// The result of loading: the settings as Dynaconf's `as_dict()` shows them, the files
/// that were read, and where each top-level key came from (for error messages).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub values: Map<String, Value>,
    pub files: Vec<PathBuf>,
    pub origins: BTreeMap<String, String>,
}

/// Loads the settings files and environment variables. `explicit_files`, when given,
/// plays the part of `SETTINGS_FILE_FOR_DYNACONF` (which it overrides).
pub fn load(
    ctx: &LoadContext,
    explicit_files: Option<&[PathBuf]>,
) -> Result<Loaded, DynaconfError> {
    let mut loaded = Loaded::default();
    let merge_all = ctx.merge_enabled();
    for path in settings_files(ctx, explicit_files) {
        let text = std::fs::read_to_string(&path).map_err(|source| DynaconfError::Read {
            path: path.clone(),
            source,
        })?;
        load_toml_text(&mut loaded, &text, &path, &ctx.environments(), merge_all)?;
        loaded.files.push(path);
    }
    load_env_vars(&mut loaded, ctx)?;
    Ok(loaded)
}

/// The files to read, in order, each found the way Dynaconf finds it.
fn settings_files(ctx: &LoadContext, explicit: Option<&[PathBuf]>) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = match explicit {
        Some(files) => files.to_vec(),
        None => match ctx.var("SETTINGS_FILE_FOR_DYNACONF") {
            Some(list) => parse_file_list(list),
            None => SETTINGS_FILES.iter().map(PathBuf::from).collect(),
        },
    };
    if let Some(secrets) = ctx.var("SECRETS_FOR_DYNACONF") {
        names.push(PathBuf::from(secrets));
    }
    // `settings.local.toml` next to each file is loaded after all the others.
    let locals: Vec<PathBuf> = names.iter().filter_map(|n| local_variant(n)).collect();

    let root = ctx
        .var("ROOT_PATH_FOR_DYNACONF")
        .map(|r| ctx.cwd.join(r))
        .unwrap_or_else(|| ctx.cwd.clone());
    let mut found = Vec::new();
    // Files after the first are searched from the directory where the first was found.
    let mut project_root: Option<PathBuf> = None;
    for name in names.iter().chain(locals.iter()) {
        let base = project_root.clone().unwrap_or_else(|| root.clone());
        if let Some(path) = find_file(name, &base, &ctx.cwd) {
            if project_root.is_none() {
                project_root = path.parent().map(Path::to_path_buf);
            }
            if !found.contains(&path) {
                found.push(path);
            }
        }
    }
    found
}

/// `SETTINGS_FILE_FOR_DYNACONF` holds a comma list or a TOML list.
fn parse_file_list(list: &str) -> Vec<PathBuf> {
    let trimmed = list.trim();
    if trimmed.starts_with('[')
        && let Ok(Value::Array(items)) = parse_toml_value(trimmed)
    {
        return items
            .iter()
            .filter_map(Value::as_str)
            .map(PathBuf::from)
            .collect();
    }
    trimmed
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn local_variant(name: &Path) -> Option<PathBuf> {
    let stem = name.file_stem()?.to_str()?;
    let ext = name.extension()?.to_str()?;
    if stem.ends_with(".local") {
        return None;
    }
    Some(name.with_file_name(format!("{stem}.local.{ext}")))
}

/// Dynaconf's search: an absolute path as is; a relative one in `base` and its parents
/// (trying `D/name` then `D/config/name`), then in the working directory and its parents.
fn find_file(name: &Path, base: &Path, cwd: &Path) -> Option<PathBuf> {
    if name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    for start in [base, cwd] {
        for dir in start.ancestors() {
            for candidate in [dir.join(name), dir.join("config").join(name)] {
                if candidate.is_file() {
                    return Some(candidate);
                }
            }
        }
    }
    None
}

/// Applies one TOML document's environment tables to `loaded`.
pub fn load_toml_text(
    loaded: &mut Loaded,
    text: &str,
    path: &Path,
    environments: &[String],
    merge_all: bool,
) -> Result<(), DynaconfError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| DynaconfError::Toml {
        path: path.to_path_buf(),
        message: e.message().to_owned(),
    })?;
    // A file-level `dynaconf_merge = true` merges every table of the file.
    let file_merge =
        merge_all || doc.get(MERGE_MARKER).and_then(toml::Value::as_bool) == Some(true);
    // Table names are case-insensitive; a later duplicate replaces an earlier one.
    let mut tables: BTreeMap<String, toml::Table> = BTreeMap::new();
    for (name, value) in doc {
        if let toml::Value::Table(table) = value {
            tables.insert(name.to_lowercase(), table);
        }
    }
    let mut order = vec!["default".to_owned(), PREFIX.to_lowercase()];
    order.extend(environments.iter().cloned());
    order.push("global".to_owned());
    for section in order {
        let Some(table) = tables.get(&section) else {
            continue;
        };
        let origin = format!("{} [{section}]", path.display());
        let section_merge =
            file_merge || table.get(MERGE_MARKER).and_then(toml::Value::as_bool) == Some(true);
        for (key, value) in table {
            if key == MERGE_MARKER {
                continue;
            }
            let value = convert_toml_strings(toml_to_json(value), key, &origin)?;
            set_path(loaded, key, value, &origin, section_merge)?;
        }
    }
    Ok(())
}

/// Reads `DYNACONF_*` then `<PREFIX>_*` variables.
fn load_env_vars(loaded: &mut Loaded, ctx: &LoadContext) -> Result<(), DynaconfError> {
    for prefix in ["DYNACONF_".to_owned(), format!("{PREFIX}_")] {
        for (name, raw) in &ctx.env_vars {
            let Some(key) = name.strip_prefix(&prefix) else {
                continue;
            };
            if key.is_empty() || key.ends_with("_FOR_DYNACONF") {
                continue;
            }
            let origin = format!("environment variable {name}");
            let value = parse_env_value(raw).map_err(|message| DynaconfError::Value {
                key: key.to_uppercase(),
                origin: origin.clone(),
                message: hide_if_secret(key, message),
            })?;
            set_path(loaded, key, value, &origin, false)?;
        }
    }
    Ok(())
}

/// A value as the loader sees it before it is stored.
#[derive(Debug, Clone, PartialEq)]
enum Parsed {
    Set(Value),
    /// `@merge`: merge into the existing value.
    Merge(Value),
    /// `@del`: remove the key.
    Delete,
}

/// A parse error of a secret setting says what is wrong without quoting the value
/// (`@int s3cret` would otherwise print the password).
pub fn hide_if_secret(key: &str, message: String) -> String {
    let key = key.to_uppercase();
    if ["PASSWORD", "SECRET", "TOKEN"]
        .iter()
        .any(|s| key.contains(s))
    {
        "its value cannot be read (not shown: the setting is a secret)".into()
    } else {
        message
    }
}

/// An environment variable's text parsed as Dynaconf would, as a plain value
/// (`@del` reads as null, `@merge` as its argument).
pub fn parse_env_text(raw: &str) -> Result<Value, String> {
    match parse_env_value(raw)? {
        Parsed::Set(v) | Parsed::Merge(v) => Ok(v),
        Parsed::Delete => Ok(Value::Null),
    }
}

/// Parses an environment variable's text the way Dynaconf does.
fn parse_env_value(raw: &str) -> Result<Parsed, String> {
    // Dynaconf's boolean_fix: Python's spelling of booleans becomes TOML's.
    let text = match raw.trim() {
        "True" => "true",
        "False" => "false",
        _ => raw,
    };
    if let Some(parsed) = apply_cast(text)? {
        return Ok(parsed);
    }
    Ok(Parsed::Set(
        parse_toml_value(text).unwrap_or_else(|()| Value::String(text.to_owned())),
    ))
}

/// `key = <text>` parsed as TOML 1.0, as Dynaconf's `tomlfy` does.
fn parse_toml_value(text: &str) -> Result<Value, ()> {
    // The toml crate speaks TOML 1.1, whose inline tables may span lines and end with a
    // comma; Python's tomllib (TOML 1.0) rejects those, so Dynaconf keeps the raw string.
    if text.contains('{') && (text.contains('\n') || text.replace(' ', "").contains(",}")) {
        return Err(());
    }
    let doc: toml::Table = toml::from_str(&format!("key={text}")).map_err(|_| ())?;
    doc.get("key").map(toml_to_json).ok_or(())
}

/// The `@cast` at the start of a string, if it is one Dynaconf knows.
/// `Ok(None)` means the string is a plain value.
fn apply_cast(text: &str) -> Result<Option<Parsed>, String> {
    if !text.starts_with('@') {
        return Ok(None);
    }
    let (cast, arg) = match text.split_once(' ') {
        Some((cast, arg)) => (cast, arg),
        None => (text, ""),
    };
    let value = match cast {
        "@int" => {
            let digits = arg.trim().replace('_', "");
            Value::from(
                digits
                    .parse::<i64>()
                    .map_err(|_| format!("@int needs an integer, got {arg:?}"))?,
            )
        }
        "@float" => {
            let f: f64 = arg
                .trim()
                .parse()
                .map_err(|_| format!("@float needs a number, got {arg:?}"))?;
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| format!("@float needs a finite number, got {arg:?}"))?
        }
        "@bool" => Value::Bool(matches!(
            arg.trim().to_lowercase().as_str(),
            "t" | "true" | "enabled" | "1" | "on" | "yes"
        )),
        "@json" => serde_json::from_str(arg).map_err(|e| format!("@json: {e}"))?,
        "@str" => Value::String(arg.to_owned()),
        "@none" | "@null" | "@note" | "@comment" => Value::Null,
        "@del" => return Ok(Some(Parsed::Delete)),
        "@merge" => {
            let value =
                parse_toml_value(arg.trim()).unwrap_or_else(|()| Value::String(arg.to_owned()));
            return Ok(Some(Parsed::Merge(value)));
        }
        "@format" | "@jinja" | "@get" | "@read_file" | "@empty" | "@merge_unique" | "@insert" => {
            return Err(format!(
                "the Dynaconf cast {cast} is not supported by the Rust loader"
            ));
        }
        // Unknown casts stay literal strings, as in Dynaconf.
        _ => return Ok(None),
    };
    Ok(Some(Parsed::Set(value)))
}

/// Applies `@casts` to every string of a value read from a file.
fn convert_toml_strings(value: Value, key: &str, origin: &str) -> Result<Parsed, DynaconfError> {
    fn walk(value: Value) -> Result<Value, String> {
        Ok(match value {
            Value::String(s) => match apply_cast(&s)? {
                Some(Parsed::Set(v)) | Some(Parsed::Merge(v)) => v,
                Some(Parsed::Delete) => return Err("@del inside a nested value".into()),
                None => Value::String(s),
            },
            Value::Array(items) => {
                Value::Array(items.into_iter().map(walk).collect::<Result<_, _>>()?)
            }
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| Ok((k, walk(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other,
        })
    }
    let err = |message| DynaconfError::Value {
        key: key.to_uppercase(),
        origin: origin.to_owned(),
        message: hide_if_secret(key, message),
    };
    // A top-level cast string can also delete or merge.
    if let Value::String(s) = &value
        && let Some(parsed) = apply_cast(s).map_err(err)?
    {
        return Ok(parsed);
    }
    walk(value).map(Parsed::Set).map_err(err)
}

/// Stores `value` under a key that may be a nested path (`a__b`, `a.b`).
fn set_path(
    loaded: &mut Loaded,
    key: &str,
    value: Parsed,
    origin: &str,
    merge: bool,
) -> Result<(), DynaconfError> {
    let parts: Vec<&str> = key.split("__").flat_map(|p| p.split('.')).collect();
    let top = parts[0].to_uppercase();
    loaded.origins.insert(top.clone(), origin.to_owned());
    let rest = &parts[1..];

    // Environment variables always merge into existing tables along a nested path; so do
    // file keys with a path. A plain key replaces unless merging was asked for.
    let nested = !rest.is_empty();
    let (value, merge_leaf) = match value {
        Parsed::Delete => {
            delete_path(&mut loaded.values, &top, rest);
            return Ok(());
        }
        Parsed::Merge(v) => (v, true),
        Parsed::Set(v) => {
            let (v, marked) = strip_merge_markers(v);
            (v, merge || marked)
        }
    };
    if !nested {
        let slot = loaded.values.entry(top).or_insert(Value::Null);
        if merge_leaf {
            merge_into(slot, value);
        } else {
            *slot = value;
        }
        return Ok(());
    }
    let mut slot = loaded.values.entry(top).or_insert(Value::Null);
    for part in rest {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let map = slot.as_object_mut().expect("made an object above");
        let existing = map
            .keys()
            .find(|k| k.eq_ignore_ascii_case(part))
            .cloned()
            .unwrap_or_else(|| (*part).to_owned());
        slot = map.entry(existing).or_insert(Value::Null);
    }
    if merge_leaf {
        merge_into(slot, value);
    } else {
        *slot = value;
    }
    Ok(())
}

fn delete_path(values: &mut Map<String, Value>, top: &str, rest: &[&str]) {
    let Some((last, parents)) = rest.split_last() else {
        values.remove(top);
        return;
    };
    let mut slot = values.get_mut(top);
    for part in parents {
        slot = slot.and_then(Value::as_object_mut).and_then(|m| {
            m.iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(part))
                .map(|(_, v)| v)
        });
    }
    if let Some(map) = slot.and_then(Value::as_object_mut)
        && let Some(key) = map.keys().find(|k| k.eq_ignore_ascii_case(last)).cloned()
    {
        map.remove(&key);
    }
}

/// Removes `dynaconf_merge` markers from a value; true when the top of it carried one.
fn strip_merge_markers(value: Value) -> (Value, bool) {
    match value {
        Value::Object(mut map) => {
            let marked = map
                .remove(MERGE_MARKER)
                .is_some_and(|v| v == Value::Bool(true))
                | map
                    .remove(MERGE_UNIQUE_MARKER)
                    .is_some_and(|v| v == Value::Bool(true));
            let map = map
                .into_iter()
                .map(|(k, v)| (k, strip_merge_markers(v).0))
                .collect();
            (Value::Object(map), marked)
        }
        Value::Array(items) => {
            let before = items.len();
            let items: Vec<Value> = items
                .into_iter()
                .filter(|v| {
                    v.as_str() != Some(MERGE_MARKER) && v.as_str() != Some(MERGE_UNIQUE_MARKER)
                })
                .collect();
            let marked = items.len() != before;
            (Value::Array(items), marked)
        }
        other => (other, false),
    }
}

/// Dynaconf's `object_merge`: tables merge key by key (existing keys matched
/// case-insensitively keep their spelling), lists are appended, anything else replaced.
fn merge_into(slot: &mut Value, new: Value) {
    match (slot, new) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, value) in new {
                let key = old
                    .keys()
                    .find(|k| k.eq_ignore_ascii_case(&key))
                    .cloned()
                    .unwrap_or(key);
                match old.get_mut(&key) {
                    Some(existing) => merge_into(existing, value),
                    None => {
                        old.insert(key, value);
                    }
                }
            }
        }
        (Value::Array(old), Value::Array(new)) => old.extend(new),
        (slot, new) => *slot = new,
    }
}

/// TOML values as JSON values; date-times become their RFC 3339 text.
fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(python_isoformat(d)),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// A TOML date-time as Python's `isoformat()` writes the value tomllib makes of it, so
/// both loaders hand the same text on: `+00:00` for `Z`, microseconds as 6 digits or none.
fn python_isoformat(d: &toml::value::Datetime) -> String {
    use toml::value::Offset;
    let mut out = String::new();
    if let Some(date) = &d.date {
        out.push_str(&format!(
            "{:04}-{:02}-{:02}",
            date.year, date.month, date.day
        ));
    }
    if let Some(time) = &d.time {
        if d.date.is_some() {
            out.push('T');
        }
        out.push_str(&format!(
            "{:02}:{:02}:{:02}",
            time.hour,
            time.minute,
            time.second.unwrap_or(0)
        ));
        let micros = time.nanosecond.unwrap_or(0) / 1000;
        if micros > 0 {
            out.push_str(&format!(".{micros:06}"));
        }
    }
    match d.offset {
        Some(Offset::Z) => out.push_str("+00:00"),
        Some(Offset::Custom { minutes }) => {
            let sign = if minutes < 0 { '-' } else { '+' };
            let m = minutes.unsigned_abs();
            out.push_str(&format!("{sign}{:02}:{:02}", m / 60, m % 60));
        }
        None => {}
    }
    out
}

#[cfg(test)]
mod tests;
