//! The module layout the code keeps: checks on the source tree itself.

use std::path::Path;

/// The non-test code of a Rust file: everything before its `#[cfg(test)]` module.
fn production_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// `config` is a leaf: every other module reads settings, so settings refer to none of
/// them (a setting's enum lives in `config`, and the module using it re-exports it).
#[test]
fn config_refers_to_no_other_module_of_the_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut offending = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            for (n, line) in production_code(&path).lines().enumerate() {
                if line.contains("crate::") && !line.trim_start().starts_with("//") {
                    offending.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offending.is_empty(),
        "config uses the crate:\n{}",
        offending.join("\n")
    );
}
