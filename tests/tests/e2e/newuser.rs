//! Issue 12, items 13–15: the first hour of a new user — `meshflow up` on a state directory in
//! use, apps that crash or never listen, processes that exit while the mesh runs, Ctrl-C while
//! starting, a reused state directory, a missing policy directory at run time, and the CLI
//! against a live mesh (`stat`, `policy check --control-plane host:port`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use meshflow_cli::up::{LocalMesh, UpOptions};

use crate::common::*;

/// `meshflow up -f <mesh> <args>` with piped output.
fn up(mesh: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(meshflow_cli::supervisor::find_program("meshflow"));
    command
        .arg("up")
        .arg("-f")
        .arg(mesh)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A `meshflow up` child: SIGINT then SIGKILL on drop if still running.
struct Up {
    child: Child,
    lines: Receiver<String>,
    printed: Vec<String>,
}

impl Up {
    fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("meshflow up starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            printed: Vec::new(),
        }
    }

    /// Waits for a stdout line starting with `prefix`; panics (with stderr) if the process
    /// exits first.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.printed.push(line.clone());
                if line.starts_with(prefix) {
                    return line;
                }
                continue;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "meshflow up exited with {status} before {prefix:?}:\n{}\n{}",
                    self.printed.join("\n"),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?}: {:?}",
                self.printed
            );
        }
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Waits for the process to exit by itself (60 s at most).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "meshflow up did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A mesh file in a new temp dir: the hello mesh, with `backend`'s app command replaced by
/// `backend_command` (JSON array) when given.
fn mesh_file(backend_command: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = HELLO.to_string();
    if let Some(command) = backend_command {
        yaml = yaml.replace(
            r#"command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"]"#,
            &format!("command: {command}"),
        );
        assert!(yaml.contains(command));
    }
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

/// Item 14: a second `up` on a state directory in use fails before touching anything, naming
/// the pid that holds it; the running mesh keeps its log and ready files and keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_up_on_a_state_dir_in_use_fails_and_touches_nothing() {
    let (dir, mesh) = mesh_file(None);
    let state = dir.path().join("state");
    let state_arg = state.display().to_string();
    let mut first = Up::spawn(up(&mesh, &["--state-dir", &state_arg]));
    let line = first.wait_line("mesh is up");
    // Item 15: `up` prints the state directory `meshflow stat` needs.
    assert!(
        line.contains(&format!("meshflow stat --state-dir {state_arg}")),
        "{line}"
    );
    let log_path = state.join("logs/control-plane.log");
    let log_before = std::fs::read(&log_path).unwrap();
    let ready_before: Vec<PathBuf> = std::fs::read_dir(state.join("ready"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(ready_before.len() >= 3, "{ready_before:?}");

    let out = up(&mesh, &["--state-dir", &state_arg]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "state directory {state_arg} is in use by another meshflow process (pid {})",
            first.child.id()
        )),
        "{stderr}"
    );
    let log_after = std::fs::read(&log_path).unwrap();
    assert!(
        log_after.starts_with(&log_before),
        "the running mesh's control-plane log was rewritten"
    );
    for ready in &ready_before {
        assert!(ready.exists(), "{} was removed", ready.display());
    }
    // `meshflow stat --state-dir` (as printed) reads the running mesh.
    let stat = Command::new(meshflow_cli::supervisor::find_program("meshflow"))
        .args(["stat", "--state-dir", &state_arg, "--window", "200ms"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.status.success(), "{table}");
    assert!(table.contains("default/backend"), "{table}");

    first.signal(nix::sys::signal::Signal::SIGINT);
    assert!(first.wait_exit().success());
    // Released with the process: the directory can be used again.
    let mut again = Up::spawn(up(&mesh, &["--state-dir", &state_arg]));
    again.wait_line("mesh is up");
}

/// Item 14: an app that exits at start is reported at once with its exit status and log; no
/// "mesh is up".
#[test]
fn an_app_that_exits_at_start_is_reported_with_status_and_log() {
    let (dir, mesh) = mesh_file(Some(
        r#"["sh", "-c", "echo backend is broken >&2; exit 3"]"#,
    ));
    let state = dir.path().join("state");
    let out = up(&mesh, &["--state-dir", &state.display().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(!stdout.contains("mesh is up"), "{stdout}");
    let log = state.join("logs/app-default-backend.log");
    assert!(
        stderr.contains(&format!(
            "app-default-backend exited with exit status: 3 before it was ready; its log: {}",
            log.display()
        )),
        "{stderr}"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("backend is broken"));
}

/// Item 14: an app that never listens is reported after the (bounded) wait, with its log.
#[test]
fn an_app_that_never_listens_is_reported_with_its_log() {
    let (dir, mesh) = mesh_file(Some(r#"["sleep", "600"]"#));
    let state = dir.path().join("state");
    let out = up(
        &mesh,
        &[
            "--state-dir",
            &state.display().to_string(),
            "--ready-timeout",
            "2s",
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(!stdout.contains("mesh is up"), "{stdout}");
    assert!(
        stderr.contains("app-default-backend is running but did not listen on 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "its log: {}",
            state.join("logs/app-default-backend.log").display()
        )),
        "{stderr}"
    );
}

/// The pid of the child of `parent` whose command line contains `needle` (Linux /proc).
fn child_pid(parent: u32, needle: &str) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                return pid.parse().ok();
            }
        }
    }
    None
}

/// Item 14: a sidecar, or an app, that exits while the mesh runs is reaped and reported, and
/// `up` stops the mesh and exits non-zero.
#[test]
fn a_process_that_exits_while_the_mesh_runs_is_reported() {
    for (victim, name) in [
        ("sidecar", "proxy-default-backend"),
        ("app", "app-default-backend"),
    ] {
        let (dir, mesh) = mesh_file(None);
        let state = dir.path().join("state");
        let mut running = Up::spawn(up(&mesh, &["--state-dir", &state.display().to_string()]));
        running.wait_line("mesh is up");
        let pid = if victim == "sidecar" {
            let ready =
                meshflow_api::ReadyFile::read(&state.join("ready/proxy-default-backend.json"))
                    .unwrap();
            ready.pid as i32
        } else {
            child_pid(running.child.id(), "--name\0backend").expect("the backend app")
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = running.wait_exit();
        let stderr = running.stderr();
        assert_eq!(status.code(), Some(1), "{victim}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{name} exited with signal: 9 (SIGKILL); its log: {}",
                state.join(format!("logs/{name}.log")).display()
            )),
            "{victim}: {stderr}"
        );
        // Reaped, not a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty(), "{victim} {pid} still listed: {stat}");
    }
}

/// Item 14: Ctrl-C while `up` waits for an app stops what it started and removes the
/// temporary state directory (CA key, tokens).
#[test]
fn ctrl_c_while_up_waits_removes_the_temporary_state_dir() {
    // SIGHUP too: closing the terminal or SSH session must not leave the CA key behind.
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        signal_while_up_waits_removes_the_temporary_state_dir(signal);
    }
}

fn signal_while_up_waits_removes_the_temporary_state_dir(signal: nix::sys::signal::Signal) {
    let (dir, mesh) = mesh_file(Some(r#"["sleep", "600"]"#));
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut command = up(&mesh, &[]);
    command.env("TMPDIR", &tmp);
    let mut running = Up::spawn(command);
    // Wait until the control plane has written the CA key into the temporary directory.
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let found = std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("ca/root-key.pem").exists() && p.join("logs").exists());
        if let Some(state) = found {
            break state;
        }
        assert!(Instant::now() < deadline, "no state directory in {tmp:?}");
        assert!(running.child.try_wait().unwrap().is_none(), "up exited");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The app has been started (`up` is now waiting for it to listen).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.join("logs/app-default-backend.log").exists() {
        assert!(Instant::now() < deadline, "the app was never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let app = child_pid(running.child.id(), "sleep").expect("the app");
    running.signal(signal);
    let status = running.wait_exit();
    let stderr = running.stderr();
    assert_eq!(status.code(), Some(130), "{signal}: {stderr}");
    assert!(!state.exists(), "{} was left behind", state.display());
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(app), None).is_err(),
        "the app is still running"
    );
}

/// Item 14 (stale endpoints): a mesh restarted on a reused state directory serves only the
/// new sidecars — no request is retried against an endpoint of the previous run.
#[tokio::test(flavor = "multi_thread")]
async fn a_reused_state_dir_serves_no_endpoint_of_the_previous_run() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, HELLO).unwrap();
    let options = || {
        let mut o = UpOptions::new(&dir.path().join("state"));
        o.drain = Duration::from_millis(500);
        o
    };
    let first = LocalMesh::start(&mesh_path, options()).expect("first run");
    let old_backend = first.workload("backend").inbound.clone();
    let response = via(&first.workload("frontend").outbound)
        .get("http://backend.default/first")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Let the control plane write the registration down, as a mesh that ran a while has.
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(first);

    let second = LocalMesh::start(&mesh_path, options()).expect("second run");
    assert_ne!(second.workload("backend").inbound, old_backend);
    let frontend = second.workload("frontend").clone();
    let client = via(&frontend.outbound);
    for i in 0..38 {
        let response = client
            .get(format!("http://backend.default/again/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {i}");
    }
    let text = metrics(&frontend.admin).await;
    let retries = metric(
        &text,
        "meshflow_retries_total",
        &[("service", "backend.default")],
    );
    assert_eq!(
        retries, 0.0,
        "requests were retried (sent to the previous run's endpoint {old_backend} first)"
    );
}

/// Item 13: the control plane's watcher reports a `policiesDir` that does not exist (file,
/// field, line) and keeps the last good policies in force.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_policies_dir_at_run_time_is_reported_and_the_last_policies_stay() {
    const MESH: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: Mesh
metadata: { name: test }
spec:
  policiesDir: policies
  workloads:
    - name: frontend
      app: { protocol: http1, command: ["meshflow-echo", "--name", "frontend", "--listen", "127.0.0.1:{port}"] }
    - name: backend
      labels: { app: backend }
      app: { protocol: http1, command: ["meshflow-echo", "--name", "backend", "--listen", "127.0.0.1:{port}"] }
"#;
    const DENY: &str = r#"apiVersion: meshflow.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  selector: { matchLabels: { app: backend } }
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/admin"] } }]
"#;
    let t = start_dir(MESH, DENY, |_| {});
    let frontend = t.mesh.workload("frontend").clone();
    let admin = via(&frontend.outbound).get("http://backend.default/admin");
    assert_eq!(admin.send().await.unwrap().status(), 403);

    let moved = MESH.replace("policiesDir: policies", "policiesDir: policy");
    std::fs::write(t.mesh_path(), &moved).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        let dump: serde_json::Value =
            serde_json::from_str(&get_text(&t.mesh.control_plane_admin, "/config_dump").await)
                .unwrap();
        if let Some(error) = dump["lastError"].as_str() {
            break error.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the missing directory was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        error.contains(&format!(
            "{}:5: spec.policiesDir: policy directory",
            t.mesh_path().display()
        )) && error.contains("does not exist"),
        "{error}"
    );
    let admin = via(&frontend.outbound).get("http://backend.default/admin");
    assert_eq!(
        admin.send().await.unwrap().status(),
        403,
        "the last good policies stay in force"
    );
}

/// Item 15: `policy check --control-plane 127.0.0.1:PORT` (no scheme) said "builder error";
/// `meshflow stat --admin` takes the `http://` form `up` prints and never prints `-0.00`.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_takes_addresses_as_up_prints_them() {
    let t = start_hello();
    let meshflow = meshflow_cli::supervisor::find_program("meshflow");
    let out = Command::new(&meshflow)
        .args(["policy", "check", "--control-plane"])
        .arg(&t.mesh.control_plane_admin)
        .args([
            "--workload",
            "default/backend",
            "--port",
            "80",
            "--principal",
            "cluster.local/ns/default/sa/frontend",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("ALLOW"), "{stdout}");

    let backend = t.mesh.workload("backend").clone();
    let out = Command::new(&meshflow)
        .args(["stat", "--window", "300ms", "--admin"])
        .arg(format!("http://{}", backend.admin))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("default/backend"), "{stdout}");
    assert!(!stdout.contains("-0.00"), "{stdout}");
}
