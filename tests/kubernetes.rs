//! The kubernetes backend's Job manifests and status mapping, against the Kubernetes API
//! types and against documents as the API server writes them (`tests/kubernetes/`).

mod common;

use std::path::PathBuf;

use ccat_workflow_manager::backend::kubernetes::{
    HostTree, KubernetesOptions, VolumeSource, job_manifest, job_state,
};
use ccat_workflow_manager::backend::{BackendError, JobMetrics, JobSpec, JobState};
use ccat_workflow_manager::workflow::command::{
    self, BoundInput, CommandRequest, ContainerRuntime,
};
use ccat_workflow_manager::workflow::layout::RunLayout;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

fn document(name: &str) -> String {
    let path = format!("{}/tests/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn options() -> KubernetesOptions {
    KubernetesOptions {
        namespace: "ccat-workflows-staging".into(),
        trees: vec![
            HostTree {
                path: "/data/pipelines".into(),
                source: VolumeSource::Claim("ccat-pipelines".into()),
            },
            HostTree {
                path: "/data/archive".into(),
                source: VolumeSource::HostPath("/data/archive".into()),
            },
        ],
        ttl_seconds_after_finished: 86400,
        run_as: Some((1000, 1000)),
    }
}

/// The final step `map` of run 42, first attempt, reading one raw package.
fn spec(runtime: ContainerRuntime, input: &str) -> JobSpec {
    spec_in(std::path::Path::new("/data/pipelines"), runtime, input, 42)
}

fn spec_in(base: &std::path::Path, runtime: ContainerRuntime, input: &str, run: i64) -> JobSpec {
    let layout = RunLayout::new(base, "chai-maps", "source=NGC253", "map", run, 1);
    let command = command::build(&CommandRequest {
        runtime,
        apptainer: "apptainer",
        image: "ghcr.io/ccatobs/chai-mapping:0.9.1@sha256:4f2a9c",
        command: &[
            "chai-map".into(),
            "--manifest".into(),
            "/workflow/config/manifest.json".into(),
        ],
        layout: &layout,
        final_step: true,
        inputs: &[BoundInput {
            host_path: PathBuf::from(input),
            name: "7_chai_lfa_0007.tar".into(),
        }],
        run_id: run,
        step_name: "map",
    })
    .unwrap();
    JobSpec {
        tag: format!("ccat-1a2b3c4d-run-{run}-a1"),
        nonce: "n1".into(),
        command,
        attempt_dir: layout.attempt_dir(),
        cpus: 4,
        memory_mb: 65536,
        time_limit_seconds: 21600,
    }
}

#[test]
fn a_run_attempt_becomes_the_expected_job() {
    let job = job_manifest(
        &spec(ContainerRuntime::Pod, "/data/archive/raw/7.tar"),
        &options(),
    )
    .unwrap();
    let ours = serde_json::to_value(&job).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&document("job-manifest-expected.json")).unwrap();
    assert_eq!(
        ours,
        expected,
        "{}",
        serde_json::to_string_pretty(&ours).unwrap()
    );
    // The expected document is a valid batch/v1 Job, and reads back as ours.
    let typed: Job = serde_json::from_value(expected).unwrap();
    assert_eq!(typed, job);
}

#[test]
fn a_job_the_pods_cannot_see_is_refused_before_anything_is_created() {
    let outside = job_manifest(&spec(ContainerRuntime::Pod, "/scratch/7.tar"), &options());
    assert!(
        matches!(&outside, Err(BackendError::Invalid(m)) if m.contains("/scratch/7.tar")),
        "{outside:?}"
    );
    let apptainer = job_manifest(
        &spec(ContainerRuntime::Apptainer, "/data/archive/raw/7.tar"),
        &options(),
    );
    assert!(
        matches!(&apptainer, Err(BackendError::Invalid(m)) if m.contains("CONTAINER_RUNTIME=pod")),
        "{apptainer:?}"
    );
    let mut bad = spec(ContainerRuntime::Pod, "/data/archive/raw/7.tar");
    bad.tag = "Run_42".into();
    assert!(matches!(
        job_manifest(&bad, &options()),
        Err(BackendError::Invalid(_))
    ));
}

fn state(job: &str, pod: Option<&str>) -> JobState {
    let job: Job = serde_json::from_str(&document(job)).unwrap();
    let pod: Option<Pod> = pod.map(|p| serde_json::from_str(&document(p)).unwrap());
    job_state(&job, pod.as_ref())
}

#[test]
fn job_and_pod_documents_map_to_run_states() {
    let ran = |exit_code| JobMetrics {
        exit_code: Some(exit_code),
        wall_time_seconds: Some(120.0),
        cpu_hours: None,
        peak_memory_gb: None,
    };
    assert_eq!(
        state("job-complete.json", Some("pod-succeeded.json")),
        JobState::Succeeded(ran(0))
    );
    assert_eq!(
        state("job-failed.json", Some("pod-oomkilled.json")),
        JobState::Failed {
            reason: "out of memory (OOMKilled)".into(),
            metrics: ran(137)
        }
    );
    assert_eq!(
        state("job-failed.json", Some("pod-exit-3.json")),
        JobState::Failed {
            reason: "exit code 3".into(),
            metrics: ran(3)
        }
    );
    assert_eq!(
        state("job-failed-deadline.json", None),
        JobState::Failed {
            reason: "time limit of 3600 s exceeded".into(),
            metrics: JobMetrics::default()
        }
    );
    // The pod was removed with its job's history: the condition's message is the reason.
    assert_eq!(
        state("job-failed.json", None),
        JobState::Failed {
            reason: "the job failed: Job has reached the specified backoff limit".into(),
            metrics: JobMetrics::default()
        }
    );
    assert_eq!(
        state("job-active.json", Some("pod-running.json")),
        JobState::Running
    );
    assert_eq!(state("job-active.json", None), JobState::Queued);
    match state("job-active.json", Some("pod-image-pull.json")) {
        JobState::Failed { reason, .. } => {
            assert!(
                reason.starts_with("the container cannot start (ImagePullBackOff)")
                    && reason.contains("not found"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A stand-in for the Kubernetes API server: it keeps Jobs and pods in memory and
/// answers the calls the backend makes with the documents a real server writes (lists
/// without per-item kind, `Status` documents for errors), recording every request.
mod api_server {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::extract::{Path, RawQuery, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use serde_json::{Value, json};

    #[derive(Default)]
    pub struct Cluster {
        pub jobs: BTreeMap<String, Value>,
        /// Pods by the name of their Job.
        pub pods: BTreeMap<String, Value>,
        pub logs: BTreeMap<String, String>,
        /// `METHOD path?query` of every request.
        pub requests: Vec<String>,
        /// Namespaces where creating is forbidden (RBAC).
        pub forbidden: Vec<String>,
    }

    pub type Shared = Arc<Mutex<Cluster>>;

    fn status(code: u16, reason: &str, message: &str) -> Response {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code});
        (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
    }

    fn selected(labels: &Value, query: &Option<String>) -> bool {
        let selector = query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(|s| {
                s.replace("%3D", "=")
                    .replace("%2C", ",")
                    .replace("%2F", "/")
            })
            .unwrap_or_default();
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => labels[k] == v,
                None => false,
            })
    }

    fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Response {
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut i| {
                // A real list carries kind and apiVersion once, not per item.
                i.as_object_mut().unwrap().remove("kind");
                i.as_object_mut().unwrap().remove("apiVersion");
                i
            })
            .collect();
        axum::Json(json!({"kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": "1843700"}, "items": items}))
        .into_response()
    }

    async fn jobs(
        State(c): State<Shared>,
        Path(ns): Path<String>,
        RawQuery(q): RawQuery,
    ) -> Response {
        let mut c = c.lock().unwrap();
        c.requests
            .push(format!("GET /jobs?{}", q.clone().unwrap_or_default()));
        let items = c
            .jobs
            .values()
            .filter(|j| j["metadata"]["namespace"] == ns.as_str())
            .filter(|j| selected(&j["metadata"]["labels"], &q))
            .cloned()
            .collect();
        list("JobList", "batch/v1", items)
    }

    async fn create_job(
        State(c): State<Shared>,
        Path(ns): Path<String>,
        axum::Json(mut job): axum::Json<Value>,
    ) -> Response {
        let mut c = c.lock().unwrap();
        c.requests.push("POST /jobs".into());
        if c.forbidden.contains(&ns) {
            return status(
                403,
                "Forbidden",
                &format!(
                    "jobs.batch is forbidden: User \"system:serviceaccount:ccat:wfm\" cannot create resource \"jobs\" in API group \"batch\" in the namespace \"{ns}\""
                ),
            );
        }
        let name = job["metadata"]["name"].as_str().unwrap().to_owned();
        if c.jobs.contains_key(&name) {
            return status(
                409,
                "AlreadyExists",
                &format!("jobs.batch \"{name}\" already exists"),
            );
        }
        let meta = job["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!(format!("uid-{name}")));
        meta.insert("resourceVersion".into(), json!("1843601"));
        meta.insert("creationTimestamp".into(), json!("2026-11-29T10:00:00Z"));
        job["status"] = json!({});
        c.jobs.insert(name, job.clone());
        (StatusCode::CREATED, axum::Json(job)).into_response()
    }

    async fn get_job(
        State(c): State<Shared>,
        Path((_ns, name)): Path<(String, String)>,
    ) -> Response {
        let mut c = c.lock().unwrap();
        c.requests.push(format!("GET /jobs/{name}"));
        match c.jobs.get(&name) {
            Some(job) => axum::Json(job.clone()).into_response(),
            None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
        }
    }

    async fn delete_job(
        State(c): State<Shared>,
        Path((_ns, name)): Path<(String, String)>,
    ) -> Response {
        let mut c = c.lock().unwrap();
        c.requests.push(format!("DELETE /jobs/{name}"));
        match c.jobs.remove(&name) {
            Some(job) => {
                c.pods.remove(&name);
                axum::Json(job).into_response()
            }
            None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
        }
    }

    async fn pods(State(c): State<Shared>, RawQuery(q): RawQuery) -> Response {
        let mut c = c.lock().unwrap();
        c.requests
            .push(format!("GET /pods?{}", q.clone().unwrap_or_default()));
        let items = c
            .pods
            .values()
            .filter(|p| selected(&p["metadata"]["labels"], &q))
            .cloned()
            .collect();
        list("PodList", "v1", items)
    }

    async fn log(State(c): State<Shared>, Path((_ns, pod)): Path<(String, String)>) -> Response {
        let mut c = c.lock().unwrap();
        c.requests.push(format!("GET /log/{pod}"));
        match c.logs.get(&pod) {
            Some(text) => text.clone().into_response(),
            None => status(404, "NotFound", &format!("pods \"{pod}\" not found")),
        }
    }

    /// Serves on a free local port; returns its URL.
    pub async fn start(cluster: Shared) -> String {
        let app = axum::Router::new()
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs",
                get(jobs).post(create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                get(get_job).delete(delete_job),
            )
            .route("/api/v1/namespaces/{ns}/pods", get(pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(log))
            .with_state(cluster);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
}

/// A stand-in API server with an empty cluster, and its URL.
async fn stand_in() -> (api_server::Shared, String) {
    let cluster = api_server::Shared::default();
    let url = api_server::start(cluster.clone()).await;
    (cluster, url)
}

/// An SQLite database with the test pipeline, its archive and its PENDING runs (how many).
async fn pending_pipeline(label: &str) -> (common::TestDatabase, common::lifecycle::Site, usize) {
    use common::lifecycle;
    let t = common::TestDatabase::sqlite(label).await;
    t.db.migrate().await.unwrap();
    let site = lifecycle::setup_site(
        &t.db,
        &lifecycle::pipeline_sql(&lifecycle::command_json(&["ok"]), 1.0, 0),
        None,
    )
    .await;
    let runs = lifecycle::create_runs(&t.db).await;
    assert!(runs > 0);
    (t, site, runs)
}

/// Puts a document of `tests/kubernetes/` in the place of a Job's status, or as its pod,
/// keeping the names and labels the backend gave the Job.
fn act(cluster: &api_server::Shared, job: &str, status_of: &str, pod: Option<(&str, &str)>) {
    let mut c = cluster.lock().unwrap();
    let source: serde_json::Value = serde_json::from_str(&document(status_of)).unwrap();
    c.jobs.get_mut(job).unwrap()["status"] = source["status"].clone();
    if let Some((pod_document, log)) = pod {
        let mut pod: serde_json::Value = serde_json::from_str(&document(pod_document)).unwrap();
        let pod_name = format!("{job}-x7k2p");
        pod["metadata"]["name"] = pod_name.clone().into();
        for label in ["batch.kubernetes.io/job-name", "job-name"] {
            pod["metadata"]["labels"][label] = job.into();
        }
        let job_labels = c.jobs[job]["metadata"]["labels"].clone();
        for (k, v) in job_labels.as_object().unwrap() {
            pod["metadata"]["labels"][k] = v.clone();
        }
        c.pods.insert(job.to_owned(), pod);
        c.logs.insert(pod_name, log.to_owned());
    }
}

#[tokio::test]
async fn the_client_creates_follows_reconciles_and_deletes_jobs() {
    use ccat_workflow_manager::backend::kubernetes::KubernetesBackend;
    use ccat_workflow_manager::backend::{Backend, JobRef};

    let (cluster, url) = stand_in().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("pipelines");
    let archive = dir.path().join("archive");
    let mut options = options();
    options.trees[0].path = base.clone();
    options.trees[1].path = archive.clone();
    let backend = KubernetesBackend::with_client(client, options.clone());
    let input = archive.join("raw/7.tar").display().to_string();
    let spec = spec_in(&base, ContainerRuntime::Pod, &input, 42);
    std::fs::create_dir_all(&spec.attempt_dir).unwrap();

    // Create: the server holds exactly the Job of the manifest.
    assert_eq!(backend.submit(&spec).await.unwrap(), spec.tag);
    let stored = cluster.lock().unwrap().jobs[&spec.tag].clone();
    let expected = serde_json::to_value(job_manifest(&spec, &options).unwrap()).unwrap();
    assert_eq!(stored["spec"], expected["spec"]);
    assert_eq!(stored["metadata"]["labels"], expected["metadata"]["labels"]);

    // A manager that died before recording the Job finds it by its labels, and a second
    // submission of the same attempt adopts it instead of creating another — only with
    // the attempt's identity: a Job of the same name made for another attempt (another
    // incarnation of the database) is neither found nor adopted.
    assert_eq!(
        backend.find(&spec.tag, &spec.attempt_dir).await.unwrap(),
        None,
        "no identity recorded for this attempt"
    );
    ccat_workflow_manager::backend::AttemptIdentity {
        tag: spec.tag.clone(),
        nonce: spec.nonce.clone(),
    }
    .write(&spec.attempt_dir)
    .unwrap();
    assert_eq!(
        backend.find(&spec.tag, &spec.attempt_dir).await.unwrap(),
        Some(spec.tag.clone())
    );
    assert_eq!(backend.submit(&spec).await.unwrap(), spec.tag);
    assert_eq!(cluster.lock().unwrap().jobs.len(), 1);
    let mut foreign = spec.clone();
    foreign.nonce = "n0".into();
    let refused = backend.submit(&foreign).await.unwrap_err();
    assert!(refused.is_refusal(), "{refused}");
    assert!(
        refused.to_string().contains("not made for this attempt"),
        "{refused}"
    );
    let mut foreign_dir = spec.attempt_dir.clone();
    foreign_dir.set_extension("other");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    ccat_workflow_manager::backend::AttemptIdentity {
        tag: spec.tag.clone(),
        nonce: "n0".into(),
    }
    .write(&foreign_dir)
    .unwrap();
    assert_eq!(backend.find(&spec.tag, &foreign_dir).await.unwrap(), None);
    let other_attempt = spec.tag.replace("-a1", "-a2");
    assert_eq!(
        backend
            .find(&other_attempt, &spec.attempt_dir)
            .await
            .unwrap(),
        None
    );

    // Status: one list of Jobs and one of pods per call, whatever the number of jobs.
    let job = JobRef {
        job_id: spec.tag.clone(),
        attempt_dir: spec.attempt_dir.clone(),
    };
    let gone = JobRef {
        job_id: "ccat-1a2b3c4d-run-7-a1".into(),
        attempt_dir: spec.attempt_dir.clone(),
    };
    let before = cluster.lock().unwrap().requests.len();
    let states = backend.status(&[job.clone(), gone.clone()]).await.unwrap();
    assert_eq!(states[&job.job_id], JobState::Queued);
    assert_eq!(states[&gone.job_id], JobState::Vanished);
    let calls = cluster.lock().unwrap().requests[before..].to_vec();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.contains("labelSelector=app.kubernetes.io")),
        "{calls:?}"
    );

    act(
        &cluster,
        &spec.tag,
        "job-active.json",
        Some(("pod-running.json", "")),
    );
    let states = backend.status(std::slice::from_ref(&job)).await.unwrap();
    assert_eq!(states[&job.job_id], JobState::Running);

    // Finished: the state with exit code and wall time, and the pod's log kept as the
    // attempt's job log (the pod goes with the Job's TTL).
    act(
        &cluster,
        &spec.tag,
        "job-complete.json",
        Some(("pod-succeeded.json", "map written from 2 spectra\n")),
    );
    let states = backend.status(std::slice::from_ref(&job)).await.unwrap();
    match &states[&job.job_id] {
        JobState::Succeeded(m) => {
            assert_eq!((m.exit_code, m.wall_time_seconds), (Some(0), Some(120.0)))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        backend.log_tail(&job, 4096).as_deref(),
        Some("map written from 2 spectra\n")
    );

    // An image that cannot be pulled fails the attempt, and its Job is deleted.
    let broken = spec_in(&base, ContainerRuntime::Pod, &input, 43);
    backend.submit(&broken).await.unwrap();
    act(
        &cluster,
        &broken.tag,
        "job-active.json",
        Some(("pod-image-pull.json", "")),
    );
    let broken_job = JobRef {
        job_id: broken.tag.clone(),
        attempt_dir: broken.attempt_dir.clone(),
    };
    let states = backend
        .status(std::slice::from_ref(&broken_job))
        .await
        .unwrap();
    assert!(
        matches!(&states[&broken.tag], JobState::Failed { reason, .. } if reason.contains("ImagePullBackOff")),
        "{states:?}"
    );
    assert!(!cluster.lock().unwrap().jobs.contains_key(&broken.tag));

    // Cancel deletes the Job (with its pods); a Job already gone is no error.
    backend.cancel(&job).await.unwrap();
    assert!(cluster.lock().unwrap().jobs.is_empty());
    assert!(cluster.lock().unwrap().pods.is_empty());
    backend.cancel(&job).await.unwrap();

    // A refusal by the API server is a refusal (the run fails); no answer at all is not
    // (the run is looked up by its tag next cycle).
    cluster
        .lock()
        .unwrap()
        .forbidden
        .push(options.namespace.clone());
    let refused = backend.submit(&spec).await.unwrap_err();
    assert!(
        refused.is_refusal() && refused.to_string().contains("forbidden"),
        "{refused}"
    );
    let nowhere =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let unreachable = KubernetesBackend::with_client(nowhere, options)
        .submit(&spec)
        .await
        .unwrap_err();
    assert!(!unreachable.is_refusal(), "{unreachable}");
}

#[tokio::test]
async fn the_managers_run_a_pipeline_on_the_kubernetes_backend() {
    use ccat_workflow_manager::backend::kubernetes::KubernetesBackend;
    use ccat_workflow_manager::config::StagingMode;
    use ccat_workflow_manager::results::ResultManager;
    use ccat_workflow_manager::workflow::WorkflowManager;
    use common::lifecycle;

    let (t, site, runs) = pending_pipeline("kubernetes_e2e").await;
    let (cluster, url) = stand_in().await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let mut options = options();
    options.trees[0].path = site.base();
    options.trees[1].path = site.archive();
    let backend = || KubernetesBackend::with_client(client.clone(), options.clone());
    let mut workflow_options = site.options(StagingMode::Local);
    workflow_options.runtime = ContainerRuntime::Pod;
    let wm = WorkflowManager::new(t.db.clone(), backend(), workflow_options);
    let rm = ResultManager::new(t.db.clone(), backend(), site.result_options());

    let report = wm.cycle(chrono::Utc::now()).await.unwrap();
    assert_eq!(report.submitted, runs, "{report:?}");
    let jobs: Vec<(String, serde_json::Value)> = cluster
        .lock()
        .unwrap()
        .jobs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(jobs.len(), runs);

    // The cluster runs each job: the "pod" writes a product where its output mount
    // lands on the host, then the Job completes.
    for (name, job) in &jobs {
        let container = &job["spec"]["template"]["spec"]["containers"][0];
        let output = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/workflow/output")
            .expect("the final step mounts its output");
        assert_eq!(output["name"], "tree-0");
        let host = site.base().join(output["subPath"].as_str().unwrap());
        std::fs::write(host.join("science/map.fits"), format!("map of {name}")).unwrap();
        act(
            &cluster,
            name,
            "job-complete.json",
            Some(("pod-succeeded.json", "run finished\n")),
        );
    }
    let report = rm.cycle(chrono::Utc::now()).await.unwrap();
    assert_eq!(
        (report.succeeded, report.completed),
        (runs, runs),
        "{report:?}"
    );
    let all = lifecycle::runs(&t.db).await;
    assert!(all.iter().all(|r| r.status == "COMPLETED"), "{all:?}");
    assert!(
        all.iter().all(|r| r.wall_time_seconds == Some(120.0)),
        "{all:?}"
    );
    let products = lifecycle::products(&t.db).await;
    assert_eq!(products.len(), runs, "{products:?}");
}

#[test]
fn the_settings_name_the_namespace_and_the_trees_the_pods_see() {
    use ccat_workflow_manager::config::Settings;
    use ccat_workflow_manager::config::dynaconf::LoadContext;
    let vars = [
        ("HPC_BACKEND", "kubernetes"),
        ("K8S_NAMESPACE", "ccat-workflows-staging"),
        ("PIPELINE_BASE_DIR", "/data/pipelines"),
        ("K8S_PIPELINE_VOLUME", "pvc:ccat-pipelines"),
        (
            "K8S_DATA_VOLUMES",
            r#"["/data/archive", "/data/buffer=pvc:buffer"]"#,
        ),
        ("K8S_JOB_TTL_SECONDS", "3600"),
    ];
    let ctx = LoadContext {
        env_vars: vars
            .iter()
            .map(|(k, v)| (format!("CCAT_WORKFLOW_MANAGER_{k}"), (*v).to_owned()))
            .collect(),
        cwd: "/nonexistent".into(),
    };
    let settings = Settings::load_with(&ctx, Some(&[])).unwrap();
    let options = KubernetesOptions::from_settings(&settings);
    assert_eq!(options.namespace, "ccat-workflows-staging");
    assert_eq!(options.ttl_seconds_after_finished, 3600);
    assert_eq!(
        options.trees,
        vec![
            HostTree {
                path: "/data/pipelines".into(),
                source: VolumeSource::Claim("ccat-pipelines".into())
            },
            HostTree {
                path: "/data/archive".into(),
                source: VolumeSource::HostPath("/data/archive".into())
            },
            HostTree {
                path: "/data/buffer".into(),
                source: VolumeSource::Claim("buffer".into())
            },
        ]
    );
}

/// `ccat-wfm workflow-manager` with `HPC_BACKEND=kubernetes` finds the cluster through
/// `KUBECONFIG` (in-cluster configuration needs a pod's service account and is not
/// tested here).
// Multi-threaded: the stand-in server answers while this thread waits for the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_reaches_the_cluster_named_by_kubeconfig() {
    let (t, site, runs) = pending_pipeline("kubernetes_cli").await;
    let (cluster, url) = stand_in().await;
    let kubeconfig = site.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: stand-in\n\
             clusters:\n- name: stand-in\n  cluster:\n    server: {url}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: wfm\n\
             users:\n- name: wfm\n  user:\n    token: not-a-real-token\n"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ccat-wfm"));
    cmd.args(["workflow-manager", "--once", "--database-url", &t.url])
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("CCAT_WORKFLOW_MANAGER_") || key.starts_with("KUBE") {
            cmd.env_remove(key);
        }
    }
    let archive = format!("[\"{}\"]", site.archive().display());
    let out = cmd
        .env("KUBECONFIG", &kubeconfig)
        .env("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "kubernetes")
        .env(
            "CCAT_WORKFLOW_MANAGER_K8S_NAMESPACE",
            "ccat-workflows-staging",
        )
        .env("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", site.base())
        .env("CCAT_WORKFLOW_MANAGER_K8S_DATA_VOLUMES", &archive)
        .env("CCAT_WORKFLOW_MANAGER_DISPATCH_MODE", "inline")
        .env("CCAT_WORKFLOW_MANAGER_REDIS_HOST", "")
        .current_dir(site.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["submitted"], runs, "{report}");
    let c = cluster.lock().unwrap();
    assert_eq!(c.jobs.len(), runs);
    assert!(
        c.jobs
            .values()
            .all(|j| j["metadata"]["namespace"] == "ccat-workflows-staging")
    );
}
