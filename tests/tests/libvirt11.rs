//! What libvirt 11.3 (Debian 13) added or changed that our daemons follow (issue 14),
//! through the real binaries in private mount namespaces:
//!
//! * admin procedure 20, CONNECT_DAEMON_SHUTDOWN: unknown flag bits are refused by name
//!   and the daemon stays up; 0 and PRESERVE quit without a reply (11.3 closes every
//!   client, dropping the queued reply, in the loop iteration that dispatched it), with
//!   `READY=1`, `STOPPING=1`, `EXTEND_TIMEOUT_USEC=30000000` on `$NOTIFY_SOCKET`;
//! * virtlockd quitting with a live lease owner kills the owner before it lets the
//!   lease go;
//! * the version we report (11.3.0), through the admin socket, `--version` and
//!   Debian 12's virt-admin;
//! * 11.3's config texts for negative and overflowing numbers.
//!
//! The comparison with C 11.3 itself (virt-admin 11.3's output, the cleaner on one tree)
//! runs in the Debian 13 chroot harness. Needs root; fails loudly without it.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vh_common::error::{code, domain};
use vh_common::xdr::Decoder;
use vh_tests::{
    args, bin_dir, call_frame, wait_until, Conn, Daemon, DaemonKind, RecvEnd, Service,
    SpawnOptions, WAIT_LIMIT,
};
use virtlockd::protocol as lk;

const ADMIN: u32 = 0x0690_0690;
const CONNECT_OPEN: i32 = 1;
const GET_LIB_VERSION: i32 = 3;
const DAEMON_SHUTDOWN: i32 = 20;
const VIRT_ADMIN: &str = "/usr/bin/virt-admin";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (private mount namespaces, system-mode daemons)"
    );
}

/// A datagram socket standing in for systemd's notify socket.
struct Notify {
    _dir: tempfile::TempDir,
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Notify {
            _dir: dir,
            sock,
            path,
        }
    }

    /// Every message received until `last` arrives (bounded by [`WAIT_LIMIT`]).
    fn until(&self, last: &str) -> Vec<String> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + WAIT_LIMIT;
        let mut buf = [0u8; 4096];
        while !got.iter().any(|m| m == last) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {last:?} on the notify socket; got {got:?}"
            );
            if let Ok(n) = self.sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    }
}

fn spawn_notified(service: Service, notify: &Notify) -> Daemon {
    let mut opts = SpawnOptions::new(service, "");
    opts.env.push((
        "NOTIFY_SOCKET".into(),
        notify.path.to_string_lossy().into_owned(),
    ));
    Daemon::spawn_with(DaemonKind::Ours, service, opts)
}

fn admin_open(d: &Daemon) -> Conn {
    let mut a = d.connect_admin();
    let f = a.roundtrip(&call_frame(ADMIN, 1, CONNECT_OPEN, 1, &[0; 4]), "open");
    assert!(f.error().is_none(), "CONNECT_OPEN failed: {:?}", f.error());
    a
}

fn shutdown_call(serial: u32, flags: u32) -> Vec<u8> {
    call_frame(ADMIN, 1, DAEMON_SHUTDOWN, serial, &flags.to_be_bytes())
}

/// The connection ends without another frame.
fn assert_closed_without_reply(c: &mut Conn, what: &str) {
    match c.recv() {
        Err(RecvEnd::Closed(_)) => {}
        other => panic!("{what}: expected the connection to close unanswered, got {other:?}"),
    }
}

fn shutdown_case(service: Service, flags: u32) {
    require_root();
    let notify = Notify::new();
    let mut d = spawn_notified(service, &notify);
    assert_eq!(notify.until("READY=1"), ["READY=1"], "{}", d.label());

    let mut a = admin_open(&d);
    // Unknown bits: INVALID_ARG naming only them, and nothing else happens.
    let f = a.roundtrip(&shutdown_call(2, flags | 6), "bad flags");
    let e = f.error().expect("an error reply for unknown flags");
    assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::ADMIN));
    assert_eq!(
        e.message(),
        "unsupported flags (0x6) in function adminConnectDaemonShutdown"
    );
    assert!(d.is_running(), "{} quit on a refused call", d.label());
    assert!(a.alive(), "the admin connection survives a refused call");

    // A client of the main socket is closed by the quit too.
    let mut other = d.connect();
    assert!(other.alive());

    a.send(&shutdown_call(3, flags)).expect("send shutdown");
    assert_closed_without_reply(&mut a, "daemon-shutdown");
    wait_until("the daemon exits", || !d.is_running());
    assert_closed_without_reply(&mut other, "main-socket client");
    assert_eq!(
        notify.until("EXTEND_TIMEOUT_USEC=30000000"),
        ["STOPPING=1", "EXTEND_TIMEOUT_USEC=30000000"],
        "{}",
        d.label()
    );
}

#[test]
fn virtlogd_daemon_shutdown() {
    shutdown_case(Service::Virtlogd, 0);
}

#[test]
fn virtlockd_daemon_shutdown_preserve() {
    shutdown_case(Service::Virtlockd, 1);
}

/// The state of a child process from /proc (`Z` once it died, before it is reaped).
fn proc_state(pid: u32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether some process holds a write lock on byte 0 of `path` (F_GETLK).
fn locked(path: &Path) -> bool {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open lease file");
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_GETLK only fills in `fl`, a valid, exclusively borrowed flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// virtlockd told to quit while a lease owner lives: the owner (which ignores SIGTERM,
/// as a busy QEMU may for a while) is killed, and the lease is held for as long as the
/// owner is seen alive; once it is gone the lease is free and the daemon has exited.
#[test]
fn virtlockd_quit_kills_a_live_owner_before_releasing_its_lease() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    fs::write(&disk, b"").expect("disk");
    let notify = Notify::new();
    let mut d = spawn_notified(Service::Virtlockd, &notify);

    // The owner: a child that connected itself (SO_PEERCRED = its pid), ignores SIGTERM
    // (an ignored signal stays ignored across exec) and sleeps.
    let (mut child, conn) = vh_testkit::Sleeper {
        secs: 60,
        keep_connection: false,
        ignore_sigterm: true,
    }
    .spawn_connected(&d.sock())
    .expect("spawn owner");
    let pid = child.id();
    let mut owner = Conn::from_stream(conn);
    let reg = args::lock_register([7; 16], "g1", 1, pid, 0);
    let f = owner.roundtrip(
        &call_frame(lk::PROGRAM, 1, lk::proc_::REGISTER, 1, &reg),
        "register",
    );
    assert!(f.error().is_none(), "register: {:?}", f.error());
    let acq = args::lock_resource("", disk.to_str().expect("utf-8 path"), 0);
    let f = owner.roundtrip(
        &call_frame(lk::PROGRAM, 1, lk::proc_::ACQUIRE_RESOURCE, 2, &acq),
        "acquire",
    );
    assert!(f.error().is_none(), "acquire: {:?}", f.error());
    assert!(locked(&disk));

    let mut a = admin_open(&d);
    a.send(&shutdown_call(2, 0)).expect("send shutdown");
    assert_closed_without_reply(&mut a, "daemon-shutdown");
    // Sampled until the owner is gone: whenever it was alive both before and after a
    // probe, the lease must have been held.
    let mut seen_alive = 0;
    wait_until("the owner is killed", || {
        let before = proc_state(pid);
        let held = locked(&disk);
        let after = proc_state(pid);
        let alive = |s: Option<char>| s.is_some_and(|c| c != 'Z');
        if alive(before) && alive(after) {
            seen_alive += 1;
            assert!(
                held,
                "the lease was free while its owner (pid {pid}) still ran"
            );
        }
        !alive(after)
    });
    assert!(
        seen_alive > 0,
        "the owner was never seen alive after the shutdown call"
    );
    let status = child.wait().expect("reap owner");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "SIGTERM is ignored, so SIGKILL ends it"
    );
    wait_until("the daemon exits", || !d.is_running());
    assert!(
        !locked(&disk),
        "the lease is free once daemon and owner are gone"
    );
}

/// We report 11.3.0 everywhere (README: what a drop-in for 9.0 and 11.3 reports).
#[test]
fn version_is_11_3_0() {
    require_root();
    for service in [Service::Virtlogd, Service::Virtlockd] {
        let out = Command::new(bin_dir().join(service.name()))
            .arg("--version")
            .output()
            .expect("run --version");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "{} (libvirt) 11.3.0\n",
                bin_dir().join(service.name()).display()
            )
        );
        let d = Daemon::spawn(DaemonKind::Ours, service, "");
        let mut a = admin_open(&d);
        let f = a.roundtrip(&call_frame(ADMIN, 1, GET_LIB_VERSION, 2, &[]), "version");
        assert_eq!(
            Decoder::new(f.payload()).u64().expect("u64"),
            11_003_000,
            "{}",
            d.label()
        );
        assert!(
            Path::new(VIRT_ADMIN).is_file(),
            "{VIRT_ADMIN} is missing: install libvirt-clients"
        );
        let uri = format!(
            "{}:///system?socket={}",
            service.name(),
            d.admin_sock().display()
        );
        let out = Command::new(VIRT_ADMIN)
            .args(["-c", &uri, "version"])
            .stdin(Stdio::null())
            .output()
            .expect("run virt-admin");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Running against daemon: 11.3.0"),
            "{}: {text}",
            d.label()
        );
    }
}

/// Runs our daemon with config text `conf` in a private mount namespace (a fresh /run,
/// so a config that loads cannot touch the host's sockets); returns (exit code, stderr).
fn run_with_config(service: Service, conf: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.conf");
    fs::write(&path, conf).expect("write config");
    let out = vh_testkit::Launch::new(bin_dir().join(service.name()))
        .command()
        .arg("-f")
        .arg(&path)
        .args(["--timeout", "1"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .output()
        .expect("run the daemon");
    let err = String::from_utf8_lossy(&out.stderr).replace(path.to_str().expect("utf-8"), "F");
    (out.status.code(), err)
}

/// 11.3's texts (checked against C 11.3's virtlogd in the Debian 13 chroot).
#[test]
fn config_overflow_and_unsigned_texts() {
    require_root();
    let cases = [
        (
            Service::Virtlogd,
            "max_size = 99999999999999999999\n",
            "Can't load config file: numerical overflow: F:1: numeric overflow in conf value: F\n",
        ),
        (
            Service::Virtlogd,
            "\nmax_age_days = -1\n",
            "Can't load config file: internal error: F: expected an unsigned integer for 'max_age_days' parameter: F\n",
        ),
        (
            // The parser refuses the number whatever key it belongs to.
            Service::Virtlockd,
            "unknown = 1\nsomething_else = 9223372036854775808\n",
            "Can't load config file: numerical overflow: F:2: numeric overflow in conf value: F\n",
        ),
    ];
    for (service, conf, want) in cases {
        let (code, err) = run_with_config(service, conf);
        assert_eq!((code, err.as_str()), (Some(1), want), "{conf:?}");
    }
}
