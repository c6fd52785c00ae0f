//! Pipelines as code through the command line, on SQLite and PostgreSQL: `apply` of the
//! example file (dry run first), idempotence, updates, validation errors that name file,
//! entry and field, and the round trip export → apply on an empty database → export.

mod common;

use std::process::{Command, Output};

use common::{TestDatabase, exec};

fn wfm(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(args).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("CCAT_OPS_DB_") {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(std::env::temp_dir());
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const LOCATION: &str =
    "INSERT INTO data_location (id, name, location_type) VALUES (1, 'proc', 'PROCESSING');";

fn example() -> String {
    format!("{}/examples/chai-maps.toml", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn the_example_applies_idempotently_and_round_trips() {
    for (a, b) in TestDatabase::both_migrated("apply_a")
        .await
        .into_iter()
        .zip(TestDatabase::both_migrated("apply_b").await)
    {
        for t in [&a, &b] {
            exec(&t.db, LOCATION).await.unwrap();
        }
        let file = example();
        let dry = wfm(&["apply", &file, "--dry-run", "--database-url", &a.url]);
        assert!(dry.status.success(), "{dry:?}");
        let out = text(&dry.stdout);
        assert!(
            out.contains("create pipeline \"chai-maps\", step \"map\""),
            "{out}"
        );
        assert!(
            out.contains("dry run: 9 change(s), nothing written"),
            "{out}"
        );
        assert!(
            a.db.export_definitions()
                .await
                .unwrap()
                .pipelines
                .is_empty()
        );

        let applied = wfm(&["apply", &file, "--database-url", &a.url]);
        assert!(applied.status.success(), "{applied:?}");
        assert!(text(&applied.stdout).contains("applied 9 change(s)"));
        let again = wfm(&["apply", &file, "--database-url", &a.url]);
        assert!(
            text(&again.stdout).contains("nothing to change"),
            "{again:?}"
        );

        // Round trip: export A, apply it to the empty B, export B: the same file.
        let exported = wfm(&["export", "--database-url", &a.url]);
        assert!(exported.status.success(), "{exported:?}");
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first.toml");
        std::fs::write(&first, &exported.stdout).unwrap();
        let onto_b = wfm(&["apply", first.to_str().unwrap(), "--database-url", &b.url]);
        assert!(onto_b.status.success(), "{onto_b:?}");
        let second = wfm(&["export", "--database-url", &b.url]);
        assert_eq!(text(&second.stdout), text(&exported.stdout), "{}", a.url);
        let ds = b.db.export_definitions().await.unwrap();
        let map = &ds.pipelines[0].steps[2];
        assert_eq!(
            (map.name.as_str(), map.depends_on.as_slice()),
            ("map", &["baseline".to_owned()][..])
        );
        assert_eq!(map.config["pixel_arcsec"], 6);

        // An update changes what differs, and says which fields.
        let changed = std::fs::read_to_string(&file)
            .unwrap()
            .replace("priority = 10", "priority = 20")
            .replace("pixel_arcsec = 6", "pixel_arcsec = 4");
        let changed_file = dir.path().join("changed.toml");
        std::fs::write(&changed_file, changed).unwrap();
        let update = wfm(&[
            "apply",
            changed_file.to_str().unwrap(),
            "--database-url",
            &a.url,
        ]);
        let out = text(&update.stdout);
        assert!(
            out.contains("update pipeline \"chai-maps\" (priority)"),
            "{out}"
        );
        assert!(
            out.contains("update pipeline \"chai-maps\", step \"map\" (config)"),
            "{out}"
        );
        assert!(out.contains("applied 2 change(s)"), "{out}");

        // A disabled pipeline stays disabled when a file that does not say `enabled` is
        // applied again; export says `enabled = false`; a file saying `enabled = true`
        // enables it.
        assert!(
            wfm(&["disable", "chai-maps", "--database-url", &a.url])
                .status
                .success()
        );
        let again = wfm(&["apply", &file, "--database-url", &a.url]);
        assert!(again.status.success(), "{again:?}");
        let pipeline = |defs: ccat_workflow_manager::definitions::Definitions| {
            defs.pipelines.into_iter().next().unwrap()
        };
        assert_eq!(
            pipeline(a.db.export_definitions().await.unwrap()).enabled,
            Some(false)
        );
        let exported = text(&wfm(&["export", "--database-url", &a.url]).stdout);
        assert!(exported.contains("enabled = false"), "{exported}");
        let enabling = dir.path().join("enabling.toml");
        std::fs::write(
            &enabling,
            std::fs::read_to_string(&file)
                .unwrap()
                .replace("priority = 10", "priority = 10\nenabled = true"),
        )
        .unwrap();
        let out = wfm(&[
            "apply",
            enabling.to_str().unwrap(),
            "--database-url",
            &a.url,
        ]);
        assert!(
            text(&out.stdout).contains("update pipeline \"chai-maps\" (enabled"),
            "{out:?}"
        );
        assert_eq!(
            pipeline(a.db.export_definitions().await.unwrap()).enabled,
            None
        );
    }
}

#[tokio::test]
async fn invalid_files_name_file_entry_and_field_and_write_nothing() {
    for t in TestDatabase::both_migrated("apply_bad").await {
        exec(&t.db, LOCATION).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bad = std::fs::read_to_string(example())
            .unwrap()
            .replace(
                "operator = \"eq\", value = \"CHAI\"",
                "operator = \"resembles\", value = \"CHAI\"",
            )
            .replace(
                "depends_on = [\"baseline\"]",
                "depends_on = [\"baseline\", \"colour\"]",
            )
            .replace(
                "version = \"0.9.1\"\ngroup_by = [\"source\"",
                "version = \"9.9.9\"\ngroup_by = [\"source\"",
            );
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, bad).unwrap();
        let out = wfm(&["apply", file.to_str().unwrap(), "--database-url", &t.url]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = text(&out.stderr);
        let shown = file.display().to_string();
        for expected in [
            format!("{shown}: grouping \"chai-science\", field filter_rules"),
            format!("{shown}: pipeline \"chai-maps\", step \"map\", field depends_on"),
            format!("{shown}: pipeline \"chai-maps\", step \"map\", field version"),
        ] {
            assert!(err.contains(&expected), "{expected}\n{err}");
        }
        assert!(err.contains("nothing written: 3 problem(s)"), "{err}");
        assert!(t.db.export_definitions().await.unwrap().software.is_empty());

        // An unknown field is named with its line.
        std::fs::write(&file, "[[pipeline]]\nname = \"x\"\ncolour = \"blue\"\n").unwrap();
        let out = wfm(&["apply", file.to_str().unwrap(), "--database-url", &t.url]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("colour"), "{out:?}");
    }
}

/// Every hostile value of a field gets a message naming file, entry and field, the exit
/// code of invalid input (1), and nothing reaches the database.
#[tokio::test]
async fn hostile_values_are_refused_with_file_entry_and_field() {
    let long = "x".repeat(100_000);
    // (what to replace in the example, its replacement, what the message must contain)
    let cases: Vec<(&str, String, String)> = vec![
        (
            "max_retries = 2",
            "max_retries = -3".into(),
            "step \"calibrate\", field max_retries: -3 is negative".into(),
        ),
        (
            "cooldown_seconds = 300",
            "cooldown_seconds = -1".into(),
            "step \"calibrate\", field cooldown_seconds: -1 is negative".into(),
        ),
        (
            "max_active_runs = 50",
            "max_active_runs = 0".into(),
            "pipeline \"chai-maps\", field max_active_runs".into(),
        ),
        (
            "name = \"map\"",
            "name = \"\"".into(),
            "step \"\", field name: must not be empty".into(),
        ),
        (
            "name = \"map\"",
            "name = \"..\"".into(),
            "step \"..\", field name: \"..\" is not a name".into(),
        ),
        (
            "name = \"map\"",
            "name = \"m\\nap\"".into(),
            "field name: contains the control character U+000A".into(),
        ),
        (
            "name = \"map\"",
            format!("name = \"{long}\""),
            "characters long; at most 200".into(),
        ),
        (
            "name = \"chai-maps\"",
            "name = \"chai\\u0000maps\"".into(),
            "field pipeline[0].name: contains a NUL character".into(),
        ),
        (
            "name = \"map\"",
            "name = \"baseline\"".into(),
            "step \"baseline\": two steps have this name".into(),
        ),
        (
            "memory_gb = 64.0",
            "memory_gb = -1.0".into(),
            "step \"map\", field memory_gb: must be positive".into(),
        ),
    ];
    let t = TestDatabase::sqlite("apply_hostile").await;
    t.db.migrate().await.unwrap();
    exec(&t.db, LOCATION).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.toml");
    let original = std::fs::read_to_string(example()).unwrap();
    for (from, to, expected) in &cases {
        assert!(original.contains(from), "{from}");
        std::fs::write(&file, original.replacen(from, to, 1)).unwrap();
        let out = wfm(&["apply", file.to_str().unwrap(), "--database-url", &t.url]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{to}: {err}");
        assert!(err.contains(&file.display().to_string()), "{to}: {err}");
        assert!(err.contains(expected.as_str()), "{expected}\n{err}");
        assert!(
            err.len() < 4000,
            "a hostile name is shown cut: {} bytes",
            err.len()
        );
        assert!(
            t.db.export_definitions()
                .await
                .unwrap()
                .pipelines
                .is_empty()
        );
    }
    // A file that is not UTF-8 is invalid input like malformed TOML (exit 1).
    std::fs::write(&file, b"name = \"\xff\"\n").unwrap();
    let out = wfm(&["apply", file.to_str().unwrap(), "--database-url", &t.url]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not UTF-8"), "{out:?}");
    // A file that does not exist is a usage error (exit 2).
    let out = wfm(&["apply", "/no/such/file.toml", "--database-url", &t.url]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
