//! The module layout the code keeps: checks on the source tree itself.

use std::path::Path;

/// The non-test code of a Rust file: everything before its `#[cfg(test)]` module (a
/// `tests.rs` of its own is left out by [`sources`]).
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
    for (path, code) in sources(&dir) {
        for (n, line) in code.lines().enumerate() {
            if line.contains("crate::") && !line.trim_start().starts_with("//") {
                offending.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offending.is_empty(),
        "config uses the crate:\n{}",
        offending.join("\n")
    );
}

/// The Rust files under `dir` (recursively), with their non-test code.
fn sources(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            let code = production_code(&path);
            out.push((path, code));
        }
    }
    out
}

/// The modules of `dir` (its files and folders, by name) and which refer to which: a
/// reference is one of `patterns` followed by the other's name, outside comments.
fn module_graph(
    dir: &Path,
    patterns: &[&str],
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let name_of = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let modules: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| name_of(&e.unwrap().path()))
        .filter(|n| !["lib", "main", "mod", "tests"].contains(&n.as_str()))
        .collect();
    let mut graph = std::collections::BTreeMap::new();
    for module in &modules {
        let file = dir.join(format!("{module}.rs"));
        let files = if file.exists() {
            vec![(file.clone(), production_code(&file))]
        } else {
            sources(&dir.join(module))
        };
        let mut uses = std::collections::BTreeSet::new();
        for (_, code) in files {
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for other in modules.iter().filter(|o| *o != module) {
                    if patterns.iter().any(|p| {
                        line.match_indices(&format!("{p}{other}")).any(|(i, m)| {
                            // The whole name: `db::runs` is not `db::run`.
                            !line[i + m.len()..]
                                .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                        })
                    }) {
                        uses.insert(other.clone());
                    }
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A cycle of `graph`, if it has one.
fn a_cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The top-level modules depend on each other in one direction only (the domain below,
/// the faces above), and so do the files of the database layer.
#[test]
fn no_import_cycle_between_top_level_modules_nor_between_the_database_layer_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let top = module_graph(&src, &["crate::"]);
    assert!(top.contains_key("trigger") && top["managers"].contains("trigger"));
    assert_eq!(a_cycle(&top), None, "top-level modules: {top:#?}");
    let db = module_graph(
        &src.join("db"),
        &["crate::db::", "super::", "super::super::"],
    );
    assert!(db.contains_key("runs") && db["runs"].contains("outbox"));
    assert_eq!(a_cycle(&db), None, "src/db: {db:#?}");
}
