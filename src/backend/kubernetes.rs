//! Kubernetes: one `batch/v1` Job per run attempt (SPEC §6). This module holds what is
//! pure: the Job a run attempt becomes, and the run state a Job and its pod stand for.
//!
//! The Job's name is the attempt's tag and it carries the run id and attempt as labels,
//! so that a manager that crashed between creating a Job and recording it finds the Job
//! again instead of creating a second one; the tag carries the deployment id and the Job
//! the attempt's token (an annotation), so only this attempt's own Job is ever adopted.
//! Retries are ours (`backoffLimit: 0`); the time
//! limit is `activeDeadlineSeconds`; a finished Job is removed by the TTL controller.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::batch::v1::{Job, JobSpec as K8sJobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, EnvVar, HostPathVolumeSource, PersistentVolumeClaimVolumeSource,
    Pod, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{BackendError, JobMetrics, JobSpec, JobState};

/// Label naming who manages a Job; the list of active Jobs selects on it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ccat-workflow-manager");
pub const RUN_ID_LABEL: &str = "workflows.ccat.uni-koeln.de/run-id";
pub const ATTEMPT_LABEL: &str = "workflows.ccat.uni-koeln.de/attempt";
/// Annotation carrying the attempt's token (`{tag}:{nonce}`, see
/// [`super::AttemptIdentity`]): a Job of this name is adopted only with it.
pub const TOKEN_ANNOTATION: &str = "workflows.ccat.uni-koeln.de/attempt-token";
/// The container of every Job; its logs are the job log.
pub const CONTAINER: &str = "step";

/// Where a directory the pods need comes from on the nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumeSource {
    /// The same directory on every node (a shared file system mounted there).
    HostPath(PathBuf),
    /// A PersistentVolumeClaim holding it.
    Claim(String),
}

/// A tree of the processing host the pods see: `path` on the host is `source`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTree {
    pub path: PathBuf,
    pub source: VolumeSource,
}

/// How run attempts become Jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesOptions {
    pub namespace: String,
    /// The pipeline base directory (the run directories), then the trees inputs link
    /// into (the archive), in that order of preference.
    pub trees: Vec<HostTree>,
    /// How long a finished Job (and its pod and log) is kept.
    pub ttl_seconds_after_finished: i32,
    /// The user and group the software runs as: the manager's own, so that what a job
    /// writes into the run directory the managers can read, collect and clean up.
    pub run_as: Option<(i64, i64)>,
}

/// The Job for one attempt. Every path the command mounts must lie in one of the
/// configured trees; it is mounted as a `subPath` of that tree's volume.
pub fn job_manifest(spec: &JobSpec, options: &KubernetesOptions) -> Result<Job, BackendError> {
    validate_name(&spec.tag)?;
    let container = spec.command.container.as_ref().ok_or_else(|| {
        BackendError::Invalid(
            "the kubernetes backend needs CONTAINER_RUNTIME=pod (the pod is the container)".into(),
        )
    })?;
    let (run_id, attempt) = run_and_attempt(&spec.tag)?;
    let mut volumes: Vec<Volume> = Vec::new();
    let mut mounts = Vec::new();
    for m in &container.mounts {
        let (index, sub_path) = options
            .trees
            .iter()
            .enumerate()
            .find_map(|(i, t)| m.host.strip_prefix(&t.path).ok().map(|rel| (i, rel)))
            .ok_or_else(|| {
                BackendError::Invalid(format!(
                    "{} is outside every directory the pods can see (the pipeline base \
                     directory and the data trees of the kubernetes settings)",
                    m.host.display()
                ))
            })?;
        let name = format!("tree-{index}");
        if !volumes.iter().any(|v| v.name == name) {
            volumes.push(volume(&name, &options.trees[index].source));
        }
        mounts.push(VolumeMount {
            name,
            mount_path: m.inside.clone(),
            sub_path: Some(sub_path.display().to_string()).filter(|s| !s.is_empty()),
            read_only: Some(m.read_only),
            ..Default::default()
        });
    }
    let quantities = BTreeMap::from([
        ("cpu".to_owned(), Quantity(spec.cpus.to_string())),
        (
            "memory".to_owned(),
            Quantity(format!("{}Mi", spec.memory_mb)),
        ),
    ]);
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (RUN_ID_LABEL.to_owned(), run_id.to_string()),
        (ATTEMPT_LABEL.to_owned(), attempt.to_string()),
    ]);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(spec.tag.clone()),
            namespace: Some(options.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                TOKEN_ANNOTATION.to_owned(),
                spec.token(),
            )])),
            ..Default::default()
        },
        spec: Some(K8sJobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: (spec.time_limit_seconds > 0)
                .then_some(spec.time_limit_seconds as i64),
            ttl_seconds_after_finished: Some(options.ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    // The software talks to nothing of the cluster.
                    automount_service_account_token: Some(false),
                    security_context: options.run_as.map(|(user, group)| PodSecurityContext {
                        run_as_user: Some(user),
                        run_as_group: Some(group),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: CONTAINER.into(),
                        image: Some(container.image.clone()),
                        command: Some(vec![spec.command.program.clone()]),
                        args: Some(spec.command.args.clone()),
                        env: Some(
                            spec.command
                                .env
                                .iter()
                                .map(|(name, value)| EnvVar {
                                    name: name.clone(),
                                    value: Some(value.clone()),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        working_dir: Some(spec.command.workdir.display().to_string()),
                        resources: Some(ResourceRequirements {
                            requests: Some(quantities.clone()),
                            limits: Some(quantities),
                            ..Default::default()
                        }),
                        volume_mounts: Some(mounts),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn volume(name: &str, source: &VolumeSource) -> Volume {
    match source {
        VolumeSource::HostPath(path) => Volume {
            name: name.to_owned(),
            host_path: Some(HostPathVolumeSource {
                path: path.display().to_string(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        },
        VolumeSource::Claim(claim) => Volume {
            name: name.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Default::default()
        },
    }
}

/// A Job name is a DNS-1123 label: at most 63 lower-case letters, digits and `-`.
fn validate_name(name: &str) -> Result<(), BackendError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(BackendError::Invalid(format!(
            "{name:?} is not a valid Kubernetes Job name"
        )))
    }
}

/// The run id and attempt of a tag `…-run-<id>-a<attempt>`.
/// The attempt token a Job carries.
fn token_of(job: &Job) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(TOKEN_ANNOTATION)
        .map(String::as_str)
}

fn run_and_attempt(tag: &str) -> Result<(i64, i32), BackendError> {
    let parsed = tag.rsplit_once("-run-").and_then(|(_, rest)| {
        let (id, attempt) = rest.split_once("-a")?;
        Some((id.parse().ok()?, attempt.parse().ok()?))
    });
    parsed.ok_or_else(|| BackendError::Invalid(format!("{tag:?} is not a job tag")))
}

/// The state of a run attempt from its Job and the Job's pod (if any).
pub fn job_state(job: &Job, pod: Option<&Pod>) -> JobState {
    let status = job.status.clone().unwrap_or_default();
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    let terminated = pod.and_then(|p| container_state(p)?.terminated);
    let metrics = JobMetrics {
        exit_code: terminated.as_ref().map(|t| t.exit_code),
        wall_time_seconds: terminated.as_ref().and_then(|t| {
            Some(seconds_between(
                timestamp(t.started_at.as_ref()?)?,
                timestamp(t.finished_at.as_ref()?)?,
            ))
        }),
        cpu_hours: None,
        peak_memory_gb: None,
    };
    if condition("Complete").is_some() || condition("SuccessCriteriaMet").is_some() {
        return JobState::Succeeded(metrics);
    }
    if let Some(failed) = condition("Failed") {
        let reason = match (failed.reason.as_deref(), terminated.as_ref()) {
            (Some("DeadlineExceeded"), _) => format!(
                "time limit of {} s exceeded",
                job.spec
                    .as_ref()
                    .and_then(|s| s.active_deadline_seconds)
                    .unwrap_or_default()
            ),
            (_, Some(t)) if t.reason.as_deref() == Some("OOMKilled") => {
                "out of memory (OOMKilled)".to_owned()
            }
            (_, Some(t)) => format!("exit code {}", t.exit_code),
            (reason, None) => format!(
                "the job failed: {}",
                failed
                    .message
                    .as_deref()
                    .or(reason)
                    .unwrap_or("no reason given")
            ),
        };
        return JobState::Failed { reason, metrics };
    }
    // A pod that cannot start never will on its own: fail it rather than wait forever.
    if let Some(waiting) = pod.and_then(|p| container_state(p)?.waiting) {
        let reason = waiting.reason.unwrap_or_default();
        if matches!(
            reason.as_str(),
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "CreateContainerConfigError"
        ) {
            return JobState::Failed {
                reason: format!(
                    "the container cannot start ({reason}): {}",
                    waiting.message.unwrap_or_default()
                ),
                metrics,
            };
        }
    }
    let running = status.active.unwrap_or(0) > 0
        && pod
            .is_some_and(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
    if running {
        JobState::Running
    } else {
        JobState::Queued
    }
}

/// The state of the step container.
fn container_state(pod: &Pod) -> Option<ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)?
        .state
        .clone()
}

/// A Kubernetes timestamp, whatever time library the API types use: read from its
/// RFC 3339 form.
fn timestamp<T: serde::Serialize>(time: &T) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = serde_json::to_value(time).ok()?;
    chrono::DateTime::parse_from_rfc3339(text.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn seconds_between(
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) -> f64 {
    (end - start).num_milliseconds() as f64 / 1000.0
}

impl KubernetesOptions {
    /// The options `K8S_*` and `PIPELINE_BASE_DIR` describe (validated when loaded).
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        let source = |spec: Option<&str>, path: &std::path::Path| match spec
            .and_then(|s| s.strip_prefix("pvc:"))
        {
            Some(claim) => VolumeSource::Claim(claim.to_owned()),
            None => VolumeSource::HostPath(path.to_owned()),
        };
        let k8s = &settings.kubernetes;
        let mut trees = vec![HostTree {
            path: settings.pipeline_base_dir.clone(),
            source: source(
                Some(k8s.pipeline_volume.as_str()).filter(|v| !v.is_empty()),
                &settings.pipeline_base_dir,
            ),
        }];
        for volume in &k8s.data_volumes {
            let (path, spec) = match volume.split_once('=') {
                Some((path, spec)) => (PathBuf::from(path), Some(spec)),
                None => (PathBuf::from(volume), None),
            };
            trees.push(HostTree {
                source: source(spec, &path),
                path,
            });
        }
        KubernetesOptions {
            namespace: settings.k8s_namespace.clone(),
            trees,
            ttl_seconds_after_finished: k8s.job_ttl_seconds.clamp(0, i32::MAX as i64) as i32,
            // SAFETY: getuid and getgid cannot fail and touch no memory.
            run_as: Some(unsafe { (libc::getuid() as i64, libc::getgid() as i64) }),
        }
    }
}

/// Jobs on a Kubernetes cluster. The client is made on first use — from `KUBECONFIG` or
/// `~/.kube/config`, else the pod's service account in-cluster — so a backend can be
/// built without a cluster at hand.
pub struct KubernetesBackend {
    options: KubernetesOptions,
    client: tokio::sync::OnceCell<kube::Client>,
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The label selector of every Job and pod this product made.
fn managed() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

/// A client error as a backend error: an answer from the API server is a refusal, no
/// answer is unclear (the request may have been carried out).
fn api_error(what: &str, err: kube::Error) -> BackendError {
    match err {
        kube::Error::Api(status) => BackendError::Command {
            command: what.to_owned(),
            status: format!("{} {}", status.code, status.reason),
            stderr: status.message,
        },
        other => BackendError::Unclear {
            command: what.to_owned(),
            detail: other.to_string(),
        },
    }
}

impl KubernetesBackend {
    pub fn new(options: KubernetesOptions) -> Self {
        KubernetesBackend {
            options,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// A backend on a given client (another cluster, or a test server).
    pub fn with_client(client: kube::Client, options: KubernetesOptions) -> Self {
        KubernetesBackend {
            options,
            client: tokio::sync::OnceCell::new_with(Some(client)),
        }
    }

    async fn client(&self) -> Result<kube::Client, BackendError> {
        self.client
            .get_or_try_init(|| async {
                let mut config = kube::Config::infer().await.map_err(|e| {
                    BackendError::Invalid(format!(
                        "no Kubernetes configuration (KUBECONFIG, ~/.kube/config or \
                         in-cluster): {e}"
                    ))
                })?;
                // An API server that stops answering costs a cycle, never the manager.
                config.connect_timeout = Some(std::time::Duration::from_secs(10));
                config.read_timeout = Some(std::time::Duration::from_secs(60));
                config.write_timeout = Some(std::time::Duration::from_secs(60));
                kube::Client::try_from(config).map_err(|e| {
                    BackendError::Invalid(format!("the Kubernetes client cannot be made: {e}"))
                })
            })
            .await
            .cloned()
    }

    /// Jobs or pods of the namespace.
    async fn api<K>(&self) -> Result<kube::Api<K>, BackendError>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Ok(kube::Api::namespaced(
            self.client().await?,
            &self.options.namespace,
        ))
    }

    /// Keeps the pod's log as the attempt's job log (the pod goes with the Job's TTL).
    async fn keep_log(&self, pod: &Pod, job: &super::JobRef) {
        let Some(name) = pod.metadata.name.as_deref() else {
            return;
        };
        let params = kube::api::LogParams {
            container: Some(CONTAINER.into()),
            ..Default::default()
        };
        let log = match self.api::<Pod>().await {
            Ok(pods) => pods.logs(name, &params).await,
            Err(_) => return,
        };
        match log {
            Ok(text) => {
                let path = job.attempt_dir.join(super::JOB_LOG);
                if let Err(e) = super::write_private(&path, text.as_bytes()) {
                    tracing::warn!(path = %path.display(), error = %e, "job log not kept");
                }
            }
            Err(e) => tracing::warn!(pod = name, error = %e, "pod log not read"),
        }
    }
}

impl super::Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn submit(&self, spec: &JobSpec) -> Result<String, BackendError> {
        let job = job_manifest(spec, &self.options)?;
        match self
            .api::<Job>()
            .await?
            .create(&kube::api::PostParams::default(), &job)
            .await
        {
            Ok(_) => Ok(spec.tag.clone()),
            // Created before a crash kept it from being recorded: that Job, never a second
            // — if it is this attempt's own (its token), else the run cannot go on.
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let existing = self
                    .api::<Job>()
                    .await?
                    .get(&spec.tag)
                    .await
                    .map_err(|e| api_error("reading the existing Job", e))?;
                if token_of(&existing) == Some(spec.token().as_str()) {
                    Ok(spec.tag.clone())
                } else {
                    Err(BackendError::Invalid(format!(
                        "a Job named {} exists but was not made for this attempt",
                        spec.tag
                    )))
                }
            }
            Err(e) => Err(api_error("creating the Job", e)),
        }
    }

    async fn find(
        &self,
        tag: &str,
        attempt_dir: &std::path::Path,
    ) -> Result<Option<String>, BackendError> {
        let Some(token) = super::AttemptIdentity::token_for(tag, attempt_dir) else {
            return Ok(None);
        };
        let (run_id, attempt) = run_and_attempt(tag)?;
        let selector = format!(
            "{},{RUN_ID_LABEL}={run_id},{ATTEMPT_LABEL}={attempt}",
            managed()
        );
        let listed = self
            .api::<Job>()
            .await?
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_error("listing Jobs", e))?;
        Ok(listed
            .items
            .into_iter()
            .filter(|j| token_of(j) == Some(token.as_str()))
            .filter_map(|j| j.metadata.name)
            .find(|name| name == tag))
    }

    async fn status(
        &self,
        jobs: &[super::JobRef],
    ) -> Result<std::collections::HashMap<String, JobState>, BackendError> {
        let params = kube::api::ListParams::default().labels(&managed());
        let listed = self
            .api::<Job>()
            .await?
            .list(&params)
            .await
            .map_err(|e| api_error("listing Jobs", e))?;
        let pods = self
            .api::<Pod>()
            .await?
            .list(&params)
            .await
            .map_err(|e| api_error("listing pods", e))?;
        let by_name: std::collections::HashMap<&str, &Job> = listed
            .items
            .iter()
            .filter_map(|j| Some((j.metadata.name.as_deref()?, j)))
            .collect();
        // A Job's newest pod (there is one: backoffLimit 0).
        let mut pod_of: std::collections::HashMap<&str, &Pod> = Default::default();
        for pod in &pods.items {
            let Some(job) = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("batch.kubernetes.io/job-name").or(l.get("job-name")))
            else {
                continue;
            };
            let newer = pod_of.get(job.as_str()).is_none_or(|p| {
                p.metadata.creation_timestamp.as_ref().map(|t| t.0)
                    < pod.metadata.creation_timestamp.as_ref().map(|t| t.0)
            });
            if newer {
                pod_of.insert(job, pod);
            }
        }
        let mut states = std::collections::HashMap::new();
        for job_ref in jobs {
            let Some(job) = by_name.get(job_ref.job_id.as_str()) else {
                states.insert(job_ref.job_id.clone(), JobState::Vanished);
                continue;
            };
            let pod = pod_of.get(job_ref.job_id.as_str()).copied();
            let state = job_state(job, pod);
            if state.is_final() {
                if let Some(pod) = pod {
                    self.keep_log(pod, job_ref).await;
                }
                // A Job that cannot start (its image) is failed by us: remove it.
                let finished = job.status.as_ref().is_some_and(|s| {
                    s.conditions.iter().flatten().any(|c| {
                        matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True"
                    })
                });
                if !finished {
                    let _ = self.cancel(job_ref).await;
                }
            }
            states.insert(job_ref.job_id.clone(), state);
        }
        Ok(states)
    }

    async fn cancel(&self, job: &super::JobRef) -> Result<(), BackendError> {
        match self
            .api::<Job>()
            .await?
            .delete(&job.job_id, &kube::api::DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(api_error("deleting the Job", e)),
        }
    }
}
