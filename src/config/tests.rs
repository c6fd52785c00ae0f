//! Tests of `config/mod.rs`.

use super::*;
use std::collections::BTreeMap;

fn ctx(vars: &[(&str, &str)]) -> LoadContext {
    LoadContext::new(vars.iter().copied(), "/nonexistent")
}

fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load_with(&ctx(vars), Some(&[]))
}

#[test]
fn defaults_are_the_embedded_setup() {
    let s = settings(&[]).unwrap();
    assert_eq!(s.hpc_backend, HpcBackend::Local);
    assert_eq!(s.pipeline_base_dir, PathBuf::from("/data/pipelines"));
    assert_eq!(s.processing_location_id, 1);
    assert_eq!(s.k8s_namespace, "ccat-workflows");
    assert_eq!(s.redis.port, 6379);
    assert_eq!(s.env, "localdev");
    assert_eq!(s.workflow.dispatch_mode, DispatchMode::Inline);
    assert_eq!(s.workflow.container_runtime, ContainerRuntime::None);
    assert_eq!(
        s.database,
        DatabaseSettings::Sqlite {
            path: "/tmp/dev_ccat_ops_db.sqlite".into()
        }
    );
}

#[test]
fn a_configured_redis_means_celery_dispatch_unless_told_otherwise() {
    let s = settings(&[("CCAT_WORKFLOW_MANAGER_REDIS_HOST", "redis.example")]).unwrap();
    assert_eq!(s.workflow.dispatch_mode, DispatchMode::Celery);
    let s = settings(&[
        ("CCAT_WORKFLOW_MANAGER_REDIS_HOST", "redis.example"),
        ("CCAT_WORKFLOW_MANAGER_DISPATCH_MODE", "inline"),
    ])
    .unwrap();
    assert_eq!(s.workflow.dispatch_mode, DispatchMode::Inline);
    let s = settings(&[("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "slurm")]).unwrap();
    assert_eq!(s.workflow.container_runtime, ContainerRuntime::Apptainer);
}

#[test]
fn ops_db_variables_choose_postgresql() {
    let s = settings(&[
        ("CCAT_OPS_DB_DATABASE_TYPE", "postgresql"),
        ("CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST", "db.example"),
        ("CCAT_OPS_DB_DATABASE_POSTGRESQL_PORT", "6543"),
        ("CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD", "hunter2"),
    ])
    .unwrap();
    let DatabaseSettings::Postgresql {
        host,
        port,
        password,
        ..
    } = &s.database
    else {
        panic!("expected postgresql, got {:?}", s.database);
    };
    assert_eq!(
        (host.as_str(), *port, password.expose()),
        ("db.example", 6543, "hunter2")
    );
    assert_eq!(
        s.database.to_string(),
        "postgresql://ccat@db.example:6543/ccat_ops_db"
    );
    assert!(!format!("{s:?}").contains("hunter2"));
    assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
}

#[test]
fn errors_name_the_key_its_origin_and_what_is_allowed() {
    let err = settings(&[("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "pbs")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("HPC_BACKEND"), "{err}");
    assert!(err.contains("CCAT_WORKFLOW_MANAGER_HPC_BACKEND"), "{err}");
    assert!(err.contains("kubernetes, slurm, local"), "{err}");
    let err = settings(&[("CCAT_WORKFLOW_MANAGER_REDIS_PORT", "70000")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("REDIS_PORT") && err.contains("70000"), "{err}");
    let err = settings(&[("CCAT_WORKFLOW_MANAGER_RESULT_MANAGER_POLL_INTERVAL", "0")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("RESULT_MANAGER_POLL_INTERVAL"), "{err}");
    let err = settings(&[("CCAT_OPS_DB_DATABASE_TYPE", "mysql")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DATABASE_TYPE") && err.contains("sqlite or postgresql"),
        "{err}"
    );
}

#[test]
fn a_bad_password_value_is_not_echoed() {
    let values = Map::from_iter([("REDIS_PASSWORD".to_owned(), serde_json::json!(["s3cret"]))]);
    let err = Settings::from_values(&values, &BTreeMap::new(), &ctx(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("REDIS_PASSWORD") && !err.contains("s3cret"),
        "{err}"
    );
    // Nor when Dynaconf's casts cannot read it, from either prefix.
    for (name, raw) in [
        ("CCAT_WORKFLOW_MANAGER_REDIS_PASSWORD", "@int s3cret"),
        ("CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD", "@float s3cret"),
    ] {
        let err = settings(&[(name, raw)]).unwrap_err().to_string();
        assert!(err.contains("PASSWORD") && !err.contains("s3cret"), "{err}");
    }
}

#[test]
fn kubernetes_runs_pods_and_its_volumes_are_checked() {
    const K8S: (&str, &str) = ("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "kubernetes");
    let s = settings(&[
        K8S,
        (
            "CCAT_WORKFLOW_MANAGER_K8S_PIPELINE_VOLUME",
            "pvc:ccat-pipelines",
        ),
        (
            "CCAT_WORKFLOW_MANAGER_K8S_DATA_VOLUMES",
            r#"["/data/archive", "/data/buffer=pvc:buffer"]"#,
        ),
    ])
    .unwrap();
    assert_eq!(s.workflow.container_runtime, ContainerRuntime::Pod);
    assert_eq!(s.kubernetes.job_ttl_seconds, 86400);
    assert_eq!(s.kubernetes.data_volumes.len(), 2);

    let err = |vars: &[(&str, &str)]| settings(vars).unwrap_err().to_string();
    let e = err(&[
        K8S,
        ("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "apptainer"),
    ]);
    assert!(e.contains("CONTAINER_RUNTIME") && e.contains("pod"), "{e}");
    let e = err(&[("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "pod")]);
    assert!(e.contains("HPC_BACKEND=kubernetes"), "{e}");
    for bad in [
        r#"["data/archive"]"#,
        r#"["/data=nfs:x"]"#,
        r#"["/data=pvc:"]"#,
    ] {
        let e = err(&[K8S, ("CCAT_WORKFLOW_MANAGER_K8S_DATA_VOLUMES", bad)]);
        assert!(e.contains("K8S_DATA_VOLUMES"), "{bad}: {e}");
    }
    let e = err(&[K8S, ("CCAT_WORKFLOW_MANAGER_K8S_PIPELINE_VOLUME", "/data")]);
    assert!(e.contains("K8S_PIPELINE_VOLUME"), "{e}");
}
