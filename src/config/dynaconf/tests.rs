//! Tests of `config/dynaconf.rs`.

use super::*;
use serde_json::json;

fn ctx(vars: &[(&str, &str)]) -> LoadContext {
    LoadContext::new(vars.iter().copied(), "/nonexistent")
}

fn from_text(text: &str, vars: &[(&str, &str)]) -> Map<String, Value> {
    let ctx = ctx(vars);
    let mut loaded = Loaded::default();
    load_toml_text(
        &mut loaded,
        text,
        Path::new("settings.toml"),
        &ctx.environments(),
        false,
    )
    .unwrap();
    load_env_vars(&mut loaded, &ctx).unwrap();
    loaded.values
}

#[test]
fn sections_apply_in_dynaconf_order() {
    let text = r#"
        top_level = "ignored"
        [global]
        k = "global"
        [LocalDev]
        k = "localdev"
        e = "localdev"
        [default]
        k = "default"
        d = "default"
        e = "default"
        [production]
        d = "production"
    "#;
    let v = from_text(text, &[]);
    assert_eq!(v["K"], "global");
    assert_eq!(v["D"], "default");
    assert_eq!(v["E"], "localdev");
    assert!(!v.contains_key("TOP_LEVEL"));
    let v = from_text(text, &[("ENV_FOR_DYNACONF", "PRODUCTION")]);
    assert_eq!(v["D"], "production");
    assert_eq!(v["E"], "default");
}

#[test]
fn tables_replace_unless_merge_is_asked() {
    let text = r#"
        [default]
        db = {host = "a", port = 1}
        opts = {x = 1, y = 2}
        list = [1, 2]
        [localdev]
        db = {host = "b"}
        opts = {y = 3, dynaconf_merge = true}
        list = [3, "dynaconf_merge"]
    "#;
    let v = from_text(text, &[]);
    assert_eq!(v["DB"], json!({"host": "b"}));
    assert_eq!(v["OPTS"], json!({"x": 1, "y": 3}));
    assert_eq!(v["LIST"], json!([1, 2, 3]));
}

#[test]
fn env_vars_parse_like_dynaconf() {
    let cases = [
        ("1", json!(1)),
        ("1.5", json!(1.5)),
        ("007", json!("007")),
        ("True", json!(true)),
        ("TRUE", json!("TRUE")),
        ("[1,2]", json!([1, 2])),
        ("{a=1}", json!({"a": 1})),
        ("{a=1,}", json!("{a=1,}")),
        ("'42'", json!("42")),
        ("hello world", json!("hello world")),
        ("1 # c", json!(1)),
        ("@int 5", json!(5)),
        ("@bool on", json!(true)),
        ("@str 123", json!("123")),
        ("@json {\"a\": [1]}", json!({"a": [1]})),
        ("@none", json!(null)),
        ("@unknown x", json!("@unknown x")),
        (
            "postgresql://u:p@h:5432/db",
            json!("postgresql://u:p@h:5432/db"),
        ),
    ];
    for (raw, expected) in cases {
        assert_eq!(parse_env_value(raw), Ok(Parsed::Set(expected)), "{raw:?}");
    }
    assert!(parse_env_value("@int 5.5").is_err());
    assert!(parse_env_value("@format {this.X}").is_err());
}

#[test]
fn nested_env_vars_merge_and_keep_existing_case() {
    let text = "[default]\ndatabase = {host = \"a\", UserName = \"u\"}\nname = \"x\"";
    let v = from_text(
        text,
        &[
            ("CCAT_WORKFLOW_MANAGER_DATABASE__HOST", "h"),
            ("CCAT_WORKFLOW_MANAGER_DATABASE__username", "2"),
            ("CCAT_WORKFLOW_MANAGER_DATABASE__NEW", "n"),
            ("CCAT_WORKFLOW_MANAGER_name__x", "1"),
            ("ccat_workflow_manager_lower", "ignored"),
            ("DYNACONF_LOWERKEY", "dyn"),
        ],
    );
    assert_eq!(
        v["DATABASE"],
        json!({"host": "h", "UserName": 2, "NEW": "n"})
    );
    assert_eq!(v["NAME"], json!({"x": 1}));
    assert_eq!(v["LOWERKEY"], "dyn");
    assert!(!v.contains_key("LOWER"));
}

#[test]
fn datetimes_read_as_python_writes_them() {
    let text = "[default]\nz = 1979-05-27T07:32:00Z\noff = 1979-05-27T00:32:00.999999-07:00\n\
                local = 1979-05-27T07:32:00\nday = 1979-05-27\nclock = 07:32:00";
    let v = from_text(text, &[]);
    assert_eq!(v["Z"], "1979-05-27T07:32:00+00:00");
    assert_eq!(v["OFF"], "1979-05-27T00:32:00.999999-07:00");
    assert_eq!(v["LOCAL"], "1979-05-27T07:32:00");
    assert_eq!(v["DAY"], "1979-05-27");
    assert_eq!(v["CLOCK"], "07:32:00");
}

#[test]
fn casts_apply_in_files_and_del_removes() {
    let text = "[default]\nport = \"@int 42\"\nnested = {v = \"@int 7\"}\ngone = 1";
    let v = from_text(text, &[("CCAT_WORKFLOW_MANAGER_GONE", "@del")]);
    assert_eq!(v["PORT"], 42);
    assert_eq!(v["NESTED"], json!({"v": 7}));
    assert!(!v.contains_key("GONE"));
}

#[test]
fn a_bad_cast_names_the_key_and_its_origin() {
    let ctx = ctx(&[("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "@int many")]);
    let err = load_env_vars(&mut Loaded::default(), &ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("REDIS_PORT"), "{err}");
    assert!(err.contains("CCAT_WORKFLOW_MANAGER_REDIS_PORT"), "{err}");
}
