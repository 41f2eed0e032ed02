//! Our daemons and libvirt's, started for a test or a measurement: which binary (one
//! way to find it), a private mount namespace ([`crate::namespace`]), waiting until the
//! sockets answer, and one stop policy ([`stop`]).

use crate::conn::Conn;
use crate::namespace::Launch;
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Longest any single bounded wait in the harness may take before the test fails.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// Which implementation of a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DaemonKind {
    /// libvirt 9.0.0's C daemon from Debian 12.
    C,
    /// Ours, from this workspace.
    Ours,
}

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Virtlogd,
    Virtlockd,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Virtlogd => "virtlogd",
            Service::Virtlockd => "virtlockd",
        }
    }

    /// Directories mounted as fresh tmpfs for this daemon, besides `/run`.
    pub fn default_tmpfs(self) -> Vec<PathBuf> {
        match self {
            Service::Virtlogd => vec![PathBuf::from("/var/log/libvirt")],
            Service::Virtlockd => vec![PathBuf::from("/var/lib/libvirt/lockd")],
        }
    }
}

/// The directory holding our built binaries (see the module docs).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    for dir in exe.ancestors().skip(1) {
        if dir.join("virtlogd").is_file() || dir.join("virtlockd").is_file() {
            return dir.to_path_buf();
        }
        if dir.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test executable has no target profile directory")
}

/// Where the binary of `service` for `kind` is (whether or not it is there).
pub fn locate(kind: DaemonKind, service: Service) -> PathBuf {
    match kind {
        DaemonKind::C => {
            let var = match service {
                Service::Virtlogd => "VH_C_VIRTLOGD",
                Service::Virtlockd => "VH_C_VIRTLOCKD",
            };
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new("/usr/sbin").join(service.name()))
        }
        DaemonKind::Ours => bin_dir().join(service.name()),
    }
}

/// The binary of `service` for `kind`. Panics (fails the test) when it is missing.
pub fn binary(kind: DaemonKind, service: Service) -> PathBuf {
    let p = locate(kind, service);
    assert!(
        p.is_file(),
        "required daemon binary {} is missing ({kind:?} {}); for ours run `cargo build --workspace` \
         first (or set VH_BIN_DIR), for the C peer install Debian 12's libvirt-daemon-system",
        p.display(),
        service.name()
    );
    p
}

// ------------------------------------------------------------------------------------
// Daemons
// ------------------------------------------------------------------------------------

/// How to start a daemon. [`SpawnOptions::new`] gives the defaults for a service.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Text of the config file passed with `-f`.
    pub config: String,
    /// Directories to mount a fresh tmpfs on (besides `/run`); created on the host
    /// first if missing (empty mount points are harmless).
    pub tmpfs: Vec<PathBuf>,
    /// Extra command-line arguments after `-f CONF`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl SpawnOptions {
    pub fn new(service: Service, config: &str) -> Self {
        SpawnOptions {
            config: config.to_string(),
            tmpfs: service.default_tmpfs(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running daemon in its own mount namespace. Dropping it kills and reaps it.
pub struct Daemon {
    pub kind: DaemonKind,
    pub service: Service,
    child: Option<Child>,
    pid: u32,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `kind`'s `service` with `config` (config file text) and the default tmpfs
    /// mounts, and waits until its sockets accept connections.
    pub fn spawn(kind: DaemonKind, service: Service, config: &str) -> Daemon {
        Self::spawn_with(kind, service, SpawnOptions::new(service, config))
    }

    pub fn spawn_with(kind: DaemonKind, service: Service, opts: SpawnOptions) -> Daemon {
        let bin = binary(kind, service);
        let dir = tempfile::Builder::new()
            .prefix(&format!("vh-{}-{kind:?}-", service.name()))
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join(format!("{}.conf", service.name()));
        fs::write(&conf, &opts.config).expect("write config");
        for d in &opts.tmpfs {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let mut launch = Launch::new(&bin);
        for d in &opts.tmpfs {
            launch = launch.tmpfs(d);
        }
        if service == Service::Virtlogd {
            launch = launch.mkdir("/var/log/libvirt/qemu");
        }
        let stderr = fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let stdout = fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let mut cmd = launch.command();
        cmd.arg("-f")
            .arg(&conf)
            .args(&opts.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .current_dir("/");
        for v in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "NOTIFY_SOCKET",
            "LIBVIRT_DEBUG",
            "LIBVIRT_LOG_FILTERS",
            "LIBVIRT_LOG_OUTPUTS",
            "XDG_RUNTIME_DIR",
        ] {
            cmd.env_remove(v);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        let mut d = Daemon {
            kind,
            service,
            child: Some(child),
            pid,
            dir,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{:?} {} exited during start-up ({st}); stderr:\n{}",
                    self.kind,
                    self.service.name(),
                    self.stderr()
                );
            }
            let ok = [self.sock(), self.admin_sock()]
                .iter()
                .all(|p| UnixStream::connect(p).is_ok());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} {} did not open its sockets within {WAIT_LIMIT:?}; stderr:\n{}",
                self.kind,
                self.service.name(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid (also the pid of the process that owns the namespace).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `/proc/<pid>/root`: the daemon's view of the file system.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid))
    }

    /// Where the daemon's absolute path `p` can be reached from the test.
    pub fn host_path(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        self.root().join(p.strip_prefix("/").unwrap_or(p))
    }

    /// The main socket, `/run/libvirt/<name>-sock` inside the namespace.
    pub fn sock(&self) -> PathBuf {
        self.host_path(format!("/run/libvirt/{}-sock", self.service.name()))
    }

    /// The admin socket, `/run/libvirt/<name>-admin-sock` inside the namespace.
    pub fn admin_sock(&self) -> PathBuf {
        self.host_path(format!("/run/libvirt/{}-admin-sock", self.service.name()))
    }

    /// A new raw connection to the main socket.
    pub fn connect(&self) -> Conn {
        Conn::connect(&self.sock())
    }

    /// A new raw connection to the admin socket.
    pub fn connect_admin(&self) -> Conn {
        Conn::connect(&self.admin_sock())
    }

    /// What the daemon wrote to stderr so far (diagnostics).
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// A label for assertion messages.
    pub fn label(&self) -> String {
        format!("{:?} {} (pid {})", self.kind, self.service.name(), self.pid)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }
}

/// The kit's one stop policy, for every daemon a test or the bench starts: SIGKILL and
/// reap. Never SIGTERM: an orderly virtlockd stop signals the owner pids it knows, and
/// a test must never make a daemon signal processes it did not mean to. The namespace
/// and its tmpfs mounts go with the process.
pub fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after [`WAIT_LIMIT`].
/// For state that changes asynchronously (a log pipe's EOF being noticed, a lock being
/// released on disconnect); never used to assert that something is *fast*.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
