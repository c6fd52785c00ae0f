//! The command of a job, as an argument vector and an environment: never a shell line.
//! Backends start it with `execve` (local) or write it into a batch script with every
//! word quoted (SLURM), so names, configuration and paths from the database arrive in
//! the software exactly as written.

use std::path::{Path, PathBuf};

use super::layout::{RunLayout, container};

pub use crate::config::ContainerRuntime;

pub use crate::backend::{JobCommand, Mount, PodContainer};

/// One input bound into the job: a file on the host and its name under `input/`.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundInput {
    pub host_path: PathBuf,
    /// Relative to the input directory, e.g. `12_scan.tar` or `products/7_map.fits`.
    pub name: String,
}

/// What [`build`] needs besides the layout.
#[derive(Debug, Clone)]
pub struct CommandRequest<'a> {
    pub runtime: ContainerRuntime,
    pub apptainer: &'a str,
    /// The SIF image, or an image URI apptainer can pull (`docker://…`).
    pub image: &'a str,
    /// The software version's command (argument vector inside the container).
    pub command: &'a [String],
    pub layout: &'a RunLayout,
    pub final_step: bool,
    pub inputs: &'a [BoundInput],
    pub run_id: i64,
    pub step_name: &'a str,
}

/// The directories as the software sees them, for the manifest and the environment.
pub fn visible_dirs(
    runtime: ContainerRuntime,
    layout: &RunLayout,
    final_step: bool,
) -> super::layout::ManifestDirectories {
    let show = |p: PathBuf| p.display().to_string();
    match runtime {
        ContainerRuntime::Apptainer | ContainerRuntime::Pod => super::layout::ManifestDirectories {
            input: container::INPUT.into(),
            workspace: format!("{}/{}", container::WORKSPACE, layout.step),
            output: if final_step {
                container::OUTPUT.into()
            } else {
                format!("{}/{}", container::WORKSPACE, layout.step)
            },
            logs: container::LOGS.into(),
            config: container::CONFIG.into(),
        },
        ContainerRuntime::None => super::layout::ManifestDirectories {
            input: show(layout.input()),
            workspace: show(layout.step_workspace()),
            output: show(if final_step {
                layout.output()
            } else {
                layout.step_workspace()
            }),
            logs: show(layout.logs()),
            config: show(layout.config()),
        },
    }
}

/// The job's command and environment.
pub fn build(req: &CommandRequest<'_>) -> Result<JobCommand, String> {
    if req.command.is_empty() {
        return Err("the software version has no command".into());
    }
    let dirs = visible_dirs(req.runtime, req.layout, req.final_step);
    let env = vec![
        ("WORKFLOW_RUN_ID".to_owned(), req.run_id.to_string()),
        (
            "WORKFLOW_ATTEMPT".to_owned(),
            req.layout.attempt.to_string(),
        ),
        ("WORKFLOW_STEP".to_owned(), req.step_name.to_owned()),
        (
            "WORKFLOW_MANIFEST".to_owned(),
            format!("{}/manifest.json", dirs.config),
        ),
        ("WORKFLOW_INPUT_DIR".to_owned(), dirs.input),
        ("WORKFLOW_WORKSPACE_DIR".to_owned(), dirs.workspace),
        ("WORKFLOW_OUTPUT_DIR".to_owned(), dirs.output),
        ("WORKFLOW_LOG_DIR".to_owned(), dirs.logs),
        ("WORKFLOW_CONFIG_DIR".to_owned(), dirs.config),
    ];
    match req.runtime {
        ContainerRuntime::None => Ok(JobCommand {
            program: req.command[0].clone(),
            args: req.command[1..].to_vec(),
            env,
            workdir: req.layout.step_workspace(),
            container: None,
        }),
        ContainerRuntime::Pod => Ok(JobCommand {
            program: req.command[0].clone(),
            args: req.command[1..].to_vec(),
            env,
            workdir: format!("{}/{}", container::WORKSPACE, req.layout.step).into(),
            container: Some(PodContainer {
                image: req.image.to_owned(),
                mounts: mounts(req),
            }),
        }),
        ContainerRuntime::Apptainer => {
            if req.image.starts_with('-') {
                return Err(format!(
                    "image {:?} starts with '-' and would be read as an Apptainer option",
                    req.image
                ));
            }
            let mut args = vec![
                "exec".to_owned(),
                // Only what we pass reaches the container: no host environment, no home,
                // no host /tmp or working directory (which holds the attempt's records),
                // its own process and IPC namespaces.
                "--containall".to_owned(),
                "--no-home".to_owned(),
                "--pwd".to_owned(),
                format!("{}/{}", container::WORKSPACE, req.layout.step),
            ];
            for m in mounts(req) {
                // Apptainer splits a bind at ',' and ':': such a path would bind something
                // else (or break the job), so the run fails with the reason instead.
                for part in [m.host.to_string_lossy().as_ref(), m.inside.as_str()] {
                    if part.contains([',', ':']) {
                        return Err(format!(
                            "{part:?} cannot be bound into an Apptainer container: \
                             it contains ',' or ':', which Apptainer reads as separators"
                        ));
                    }
                }
                args.push("--bind".to_owned());
                args.push(format!(
                    "{}:{}{}",
                    m.host.display(),
                    m.inside,
                    if m.read_only { ":ro" } else { "" }
                ));
            }
            args.push(req.image.to_owned());
            args.extend(req.command.iter().cloned());
            Ok(JobCommand {
                program: req.apptainer.to_owned(),
                args,
                // APPTAINERENV_X becomes X inside, verbatim: no parsing of commas or quotes
                // as `--env` would do.
                env: env
                    .into_iter()
                    .map(|(k, v)| (format!("APPTAINERENV_{k}"), v))
                    .collect(),
                workdir: req.layout.attempt_dir(),
                container: None,
            })
        }
    }
}

/// The host directories and inputs a container sees, where (SPEC §6).
fn mounts(req: &CommandRequest<'_>) -> Vec<Mount> {
    let mount = |host: PathBuf, inside: &str, read_only: bool| Mount {
        host,
        inside: inside.to_owned(),
        read_only,
    };
    let mut mounts = vec![
        mount(req.layout.workspace(), container::WORKSPACE, false),
        mount(req.layout.logs(), container::LOGS, false),
        mount(req.layout.config(), container::CONFIG, true),
    ];
    if req.final_step {
        mounts.push(mount(req.layout.output(), container::OUTPUT, false));
    }
    // Each input on its own: the links in input/ point outside any mount.
    for input in req.inputs {
        mounts.push(mount(
            input.host_path.clone(),
            &format!("{}/{}", container::INPUT, input.name),
            true,
        ));
    }
    mounts
}

/// Where the SIF of an image is cached: by digest when known, else by reference.
pub fn sif_path(cache: &Path, image_ref: &str, digest: Option<&str>) -> PathBuf {
    // Either way one file name inside the cache, whatever the database holds.
    let name: String = match digest {
        Some(d) if !d.is_empty() => d,
        _ => image_ref,
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || "._-".contains(c) {
            c
        } else {
            '_'
        }
    })
    .collect();
    cache.join(format!("{name}.sif"))
}

/// The image apptainer is given: the cached SIF, or else the reference as a URI apptainer
/// pulls itself (a bare `registry/name:tag` is a Docker reference).
pub fn image_for(cache: &Path, image_ref: &str, digest: Option<&str>) -> String {
    let sif = sif_path(cache, image_ref, digest);
    if sif.is_file() {
        sif.display().to_string()
    } else if image_ref.contains("://") || image_ref.ends_with(".sif") {
        image_ref.to_owned()
    } else {
        format!("docker://{image_ref}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RunLayout {
        RunLayout::new(Path::new("/base"), "p", "scan=1", "cal", 9, 1)
    }

    #[test]
    fn apptainer_binds_every_directory_and_input() {
        let l = layout();
        let inputs = vec![BoundInput {
            host_path: "/archive/a b.tar".into(),
            name: "3_a b.tar".into(),
        }];
        let command = vec!["calibrate".to_owned(), "--mode=x;y".to_owned()];
        let cmd = build(&CommandRequest {
            runtime: ContainerRuntime::Apptainer,
            apptainer: "apptainer",
            image: "/sif/x.sif",
            command: &command,
            layout: &l,
            final_step: true,
            inputs: &inputs,
            run_id: 9,
            step_name: "cal",
        })
        .unwrap();
        let argv = cmd.argv();
        assert_eq!(
            &argv[..4],
            ["apptainer", "exec", "--containall", "--no-home"]
        );
        assert!(argv.contains(&"/base/p/scan=1/workspace:/workflow/workspace".to_owned()));
        assert!(
            argv.contains(
                &"/base/p/scan=1/config/cal/run-9/attempt-1:/workflow/config:ro".to_owned()
            )
        );
        assert!(argv.contains(&"/base/p/scan=1/output:/workflow/output".to_owned()));
        assert!(argv.contains(&"/archive/a b.tar:/workflow/input/3_a b.tar:ro".to_owned()));
        assert_eq!(
            &argv[argv.len() - 3..],
            ["/sif/x.sif", "calibrate", "--mode=x;y"]
        );
        assert!(cmd.env.contains(&(
            "APPTAINERENV_WORKFLOW_OUTPUT_DIR".to_owned(),
            "/workflow/output".to_owned()
        )));
    }

    #[test]
    fn no_runtime_runs_the_command_with_host_paths() {
        let l = layout();
        let command = vec!["/bin/echo".to_owned(), "hi".to_owned()];
        let cmd = build(&CommandRequest {
            runtime: ContainerRuntime::None,
            apptainer: "apptainer",
            image: "",
            command: &command,
            layout: &l,
            final_step: false,
            inputs: &[],
            run_id: 9,
            step_name: "cal",
        })
        .unwrap();
        assert_eq!(cmd.argv(), ["/bin/echo", "hi"]);
        assert!(cmd.env.contains(&(
            "WORKFLOW_OUTPUT_DIR".to_owned(),
            "/base/p/scan=1/workspace/cal".to_owned()
        )));
    }

    #[test]
    fn what_apptainer_would_misread_fails_the_run() {
        let l = layout();
        let command = vec!["calibrate".to_owned()];
        let request = |image: &'static str, name: &str| {
            let inputs = vec![BoundInput {
                host_path: "/archive/scan.tar".into(),
                name: name.to_owned(),
            }];
            build(&CommandRequest {
                runtime: ContainerRuntime::Apptainer,
                apptainer: "apptainer",
                image,
                command: &command,
                layout: &l,
                final_step: false,
                inputs: &inputs,
                run_id: 9,
                step_name: "cal",
            })
        };
        assert!(request("/sif/x.sif", "3_scan.tar").is_ok());
        let e = request("/sif/x.sif", "3_x,/home/wfm/.ssh").unwrap_err();
        assert!(e.contains("',' or ':'"), "{e}");
        let e = request("/sif/x.sif", "3_12:00:00.fits").unwrap_err();
        assert!(e.contains("',' or ':'"), "{e}");
        let e = request("--bind=/:/host.sif", "3_scan.tar").unwrap_err();
        assert!(e.contains("Apptainer option"), "{e}");
    }

    #[test]
    fn images_come_from_the_cache_or_are_pulled() {
        let cache = Path::new("/nonexistent");
        assert_eq!(
            sif_path(cache, "reg.io/chai:1.2", None),
            Path::new("/nonexistent/reg.io_chai_1.2.sif")
        );
        assert_eq!(
            sif_path(cache, "x", Some("sha256:ab")),
            Path::new("/nonexistent/sha256_ab.sif")
        );
        // A digest from the database never leaves the cache.
        assert_eq!(
            sif_path(cache, "x", Some("../../tmp/x")),
            Path::new("/nonexistent/.._.._tmp_x.sif")
        );
        assert_eq!(
            image_for(cache, "reg.io/chai:1.2", None),
            "docker://reg.io/chai:1.2"
        );
        assert_eq!(image_for(cache, "oras://r/x:1", None), "oras://r/x:1");
    }
}
