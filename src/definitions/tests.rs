//! Tests of `definitions/mod.rs`.

use super::*;

const FILE: &str = r#"
[[software]]
name = "chai-calibration"
[[software.version]]
version = "1.0.0"
image_ref = "registry.example/chai-cal:1.0.0"
command = ["calibrate"]

[[grouping]]
name = "chai"
filter_rules = [{ table = "Instrument", column = "name", operator = "eq", value = "CHAI" }]

[[pipeline]]
name = "maps"
grouping = "chai"
processing_location = "proc"
[[pipeline.step]]
name = "calibrate"
software = "chai-calibration"
version = "1.0.0"
group_by = ["executed_obs_unit"]
[pipeline.step.config]
mode = "hot_cold"
[[pipeline.step]]
name = "map"
software = "chai-calibration"
version = "1.0.0"
group_by = ["source"]
depends_on = ["calibrate"]
"#;

fn known() -> Known {
    Known {
        processing_locations: ["proc".to_owned()].into(),
        ..Default::default()
    }
}

#[test]
fn a_valid_file_round_trips_through_toml() {
    let d = Definitions::parse("p.toml", FILE).unwrap();
    assert!(d.validate("p.toml", &known()).is_empty());
    assert_eq!(Definitions::parse("again", &d.to_toml()).unwrap(), d);
    let order: Vec<&str> = step_order(&d.pipelines[0].steps)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(order, ["calibrate", "map"]);
}

#[test]
fn errors_name_file_entry_and_field() {
    let bad = FILE
        .replace("\"Instrument\"", "\"Telescope\"")
        .replace("depends_on = [\"calibrate\"]", "depends_on = [\"nope\"]")
        .replace(
            "processing_location = \"proc\"",
            "processing_location = \"elsewhere\"",
        );
    let d = Definitions::parse("p.toml", &bad).unwrap();
    let errors: Vec<String> = d
        .validate("p.toml", &known())
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.toml: grouping \"chai\", field filter_rules")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.toml: pipeline \"maps\", field processing_location")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("p.toml: pipeline \"maps\", step \"map\", field depends_on")),
        "{errors:?}"
    );
    let unknown = Definitions::parse(
        "p.toml",
        &FILE
            .replace("priority", "x")
            .replace("grouping = \"chai\"", "grouping = \"chai\"\ncolour = 1"),
    )
    .unwrap_err();
    assert!(unknown.to_string().contains("colour"), "{unknown}");
}

#[test]
fn the_diff_names_what_is_created_and_what_changes() {
    let d = Definitions::parse("p.toml", FILE).unwrap();
    let created = diff(&Definitions::default(), &d);
    assert_eq!(created.len(), 6, "{created:?}");
    assert!(created.iter().all(|c| c.action == "create"));
    assert!(diff(&d, &d).is_empty());
    let mut changed = d.clone();
    changed.pipelines[0].priority = 5;
    changed.pipelines[0].steps[1].group_by = vec!["night".into()];
    let changes = diff(&d, &changed);
    assert_eq!(
        changes,
        vec![
            Change {
                entry: "pipeline \"maps\"".into(),
                action: "update",
                fields: vec!["priority".into()]
            },
            Change {
                entry: "pipeline \"maps\", step \"map\"".into(),
                action: "update",
                fields: vec!["group_by".into()]
            },
        ]
    );
}

#[test]
fn cycles_are_named() {
    let mut d = Definitions::parse("p.toml", FILE).unwrap();
    d.pipelines[0].steps[0].depends_on = vec!["map".into()];
    let errors = d.validate("p.toml", &known());
    assert!(
        errors
            .iter()
            .any(|e| e.message.contains("calibrate -> map -> calibrate")),
        "{errors:?}"
    );
}
