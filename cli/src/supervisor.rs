//! Process supervisor: starts children in their own process groups, makes them die with the
//! supervisor (Linux `PR_SET_PDEATHSIG`), waits for their `--ready-file`, and stops them in
//! order (SIGTERM to the group, then SIGKILL after a grace period).
//!
//! Used by `meshflow up`, `meshflow demo` and the test harness, so all three start and stop
//! processes the same way and nobody guesses ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshflow_api::ReadyFile;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Supervisor errors.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The program could not be started.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Child name.
        name: String,
        /// Program path.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The child exited before becoming ready.
    #[error("{name} exited with {status} before it was ready; its log: {log}")]
    ExitedEarly {
        /// Child name.
        name: String,
        /// Exit status.
        status: String,
        /// Log file.
        log: String,
    },
    /// The child did not become ready in time.
    #[error("{name} was not ready within {timeout:?}; its log: {log}")]
    NotReady {
        /// Child name.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// Log file.
        log: String,
    },
    /// The child is running but nothing listens on its port.
    #[error("{name} is running but did not listen on {addr} within {timeout:?}; its log: {log}")]
    NotListening {
        /// Child name.
        name: String,
        /// The address it should listen on.
        addr: String,
        /// How long we waited.
        timeout: Duration,
        /// Log file.
        log: String,
    },
    /// The wait was cancelled (Ctrl-C / SIGTERM while starting).
    #[error("interrupted")]
    Interrupted,
}

/// A child that has exited (and was reaped).
#[derive(Debug, Clone)]
pub struct Exited {
    /// Child name.
    pub name: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its log file.
    pub log: PathBuf,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// Name in messages and log file names.
    pub name: String,
    /// Program.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

impl ChildSpec {
    /// A spec for `program` named `name`.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
}

/// A running child.
pub struct Running {
    /// Name.
    pub name: String,
    /// The process.
    pub child: Child,
    /// Where its stdout/stderr go.
    pub log: PathBuf,
}

impl Running {
    /// Process id (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Owns children; stops them all when dropped.
pub struct Supervisor {
    log_dir: PathBuf,
    children: Vec<Running>,
    grace: Duration,
    cancel: Option<Arc<AtomicBool>>,
}

mod sys {
    //! The one place with `unsafe`: arranging for a child to die with its parent.
    #![allow(unsafe_code)]

    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Child gets SIGKILL when the thread that spawned it dies (Linux `PR_SET_PDEATHSIG`).
    pub fn die_with_parent(command: &mut Command) {
        // SAFETY: the closure runs in the forked child before exec and only calls `prctl`,
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
    }
}

/// Where `program` is: next to the current executable (and its parent, for test binaries in
/// `target/<profile>/deps`), else on `PATH` as given.
pub fn find_program(program: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(program)
}

/// How to run this `meshflow` again in hints: `meshflow` when that name on `PATH` is this
/// executable (e.g. after `scripts/install`), else the executable's full path.
pub fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "meshflow".into();
    };
    let exe = exe.canonicalize().unwrap_or(exe);
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "meshflow".into());
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(&name))
            .find(|candidate| candidate.is_file())
            .and_then(|found| found.canonicalize().ok())
            .is_some_and(|found| found == exe)
    });
    if on_path {
        name
    } else {
        exe.display().to_string()
    }
}

impl Supervisor {
    /// A supervisor writing child logs to `log_dir`; `grace` is how long a child may take to
    /// exit after SIGTERM before SIGKILL.
    pub fn new(log_dir: &Path, grace: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        Ok(Self {
            log_dir: log_dir.to_path_buf(),
            children: Vec::new(),
            grace,
            cancel: None,
        })
    }

    /// Makes every wait ([`Supervisor::wait_ready`], [`Supervisor::wait_listening`]) end with
    /// [`SupervisorError::Interrupted`] once `flag` is set (e.g. by a SIGINT handler).
    pub fn set_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    /// The first child (in start order) that has exited; reaps it. It stays in the list (and
    /// is reported again by the next call) until [`Supervisor::stop`] or
    /// [`Supervisor::shutdown`].
    pub fn first_exited(&mut self) -> Option<Exited> {
        self.children
            .iter_mut()
            .find_map(|c| match c.child.try_wait() {
                Ok(Some(status)) => Some(Exited {
                    name: c.name.clone(),
                    status,
                    log: c.log.clone(),
                }),
                _ => None,
            })
    }

    /// Waits until something accepts TCP connections on `addr` (child `name`'s port), failing
    /// early if `name` exits. `on_slow` is called once if that takes longer than 3 s.
    ///
    /// # Errors
    /// [`SupervisorError::ExitedEarly`] (with exit status and log),
    /// [`SupervisorError::NotListening`], [`SupervisorError::Interrupted`].
    pub fn wait_listening(
        &mut self,
        name: &str,
        addr: &str,
        timeout: Duration,
        mut on_slow: impl FnMut(&str),
    ) -> Result<(), SupervisorError> {
        let started = Instant::now();
        let mut told = false;
        let socket: std::net::SocketAddr = addr.parse().map_err(|_| SupervisorError::Spawn {
            name: name.to_string(),
            program: String::new(),
            source: std::io::Error::other(format!("{addr:?} is not an IP address and port")),
        })?;
        loop {
            if std::net::TcpStream::connect_timeout(&socket, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let log = match self.get_mut(name) {
                Some(child) => {
                    if let Ok(Some(status)) = child.child.try_wait() {
                        return Err(SupervisorError::ExitedEarly {
                            name: name.to_string(),
                            status: status.to_string(),
                            log: child.log.display().to_string(),
                        });
                    }
                    child.log.display().to_string()
                }
                None => String::new(),
            };
            if self.cancelled() {
                return Err(SupervisorError::Interrupted);
            }
            if started.elapsed() > timeout {
                return Err(SupervisorError::NotListening {
                    name: name.to_string(),
                    addr: addr.to_string(),
                    timeout,
                    log,
                });
            }
            if !told && started.elapsed() > Duration::from_secs(3) {
                told = true;
                on_slow(&log);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `spec` in its own process group, logs to `<log_dir>/<name>.log`.
    ///
    /// # Errors
    /// [`SupervisorError::Spawn`].
    pub fn spawn(&mut self, spec: ChildSpec) -> Result<&mut Running, SupervisorError> {
        use std::os::unix::process::CommandExt;
        let log = self.log_dir.join(format!("{}.log", spec.name));
        let spawn_err = |source| SupervisorError::Spawn {
            name: spec.name.clone(),
            program: spec.program.display().to_string(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        sys::die_with_parent(&mut command);
        let child = command.spawn().map_err(spawn_err)?;
        self.children.push(Running {
            name: spec.name,
            child,
            log,
        });
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// The running child named `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Running> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// Waits until `ready_file` exists and parses, failing early if `name` exits.
    ///
    /// # Errors
    /// [`SupervisorError::ExitedEarly`] / [`SupervisorError::NotReady`] /
    /// [`SupervisorError::Interrupted`].
    pub fn wait_ready(
        &mut self,
        name: &str,
        ready_file: &Path,
        timeout: Duration,
    ) -> Result<ReadyFile, SupervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ready) = ReadyFile::read(ready_file) {
                return Ok(ready);
            }
            if let Some(child) = self.get_mut(name) {
                if let Ok(Some(status)) = child.child.try_wait() {
                    return Err(SupervisorError::ExitedEarly {
                        name: name.to_string(),
                        status: status.to_string(),
                        log: child.log.display().to_string(),
                    });
                }
            }
            if self.cancelled() {
                return Err(SupervisorError::Interrupted);
            }
            if Instant::now() > deadline {
                let log = self
                    .get_mut(name)
                    .map(|c| c.log.display().to_string())
                    .unwrap_or_default();
                return Err(SupervisorError::NotReady {
                    name: name.to_string(),
                    timeout,
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to child `name`'s process group.
    pub fn signal(&mut self, name: &str, signal: Signal) {
        if let Some(child) = self.get_mut(name) {
            let _ = killpg(Pid::from_raw(child.pid() as i32), signal);
        }
    }

    /// Stops child `name` (SIGTERM, then SIGKILL after the grace period) and forgets it.
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|c| c.name == name) {
            let mut child = self.children.remove(i);
            stop_all(std::slice::from_mut(&mut child), self.grace);
        }
    }

    /// Stops every child, newest first, and waits for them.
    pub fn shutdown(&mut self) {
        self.children.reverse();
        stop_all(&mut self.children, self.grace);
        self.children.clear();
    }

    /// Names and pids of the children.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|c| (c.name.clone(), c.pid()))
            .collect()
    }
}

fn stop_all(children: &mut [Running], grace: Duration) {
    for child in children.iter_mut() {
        if matches!(child.child.try_wait(), Ok(None)) {
            let _ = killpg(Pid::from_raw(child.pid() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for child in children.iter_mut() {
        while matches!(child.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for child in children.iter_mut() {
        // Always: the group may hold grandchildren (e.g. under a shell wrapper) that outlive
        // its leader. ESRCH (nobody left) is success.
        let _ = killpg(Pid::from_raw(child.pid() as i32), Signal::SIGKILL);
        let _ = child.child.wait();
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until a TCP connection to `addr` succeeds (the app is listening).
///
/// # Errors
/// When `timeout` passes first.
pub fn wait_for_port(addr: &str, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A free port on 127.0.0.1 for an app that cannot report its own: probed (bound, then
/// released) — see "Known gaps" in `docs/ARCHITECTURE.md`. It is drawn at random from *below*
/// the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so every process that binds
/// port 0 or opens a connection (sidecars, the control plane, clients) never gets it between
/// the probe and the app's own bind; only another prober could. Falls back to port 0.
///
/// # Errors
/// When binding fails.
pub fn free_port() -> std::io::Result<u16> {
    use rand::Rng;
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let floor = 10_000u16.min(ephemeral_low / 2);
    if floor < ephemeral_low {
        let mut rng = rand::thread_rng();
        for _ in 0..64 {
            let port = rng.gen_range(floor..ephemeral_low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
