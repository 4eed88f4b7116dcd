//! A local mesh: the control plane, each workload's app and sidecar, started from one mesh
//! file through the [`Supervisor`]. Used by `meshflow up`, `meshflow demo` and the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use meshflow_api::ReadyFile;
use meshflow_policies::mesh::{AppProtocol, MeshFile};

use crate::supervisor::{find_program, free_port, ChildSpec, Supervisor, SupervisorError};

/// How to start a local mesh.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// State directory (CA, tokens, bootstrap files, logs, ready files).
    pub state_dir: PathBuf,
    /// Sidecar drain time after SIGTERM.
    pub drain: Duration,
    /// Leaf certificate TTL (e.g. 10 s in rotation tests).
    pub leaf_ttl: Option<Duration>,
    /// How long each process may take to become ready.
    pub ready_timeout: Duration,
    /// Extra environment for every meshflow process (e.g. `MESHFLOW_LOG`).
    pub env: BTreeMap<String, String>,
    /// Workload keys whose sidecar is not started (tests start them by hand).
    pub skip_sidecars: std::collections::BTreeSet<String>,
    /// Extra control-plane arguments (e.g. `--workflow-store postgres://…`).
    pub control_plane_args: Vec<String>,
    /// Set (e.g. by a SIGINT handler) to abandon the start: [`LocalMesh::start`] stops what it
    /// started and returns [`UpError::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Print a line on stderr when an app is slow to listen.
    pub progress: bool,
}

impl UpOptions {
    /// Defaults: drain 1 s, CA default TTL, 30 s readiness timeout.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            drain: Duration::from_secs(1),
            leaf_ttl: None,
            ready_timeout: Duration::from_secs(30),
            env: BTreeMap::new(),
            skip_sidecars: Default::default(),
            control_plane_args: Vec::new(),
            cancel: None,
            progress: false,
        }
    }
}

/// Addresses of one running workload.
#[derive(Debug, Clone)]
pub struct WorkloadAddresses {
    /// `<namespace>/<name>`.
    pub key: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// The app on 127.0.0.1.
    pub app: String,
    /// Sidecar inbound (mTLS).
    pub inbound: String,
    /// Sidecar outbound (plaintext, loopback).
    pub outbound: String,
    /// Sidecar admin.
    pub admin: String,
}

/// Up errors.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The mesh file is invalid (exit code 64).
    #[error("{0}")]
    Config(String),
    /// Another `meshflow up` (or `meshflow demo`) holds the state directory.
    #[error("state directory {dir} is in use by another meshflow process{}; stop it or choose another --state-dir", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    StateDirInUse {
        /// The state directory.
        dir: PathBuf,
        /// The pid recorded in its lock file, if readable.
        pid: Option<u32>,
    },
    /// Interrupted (SIGINT / SIGTERM) while starting; everything started was stopped.
    #[error("interrupted while starting; stopped everything it had started")]
    Interrupted,
    /// A process failed to start or become ready.
    #[error(transparent)]
    Supervisor(SupervisorError),
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<SupervisorError> for UpError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::Interrupted => UpError::Interrupted,
            other => UpError::Supervisor(other),
        }
    }
}

/// The name of the lock file in a state directory, held (`flock`) by the `meshflow` process
/// running a mesh on it; it holds that process's pid.
pub const LOCK_FILE: &str = "meshflow.lock";

/// An exclusive lock on a state directory (see [`LOCK_FILE`]), released when dropped or when
/// the process dies.
#[derive(Debug)]
pub struct StateDirLock {
    _file: std::fs::File,
}

impl StateDirLock {
    /// Locks `state_dir` (creating it) before anything in it is touched.
    ///
    /// # Errors
    /// [`UpError::StateDirInUse`] naming the holder's pid, or I/O errors.
    pub fn acquire(state_dir: &Path) -> Result<Self, UpError> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(UpError::StateDirInUse {
                    dir: state_dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

/// A running local mesh. Dropping it stops every process.
pub struct LocalMesh {
    /// The processes.
    pub supervisor: Supervisor,
    /// The mesh definition.
    pub mesh: MeshFile,
    /// The mesh file path.
    pub mesh_path: PathBuf,
    /// Options it was started with.
    pub options: UpOptions,
    /// Control-plane gRPC address.
    pub control_plane: String,
    /// Control-plane admin address.
    pub control_plane_admin: String,
    /// Workloads by key (those whose sidecar is ready).
    pub workloads: BTreeMap<String, WorkloadAddresses>,
    /// App port of every workload, by key.
    pub app_ports: BTreeMap<String, u16>,
    /// The workflow API (`host:port`) when a workload is `builtin: coordinator`.
    pub workflow_api: Option<String>,
    /// (the `builtin: coordinator` workload's key, its workflow API port): the port is 0 until
    /// the control plane first bound it (port 0, read back from its ready file), then kept for
    /// restarts, since the coordinator's sidecar forwards to it.
    coordinator: Option<(String, u16)>,
    /// Held while the mesh runs (declared last: released after the processes are stopped).
    _lock: StateDirLock,
}

fn protocol_flag(p: AppProtocol) -> &'static str {
    match p {
        AppProtocol::Http1 => "http1",
        AppProtocol::H2c => "h2c",
        AppProtocol::Grpc => "grpc",
    }
}

impl LocalMesh {
    /// Starts the mesh in `mesh_path` and waits until every sidecar is ready.
    ///
    /// Call it from a thread that outlives the mesh (the main thread, a test's own thread):
    /// each process is killed when the thread that spawned it ends (`PR_SET_PDEATHSIG`), and
    /// a pool thread — tokio's `spawn_blocking` ends idle ones after 10 s — takes the mesh with
    /// it.
    ///
    /// # Errors
    /// [`UpError::Config`] for an invalid mesh file; otherwise the first process that failed.
    pub fn start(mesh_path: &Path, options: UpOptions) -> Result<Self, UpError> {
        let mesh = MeshFile::load(mesh_path).map_err(|e| UpError::Config(e.to_string()))?;
        // Before anything in the state directory is touched (logs, ready files): a mesh
        // running on it keeps its files.
        let lock = StateDirLock::acquire(&options.state_dir)?;
        let logs = options.state_dir.join("logs");
        let ready_dir = options.state_dir.join("ready");
        std::fs::create_dir_all(&ready_dir)?;
        // A sidecar may take its drain time to exit; SIGKILL only after that plus slack.
        let mut supervisor = Supervisor::new(&logs, options.drain + Duration::from_secs(2))?;
        if let Some(flag) = &options.cancel {
            supervisor.set_cancel(flag.clone());
        }
        let mut mesh_run = Self {
            supervisor,
            mesh,
            mesh_path: mesh_path.to_path_buf(),
            options,
            control_plane: String::new(),
            control_plane_admin: String::new(),
            workloads: BTreeMap::new(),
            app_ports: BTreeMap::new(),
            workflow_api: None,
            coordinator: None,
            _lock: lock,
        };
        if let Some(w) = mesh_run
            .mesh
            .spec
            .workloads
            .iter()
            .find(|w| w.app.builtin.is_some())
        {
            mesh_run.coordinator = Some((w.key(), w.app.port.unwrap_or(0)));
        }
        mesh_run.start_control_plane()?;

        let mut apps = Vec::new();
        for w in mesh_run.mesh.spec.workloads.clone() {
            let port = match (w.app.builtin, w.app.port, &mesh_run.coordinator) {
                (Some(_), _, Some((_, api))) => *api,
                (_, Some(port), _) => port,
                _ => free_port()?,
            };
            if let Some((program, args)) = w.app.command.split_first() {
                if w.app.port.is_some() {
                    // A fixed port someone else holds would look like a listening app.
                    std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
                        UpError::Io(std::io::Error::other(format!(
                            "app port 127.0.0.1:{port} of {} (spec app.port) is not free: {e}",
                            w.key()
                        )))
                    })?;
                }
                let args: Vec<String> = args
                    .iter()
                    .map(|a| a.replace("{port}", &port.to_string()))
                    .collect();
                let spec = ChildSpec::new(
                    format!("app-{}-{}", w.namespace, w.name),
                    find_program(program),
                )
                .args(args)
                .env("PORT", port.to_string());
                mesh_run.supervisor.spawn(spec)?;
            }
            mesh_run.app_ports.insert(w.key(), port);
            apps.push((w, port));
        }
        for (w, port) in &apps {
            if !w.app.command.is_empty() {
                let name = format!("app-{}-{}", w.namespace, w.name);
                let addr = format!("127.0.0.1:{port}");
                let progress = mesh_run.options.progress;
                mesh_run.supervisor.wait_listening(
                    &name,
                    &addr,
                    mesh_run.options.ready_timeout,
                    |log| {
                        if progress {
                            eprintln!(
                                "waiting for the app of {} to listen on {addr} (its log: {log})…",
                                w.key()
                            );
                        }
                    },
                )?;
            }
        }
        let mut started = Vec::new();
        for (w, port) in &apps {
            if mesh_run.options.skip_sidecars.contains(&w.key()) {
                continue;
            }
            // Every sidecar binds its own ports (port 0, read back from its ready file); the
            // control plane finds the coordinator's outbound in that sidecar's ready file.
            mesh_run.spawn_sidecar(&w.key(), *port, &[])?;
            started.push((w.key(), *port));
        }
        for (key, port) in started {
            mesh_run.wait_sidecar(&key, port)?;
        }
        // An app that listened and then died (or a process that died meanwhile) must not be
        // reported as a running mesh.
        mesh_run.check_running()?;
        Ok(mesh_run)
    }

    /// Fails if any process of the mesh has exited (reaping it), naming it, its exit status
    /// and its log.
    ///
    /// # Errors
    /// [`UpError::Supervisor`] with [`SupervisorError::ExitedEarly`].
    pub fn check_running(&mut self) -> Result<(), UpError> {
        match self.supervisor.first_exited() {
            None => Ok(()),
            Some(exited) => Err(UpError::Supervisor(SupervisorError::ExitedEarly {
                name: exited.name,
                status: exited.status.to_string(),
                log: exited.log.display().to_string(),
            })),
        }
    }

    fn sidecar_name(key: &str) -> String {
        format!("proxy-{}", key.replace('/', "-"))
    }

    /// Starts workload `key`'s sidecar (app on 127.0.0.1:`app_port`) with `extra_args`; see
    /// [`LocalMesh::wait_sidecar`].
    ///
    /// # Errors
    /// When the workload is unknown or the process cannot start.
    pub fn spawn_sidecar(
        &mut self,
        key: &str,
        app_port: u16,
        extra_args: &[String],
    ) -> Result<(), UpError> {
        let w = self
            .mesh
            .workload(key)
            .cloned()
            .ok_or_else(|| UpError::Config(format!("no workload {key}")))?;
        let name = Self::sidecar_name(key);
        let ready_file = self
            .options
            .state_dir
            .join("ready")
            .join(format!("{name}.json"));
        let _ = std::fs::remove_file(&ready_file);
        let bootstrap = self
            .options
            .state_dir
            .join("bootstrap")
            .join(format!("{}_{}.json", w.namespace, w.name));
        let mut spec = ChildSpec::new(&name, find_program("meshflow-proxy"))
            .args([
                "--bootstrap".to_string(),
                bootstrap.display().to_string(),
                "--app-port".into(),
                app_port.to_string(),
                "--app-protocol".into(),
                protocol_flag(w.app.protocol).into(),
                "--drain".into(),
                format!("{}ms", self.options.drain.as_millis()),
                "--ready-file".into(),
                ready_file.display().to_string(),
            ])
            .args(extra_args.iter().cloned());
        for (k, v) in &self.options.env {
            spec = spec.env(k, v);
        }
        self.supervisor.spawn(spec)?;
        Ok(())
    }

    /// Waits for workload `key`'s sidecar to be ready and records its addresses.
    ///
    /// # Errors
    /// When it exits or is not ready in time.
    pub fn wait_sidecar(&mut self, key: &str, app_port: u16) -> Result<WorkloadAddresses, UpError> {
        let name = Self::sidecar_name(key);
        let ready_file = self
            .options
            .state_dir
            .join("ready")
            .join(format!("{name}.json"));
        let ready = self
            .supervisor
            .wait_ready(&name, &ready_file, self.options.ready_timeout)?;
        let addr = |n: &str| ready.address(n).unwrap_or_default().to_string();
        let spiffe_id = self
            .mesh
            .workload(key)
            .and_then(|w| w.spiffe_id(&self.mesh.spec.trust_domain).ok())
            .map(|i| i.uri())
            .unwrap_or_default();
        let addresses = WorkloadAddresses {
            key: key.to_string(),
            spiffe_id,
            app: format!("127.0.0.1:{app_port}"),
            inbound: addr("inbound"),
            outbound: addr("outbound"),
            admin: addr("admin"),
        };
        self.workloads.insert(key.to_string(), addresses.clone());
        Ok(addresses)
    }

    /// The supervisor name of workload `key`'s sidecar.
    pub fn sidecar_process(key: &str) -> String {
        Self::sidecar_name(key)
    }

    /// Starts (or restarts) the control plane on the mesh's state directory and waits for it.
    ///
    /// # Errors
    /// When it fails to start or become ready.
    pub fn start_control_plane(&mut self) -> Result<ReadyFile, UpError> {
        let ready_file = self
            .options
            .state_dir
            .join("ready")
            .join("control-plane.json");
        let _ = std::fs::remove_file(&ready_file);
        let mut args = vec![
            "--mesh".to_string(),
            self.mesh_path.display().to_string(),
            "--state-dir".into(),
            self.options.state_dir.display().to_string(),
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        if let Some(ttl) = self.options.leaf_ttl {
            args.push("--leaf-ttl".into());
            args.push(format!("{}ms", ttl.as_millis()));
        }
        if let Some((key, api)) = &self.coordinator {
            let sidecar_ready = self
                .options
                .state_dir
                .join("ready")
                .join(format!("{}.json", Self::sidecar_name(key)));
            args.extend([
                "--workflow-api".to_string(),
                format!("127.0.0.1:{api}"),
                "--workflow-outbound-ready-file".into(),
                sidecar_ready.display().to_string(),
            ]);
        }
        args.extend(self.options.control_plane_args.iter().cloned());
        let mut spec =
            ChildSpec::new("control-plane", find_program("meshflow-control-plane")).args(args);
        for (k, v) in &self.options.env {
            spec = spec.env(k, v);
        }
        self.supervisor.spawn(spec)?;
        let ready =
            self.supervisor
                .wait_ready("control-plane", &ready_file, self.options.ready_timeout)?;
        self.control_plane = ready.address("grpc").unwrap_or_default().to_string();
        self.control_plane_admin = ready.address("admin").unwrap_or_default().to_string();
        self.workflow_api = ready.address("workflow-api").map(str::to_string);
        if let Some((_, api @ 0)) = &mut self.coordinator {
            *api = self
                .workflow_api
                .as_deref()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    UpError::Io(std::io::Error::other(
                        "the control plane's ready file names no workflow-api address",
                    ))
                })?;
        }
        Ok(ready)
    }

    /// The workload `key` (`ns/name`, or just `name` in namespace `default`).
    pub fn workload(&self, key: &str) -> &WorkloadAddresses {
        let key = if key.contains('/') {
            key.to_string()
        } else {
            format!("default/{key}")
        };
        self.workloads
            .get(&key)
            .unwrap_or_else(|| panic!("no workload {key}"))
    }

    /// A human table of workloads and their addresses.
    pub fn describe(&self) -> String {
        let width = self
            .workloads
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(22);
        let mut out = format!(
            "control plane  grpc {}  admin http://{}\n{:<width$} {:<22} {:<22} {:<28} {}\n",
            self.control_plane,
            self.control_plane_admin,
            "WORKLOAD",
            "OUTBOUND",
            "INBOUND (mTLS)",
            "ADMIN",
            "IDENTITY"
        );
        for w in self.workloads.values() {
            out.push_str(&format!(
                "{:<width$} {:<22} {:<22} {:<28} {}\n",
                w.key,
                w.outbound,
                w.inbound,
                format!("http://{}", w.admin),
                w.spiffe_id
            ));
        }
        if let Some(api) = &self.workflow_api {
            out.push_str(&format!(
                "workflow API   http://{api}  (token: {})\n",
                self.workflow_token_path().display()
            ));
        }
        out
    }

    /// The workflow API token file.
    pub fn workflow_token_path(&self) -> PathBuf {
        self.options.state_dir.join("workflow-api-token")
    }
}
