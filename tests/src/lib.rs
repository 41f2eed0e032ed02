//! Shared harness for the end-to-end suites in `tests/tests/`: it starts real daemons
//! (libvirt 9.0's C binaries or ours) in private mount namespaces, talks raw libvirt RPC
//! to them, loads the captured 9.0 wire transcripts and compares replies byte for byte.
//!
//! # Building before testing
//!
//! These tests run the daemon *binaries*, which `cargo test` does not build for another
//! package. The test command in the README is therefore
//!
//! ```text
//! cargo build --workspace && cargo test --workspace
//! ```
//!
//! Our binaries are looked up in `$VH_BIN_DIR` if set, else in the cargo target profile
//! directory the test executable itself lives in (`target/debug/deps/x` → `target/debug`).
//! The C peers are `/usr/sbin/virtlogd` and `/usr/sbin/virtlockd` (override with
//! `$VH_C_VIRTLOGD` / `$VH_C_VIRTLOCKD`). A missing binary is a loud test failure, never a
//! skip. The fixtures are the repository's own copy in `fixtures/` (see its README).
//!
//! # Daemons in mount namespaces
//!
//! Every [`Daemon`] runs as root in **system mode**, in its own mount namespace:
//!
//! ```text
//! unshare -m --propagation private sh -c 'mount -t tmpfs tmpfs /run && … && exec BIN -f CONF'
//! ```
//!
//! `/run` and the directories the scenario writes (see [`Service::default_tmpfs`]) are
//! fresh tmpfs mounts, so daemons never clash with each other or with the host's, and
//! several tests may run in parallel threads. The shell `exec`s, so the child's pid *is*
//! the daemon's pid. The test reaches the daemon's world through `/proc/<pid>/root`:
//! sockets via [`Daemon::sock`] / [`Daemon::admin_sock`], files via [`Daemon::host_path`].
//! Anything outside the tmpfs mounts (e.g. a tempdir under `/tmp`) is shared with the host
//! and with every other daemon: that is how `two_hosts.rs` shares a lockspace directory.
//!
//! [`Daemon::spawn`] waits (bounded) until both sockets accept connections and fails the
//! test with the daemon's stderr if it dies first. Dropping a [`Daemon`] SIGKILLs and reaps
//! it (the namespace and its tmpfs mounts vanish with it), so no process outlives a test,
//! even a panicking one. SIGKILL rather than SIGTERM on purpose: an orderly virtlockd stop
//! would SIGTERM the owner pids it knows, and a test must never make a daemon signal
//! processes it did not mean to.
//!
//! # Talking to daemons
//!
//! [`Conn`] is a raw blocking connection: send any bytes, receive whole frames with their
//! passed fds ([`Frame`]), and classify what the daemon did with a message
//! ([`Conn::outcome_after`], which uses a keepalive PING as an ordering barrier instead
//! of a timeout). Frame builders: [`call_frame`], [`frame`], [`ping_frame`].
//!
//! # Comparing replies
//!
//! [`assert_frames_eq`] compares two frames byte for byte and on mismatch prints both
//! decoded (header, error struct) plus a hex dump. Masking is explicit and narrow:
//! [`mask_log_position`] zeroes only the inode (and optionally the offset) of the two
//! virtlogd replies that carry a `LogFilePosition`; [`InodeMap`] remembers which real inode
//! stands for which transcript inode so later calls can be rewritten.
//!
//! # Transcripts
//!
//! [`Transcript::load`] parses `virtlogd-9.0-transcripts.json` /
//! `virtlockd-9.0-transcripts.json` into [`TranscriptConn`]s, whose [`TranscriptConn::messages`]
//! reassembles the recorded events into whole frames (length word + body) per direction,
//! with the fds announced by the 1-byte SCM_RIGHTS carriers attached to the frame before them.
//!
//! # Lock owners
//!
//! virtlockd releases an owner's leases when the connection whose peer pid equals the
//! registered owner pid closes (and then kills that pid). [`OwnerChild`] gives a test a
//! real, disposable owner: a `sleep` child whose *pre-exec* hook connects a socket the test
//! keeps, so SO_PEERCRED names the child while the test drives the connection.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use vh_common::error::RpcError;
pub use vh_common::protocol::{msg_type, status, Header};
use vh_common::xdr::Decoder;

/// Longest any single bounded wait in the harness may take before the test fails.
pub const WAIT_LIMIT: Duration = Duration::from_secs(20);
/// Read timeout of [`Conn`]: a safety net so a hung daemon fails the test instead of
/// hanging it. Never used to decide an outcome that the tests assert on, except as the
/// explicit [`Outcome::Silent`] class.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------
// Binaries
// ------------------------------------------------------------------------------------

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

/// The binary of `service` for `kind`. Panics (fails the test) when it is missing.
pub fn binary(kind: DaemonKind, service: Service) -> PathBuf {
    let p = match kind {
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
    };
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
        let mut script = String::from("set -e; mount -t tmpfs tmpfs /run");
        for (i, d) in opts.tmpfs.iter().enumerate() {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            // Mount points are passed as positional parameters: no quoting issues.
            script.push_str(&format!("; mount -t tmpfs tmpfs \"${}\"", i + 3));
        }
        if service == Service::Virtlogd {
            script.push_str("; mkdir -p /var/log/libvirt/qemu");
        }
        script.push_str("; exec \"$1\" -f \"$2\"");
        for (i, _) in opts.args.iter().enumerate() {
            script.push_str(&format!(" \"${}\"", i + 3 + opts.tmpfs.len()));
        }
        // $0 is a name; $1 the binary, $2 the config, then mount points, then args.
        let stderr = fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let stdout = fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "vh-daemon",
        ])
        .arg(&bin)
        .arg(&conf)
        .args(&opts.tmpfs)
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
            .unwrap_or_else(|e| panic!("cannot run unshare for {}: {e}", bin.display()));
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
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

// ------------------------------------------------------------------------------------
// Frames and connections
// ------------------------------------------------------------------------------------

/// Builds a frame: length word, header, nfds (when `Some`), payload.
pub fn frame(h: &Header, nfds: Option<u32>, payload: &[u8]) -> Vec<u8> {
    vh_common::protocol::encode_frame(h, nfds, payload)
}

/// A CALL frame (status OK).
pub fn call_frame(prog: u32, vers: u32, proc_: i32, serial: u32, payload: &[u8]) -> Vec<u8> {
    frame(
        &Header {
            prog,
            vers,
            proc_,
            type_: msg_type::CALL,
            serial,
            status: status::OK,
        },
        None,
        payload,
    )
}

/// A keepalive PING (28 bytes).
pub fn ping_frame() -> Vec<u8> {
    frame(
        &Header {
            prog: vh_common::protocol::KEEPALIVE_PROGRAM,
            vers: 1,
            proc_: vh_common::protocol::KEEPALIVE_PING,
            type_: msg_type::MESSAGE,
            serial: 0,
            status: status::OK,
        },
        None,
        &[],
    )
}

/// Whether `bytes` is a keepalive PONG frame.
pub fn is_pong(bytes: &[u8]) -> bool {
    bytes == vh_common::protocol::pong_frame().as_slice()
}

/// One received frame: all its bytes (length word included) and the fds that followed.
#[derive(Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    pub header: Header,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// The payload after header (and nfds).
    pub fn payload(&self) -> &[u8] {
        let off = 28 + if self.header.has_fds() { 4 } else { 0 };
        &self.bytes[off.min(self.bytes.len())..]
    }

    /// The error struct of an error reply.
    pub fn error(&self) -> Option<RpcError> {
        (self.header.status == status::ERROR)
            .then(|| RpcError::decode(&mut Decoder::new(self.payload())).ok())
            .flatten()
    }
}

/// How a receive ended when no frame came.
#[derive(Debug)]
pub enum RecvEnd {
    /// EOF, ECONNRESET or EPIPE: the daemon closed the connection.
    Closed(String),
    /// Nothing within [`READ_TIMEOUT`].
    Timeout,
    /// Anything else (a malformed frame from the daemon is reported here too).
    Other(String),
}

/// What a daemon did with one message, observed with a PING barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// These frames (bytes), then the PONG of the barrier.
    Replied(Vec<Vec<u8>>),
    /// The connection was closed; frames received before that are listed.
    Closed(Vec<Vec<u8>>),
    /// Neither an answer nor a close within [`READ_TIMEOUT`] (the daemon is still
    /// waiting for more bytes of the message).
    Silent(Vec<Vec<u8>>),
}

/// A raw blocking client connection.
pub struct Conn {
    pub stream: UnixStream,
}

impl Conn {
    pub fn connect(path: &Path) -> Conn {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: UnixStream) -> Conn {
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        Conn { stream }
    }

    /// Sends raw bytes. Errors (the daemon may already have closed) are returned.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Receives one whole frame and the fds its header announces.
    pub fn recv(&mut self) -> Result<Frame, RecvEnd> {
        let mut lw = [0u8; 4];
        read_exact_classified(&mut self.stream, &mut lw)?;
        let len = u32::from_be_bytes(lw) as usize;
        if !(28..=vh_common::protocol::MESSAGE_MAX + 4).contains(&len) {
            return Err(RecvEnd::Other(format!("daemon sent length word {len}")));
        }
        let mut bytes = vec![0u8; len];
        bytes[..4].copy_from_slice(&lw);
        read_exact_classified(&mut self.stream, &mut bytes[4..])?;
        let raw = vh_common::protocol::parse_body(&bytes[4..])
            .map_err(|e| RecvEnd::Other(e.to_string()))?;
        let mut fds = Vec::new();
        for _ in 0..raw.nfds {
            match vh_common::fdpass::recv_fd(self.stream.as_fd()) {
                Ok(fd) => fds.push(fd),
                Err(e) => return Err(RecvEnd::Other(format!("receiving fd: {e}"))),
            }
        }
        Ok(Frame {
            bytes,
            header: raw.header,
            fds,
        })
    }

    /// Receives one frame, failing the test if none comes.
    pub fn recv_ok(&mut self, ctx: &str) -> Frame {
        match self.recv() {
            Ok(f) => f,
            Err(e) => panic!("{ctx}: expected a frame, got {e:?}"),
        }
    }

    /// Sends a frame and receives the answer, failing the test on transport errors.
    pub fn roundtrip(&mut self, bytes: &[u8], ctx: &str) -> Frame {
        self.send(bytes)
            .unwrap_or_else(|e| panic!("{ctx}: send failed: {e}"));
        self.recv_ok(ctx)
    }

    /// Sends `bytes` then a PING, and reads until the PONG, a close or the read timeout.
    /// Because the daemon handles one message at a time in order, everything before the
    /// PONG is the answer to `bytes`; a PONG alone means "no answer". Fds that come with
    /// answers are closed.
    pub fn outcome_after(&mut self, bytes: &[u8]) -> Outcome {
        let mut got = Vec::new();
        let mut all = bytes.to_vec();
        all.extend_from_slice(&ping_frame());
        if self.send(&all).is_err() {
            // Closed before we finished sending: still read whatever came.
        }
        loop {
            match self.recv() {
                Ok(f) if is_pong(&f.bytes) => return Outcome::Replied(got),
                Ok(f) => got.push(f.bytes),
                Err(RecvEnd::Closed(_)) => return Outcome::Closed(got),
                Err(RecvEnd::Timeout) => return Outcome::Silent(got),
                Err(RecvEnd::Other(e)) => panic!("unexpected receive failure: {e}"),
            }
        }
    }

    /// Whether the daemon still answers a PING on this connection.
    pub fn alive(&mut self) -> bool {
        matches!(self.outcome_after(&[]), Outcome::Replied(v) if v.is_empty())
    }
}

fn read_exact_classified(s: &mut UnixStream, buf: &mut [u8]) -> Result<(), RecvEnd> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(RecvEnd::Closed("EOF".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RecvEnd::Timeout)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Err(RecvEnd::Closed(e.to_string()))
            }
            Err(e) => return Err(RecvEnd::Other(e.to_string())),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------
// Comparing and masking
// ------------------------------------------------------------------------------------

/// A readable description of a frame: header, decoded error if any, and hex.
pub fn describe(bytes: &[u8]) -> String {
    let mut s = String::new();
    if bytes.len() >= 28 {
        if let Ok(raw) = vh_common::protocol::parse_body(&bytes[4..]) {
            let h = raw.header;
            s.push_str(&format!(
                "len={} prog={:#x} vers={} proc={} type={} serial={} status={}",
                bytes.len(),
                h.prog,
                h.vers,
                h.proc_,
                h.type_,
                h.serial,
                h.status
            ));
            if h.status == status::ERROR {
                match RpcError::decode(&mut Decoder::new(&bytes[4 + raw.payload_offset..])) {
                    Ok(e) => s.push_str(&format!("\n  error: {e:?}")),
                    Err(e) => s.push_str(&format!("\n  undecodable error payload: {e}")),
                }
            }
        }
    }
    s.push_str(&format!("\n  hex: {}", hex::encode(bytes)));
    s
}

/// Asserts two frames are identical, with a readable report if not.
#[track_caller]
pub fn assert_frames_eq(expected: &[u8], actual: &[u8], ctx: &str) {
    if expected != actual {
        let first = expected
            .iter()
            .zip(actual)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len().min(actual.len()));
        panic!(
            "{ctx}: frames differ (first difference at byte {first})\nexpected: {}\nactual:   {}",
            describe(expected),
            describe(actual)
        );
    }
}

/// Byte range of the `LogFilePosition` in a successful virtlogd reply: OpenLogFile
/// (REPLY_WITH_FDS, after nfds) or GetLogFilePosition (REPLY). `None` for anything else.
pub fn log_position_range(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let raw = vh_common::protocol::parse_body(bytes.get(4..)?).ok()?;
    let h = raw.header;
    if h.prog != virtlogd::protocol::PROGRAM || h.status != status::OK {
        return None;
    }
    let start = 4 + raw.payload_offset;
    let ok = match h.proc_ {
        virtlogd::protocol::proc_::DOMAIN_OPEN_LOG_FILE => h.type_ == msg_type::REPLY_WITH_FDS,
        virtlogd::protocol::proc_::DOMAIN_GET_LOG_FILE_POSITION => h.type_ == msg_type::REPLY,
        _ => false,
    };
    (ok && bytes.len() >= start + 16).then_some(start..start + 16)
}

/// The (inode, offset) of a virtlogd position reply.
pub fn log_position(bytes: &[u8]) -> Option<(u64, u64)> {
    let r = log_position_range(bytes)?;
    let b = &bytes[r];
    Some((
        u64::from_be_bytes(b[..8].try_into().ok()?),
        u64::from_be_bytes(b[8..].try_into().ok()?),
    ))
}

/// Zeroes the inode (and, with `offset`, the offset) of a virtlogd position reply; other
/// frames are returned unchanged. Inodes differ by nature between file systems and runs.
pub fn mask_log_position(bytes: &[u8], offset: bool) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if let Some(r) = log_position_range(bytes) {
        v[r.start..r.start + 8].fill(0);
        if offset {
            v[r.start + 8..r.end].fill(0);
        }
    }
    v
}

/// Transcript inode → the inode our run got for the same file, learned from replies.
#[derive(Debug, Default)]
pub struct InodeMap(pub std::collections::HashMap<u64, u64>);

impl InodeMap {
    /// Learns from a pair of (expected, actual) position replies.
    pub fn learn(&mut self, expected: &[u8], actual: &[u8]) {
        if let (Some((e, _)), Some((a, _))) = (log_position(expected), log_position(actual)) {
            self.0.insert(e, a);
        }
    }

    pub fn map(&self, inode: u64) -> u64 {
        self.0.get(&inode).copied().unwrap_or(inode)
    }
}

// ------------------------------------------------------------------------------------
// Transcripts
// ------------------------------------------------------------------------------------

/// Where the captured libvirt fixtures are: the repository's `fixtures/`, so the tests
/// read nothing outside the checkout.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Direction of a recorded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ClientToDaemon,
    DaemonToClient,
}

/// One recorded `read`/`write` (or 1-byte fd carrier).
#[derive(Debug, Clone)]
pub struct Event {
    pub dir: Dir,
    pub bytes: Vec<u8>,
    /// Fds carried by this (1-byte) message.
    pub scm_rights_fds: usize,
}

/// One reassembled message of a transcript.
#[derive(Debug, Clone)]
pub struct Message {
    pub dir: Dir,
    /// The whole frame, length word included.
    pub frame: Vec<u8>,
    pub header: Header,
    /// Fds that followed it on the wire.
    pub fds: usize,
}

/// One accepted connection of a transcript.
#[derive(Debug, Clone)]
pub struct TranscriptConn {
    /// Index in the file (accept order).
    pub index: usize,
    pub listen_fd: i64,
    pub events: Vec<Event>,
    pub fds_passed: usize,
    pub summary: Vec<String>,
}

/// A transcript file.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub conns: Vec<TranscriptConn>,
}

impl Transcript {
    /// Loads `name` from [`fixtures_dir`]; panics (fails the test) if it is missing.
    pub fn load(name: &str) -> Transcript {
        let path = fixtures_dir().join(name);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("required fixture {} missing: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
        let arr = v.as_array().expect("transcript is an array");
        let conns = arr
            .iter()
            .enumerate()
            .map(|(index, c)| TranscriptConn {
                index,
                listen_fd: c["listen_fd"].as_i64().expect("listen_fd"),
                fds_passed: c["fds_passed"].as_u64().unwrap_or(0) as usize,
                summary: c["summary"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                events: c["events"]
                    .as_array()
                    .expect("events")
                    .iter()
                    .map(|e| Event {
                        dir: match e["dir"].as_str() {
                            Some("client->daemon") => Dir::ClientToDaemon,
                            Some("daemon->client") => Dir::DaemonToClient,
                            other => panic!("bad dir {other:?}"),
                        },
                        bytes: hex::decode(e["hex"].as_str().expect("hex")).expect("hex"),
                        scm_rights_fds: e["scm_rights_fds"].as_u64().unwrap_or(0) as usize,
                    })
                    .collect(),
            })
            .collect();
        Transcript { conns }
    }

    /// Connections accepted on the main socket (the lower listen fd).
    pub fn main_conns(&self) -> Vec<&TranscriptConn> {
        let lo = self.conns.iter().map(|c| c.listen_fd).min().unwrap_or(0);
        self.conns.iter().filter(|c| c.listen_fd == lo).collect()
    }

    /// Connections accepted on the admin socket (the higher listen fd).
    pub fn admin_conns(&self) -> Vec<&TranscriptConn> {
        let lo = self.conns.iter().map(|c| c.listen_fd).min().unwrap_or(0);
        self.conns.iter().filter(|c| c.listen_fd != lo).collect()
    }
}

impl TranscriptConn {
    /// Reassembles the events into whole frames, in recorded order. The 1-byte fd
    /// carriers are counted into the `fds` of the frame before them.
    pub fn messages(&self) -> Vec<Message> {
        let mut out: Vec<Message> = Vec::new();
        let mut pending: [(Vec<u8>, Dir); 2] = [
            (Vec::new(), Dir::ClientToDaemon),
            (Vec::new(), Dir::DaemonToClient),
        ];
        for e in &self.events {
            let slot = match e.dir {
                Dir::ClientToDaemon => 0,
                Dir::DaemonToClient => 1,
            };
            if e.scm_rights_fds > 0 {
                let last = out
                    .iter_mut()
                    .rev()
                    .find(|m| m.dir == e.dir)
                    .expect("fd carrier without a frame");
                last.fds += e.scm_rights_fds;
                continue;
            }
            let buf = &mut pending[slot].0;
            buf.extend_from_slice(&e.bytes);
            while buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                let raw = vh_common::protocol::parse_body(&frame[4..]).expect("transcript header");
                out.push(Message {
                    dir: e.dir,
                    frame,
                    header: raw.header,
                    fds: 0,
                });
            }
        }
        for (buf, dir) in &pending {
            assert!(
                buf.is_empty(),
                "conn {}: trailing {dir:?} bytes",
                self.index
            );
        }
        out
    }

    /// The client's frames, in order.
    pub fn calls(&self) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.dir == Dir::ClientToDaemon)
            .collect()
    }

    /// The daemon's frames, in order.
    pub fn replies(&self) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.dir == Dir::DaemonToClient)
            .collect()
    }
}

// ------------------------------------------------------------------------------------
// Lock owners
// ------------------------------------------------------------------------------------

/// A disposable child process that made a connection the test drives, so the daemon's
/// SO_PEERCRED pid is the child's. Register with [`OwnerChild::pid`] as owner pid to make
/// this connection the owner's own (QEMU's inherited) connection.
///
/// The child is `sleep 30` (or `sleep SECS`); a `pre_exec` hook connects a socket created by the test
/// (connect(2) in the child, file description shared with the test), and the socket is
/// close-on-exec, so after exec only the test holds it. [`OwnerChild::exit`] kills and
/// reaps the child and then closes the connection, in the order QEMU's death produces:
/// the daemon's kill of the owner pid then finds nothing (ESRCH). Dropping it does the same.
pub struct OwnerChild {
    child: Option<Child>,
    pub conn: Option<Conn>,
}

impl OwnerChild {
    /// Spawns the child and connects to `sock` from it.
    pub fn connect(sock: &Path) -> OwnerChild {
        Self::connect_living(sock, 30)
    }

    /// [`OwnerChild::connect`] with a child that lives `secs` seconds.
    pub fn connect_living(sock: &Path, secs: u32) -> OwnerChild {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = UnixAddr::new(sock).expect("socket path too long");
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg(secs.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the hook only calls connect(2), which is async-signal-safe, on an fd
        // and an address prepared before the fork.
        unsafe {
            cmd.pre_exec(move || nix::sys::socket::connect(raw, &addr).map_err(io::Error::from));
        }
        let child = cmd.spawn().expect("spawn owner child (sleep)");
        let stream = UnixStream::from(fd);
        OwnerChild {
            child: Some(child),
            conn: Some(Conn::from_stream(stream)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("owner connection already closed")
    }

    /// The owner dies: kill and reap the child, then close the connection.
    pub fn exit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.conn.take();
    }
}

impl Drop for OwnerChild {
    fn drop(&mut self) {
        self.exit();
    }
}

// ------------------------------------------------------------------------------------
// Argument builders
// ------------------------------------------------------------------------------------

/// Encoders for the log and lock programs' arguments (thin wrappers over the library
/// types, so tests read like the calls they make).
pub mod args {
    use vh_common::xdr::Encoder;
    use virtlockd::protocol as lk;
    use virtlogd::protocol as lg;

    pub fn log_open(driver: &str, uuid: [u8; 16], name: &str, path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::OpenLogFileArgs {
            driver: driver.into(),
            dom: lg::Domain {
                uuid,
                name: name.into(),
            },
            path: path.as_bytes().to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_position(path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::GetLogFilePositionArgs {
            path: path.as_bytes().to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_read(path: &str, inode: u64, offset: u64, maxlen: u64, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::ReadLogFileArgs {
            path: path.as_bytes().to_vec(),
            pos: lg::LogFilePosition { inode, offset },
            maxlen,
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_append(path: &str, message: &[u8], flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::AppendLogFileArgs {
            driver: "qemu".into(),
            dom: lg::Domain {
                uuid: [7; 16],
                name: "vm".into(),
            },
            path: path.as_bytes().to_vec(),
            message: message.to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn lock_register(uuid: [u8; 16], name: &str, id: u32, pid: u32, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lk::RegisterArgs {
            owner: lk::Owner {
                uuid,
                name: name.into(),
                id,
                pid,
            },
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn lock_flags(flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(flags);
        e.into_inner()
    }

    pub fn lock_new(path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path).u32(flags);
        e.into_inner()
    }

    /// CREATE/DELETE/ACQUIRE/RELEASE_RESOURCE.
    pub fn lock_resource(path: &str, name: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path).string(name).u32(flags);
        e.into_inner()
    }

    pub fn lock_create_lockspace(path: &str) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path);
        e.into_inner()
    }
}

/// Rewrites the owner pid of a lock REGISTER call frame (decoded and re-encoded with the
/// library type, so the pid is found by structure, not by a guessed offset).
pub fn with_register_pid(call: &[u8], pid: u32) -> Vec<u8> {
    use virtlockd::protocol::RegisterArgs;
    let raw = vh_common::protocol::parse_body(&call[4..]).expect("header");
    assert_eq!(raw.header.proc_, virtlockd::protocol::proc_::REGISTER);
    let payload = &call[4 + raw.payload_offset..];
    let mut a = RegisterArgs::decode(&mut Decoder::new(payload)).expect("REGISTER args");
    let mut e = vh_common::xdr::Encoder::new();
    a.encode(&mut e);
    assert_eq!(
        e.as_bytes(),
        payload,
        "REGISTER re-encodes to the same bytes"
    );
    a.owner.pid = pid;
    let mut e = vh_common::xdr::Encoder::new();
    a.encode(&mut e);
    frame(&raw.header, None, e.as_bytes())
}

/// The owner pid in a lock REGISTER call frame.
pub fn register_pid(call: &[u8]) -> u32 {
    use virtlockd::protocol::RegisterArgs;
    let raw = vh_common::protocol::parse_body(&call[4..]).expect("header");
    RegisterArgs::decode(&mut Decoder::new(&call[4 + raw.payload_offset..]))
        .expect("REGISTER args")
        .owner
        .pid
}
