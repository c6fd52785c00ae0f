//! Settings from a TOML settings file and environment variables: loaded or refused with
//! an error naming the setting, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ccat_workflow_manager::config::Settings;
use ccat_workflow_manager::config::dynaconf::{LoadContext, Loaded, load_toml_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A settings file, then after a NUL byte one `NAME=value` per line.
    let text = String::from_utf8_lossy(data);
    let (file, env) = text.split_once('\0').unwrap_or((&text, ""));
    let env_vars: BTreeMap<String, String> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let ctx = LoadContext {
        env_vars,
        cwd: PathBuf::from("/nonexistent"),
    };
    let _ = Settings::load_with(&ctx, Some(&[]));
    let mut loaded = Loaded::default();
    let environments = ctx.environments();
    if load_toml_text(&mut loaded, file, Path::new("fuzz.toml"), &environments, false).is_ok() {
        let _ = Settings::from_values(&loaded.values, &loaded.origins, &ctx);
    }
});
