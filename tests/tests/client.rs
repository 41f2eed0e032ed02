//! The client library and `vhctl` against our daemons and Debian 12's C daemons, each run
//! in system mode inside a private mount namespace (a tmpfs on /run), so the host's
//! daemons are untouched. Needs root and the built binaries (`cargo build --workspace`).

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};
use vh_client::{lease_name_for_path, ClientError, LockManager, LogManager, LogPosition, Owner};

// ---- helpers -------------------------------------------------------------------------

fn our_bin(name: &str) -> PathBuf {
    let p = vh_testkit::bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

fn c_bin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    assert!(
        p.exists(),
        "{} is missing: install libvirt-daemon-system (Debian 12's libvirt 9.0)",
        p.display()
    );
    p
}

/// One daemon in system mode in its own mount namespace.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Daemon {
    fn start(bin: &Path, name: &'static str, config: Option<&Path>) -> Daemon {
        let mut cmd = vh_testkit::Launch::new(bin).command();
        if let Some(c) = config {
            cmd.arg("-f").arg(c);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let d = Daemon { child, name };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "{} ({}) did not create {}",
                name,
                bin.display(),
                d.socket().display()
            );
            sleep(Duration::from_millis(20));
        }
        d
    }

    fn root_run(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/libvirt", self.child.id()))
    }

    fn socket(&self) -> PathBuf {
        self.root_run().join(format!("{}-sock", self.name))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        vh_testkit::stop(&mut self.child);
    }
}

fn conf(dir: &Path, max_size: u64, max_backups: u64) -> PathBuf {
    let p = dir.join("virtlogd.conf");
    fs::write(
        &p,
        format!("max_size = {max_size}\nmax_backups = {max_backups}\n"),
    )
    .unwrap();
    p
}

/// An error as compared across implementations: code, domain, message with the test's
/// temporary directory replaced.
fn outcome<T>(r: Result<T, ClientError>, tmp: &Path) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(ClientError::Remote(e)) => format!(
            "err {} {} {}",
            e.code,
            e.domain,
            e.message().replace(&*tmp.to_string_lossy(), "TMP")
        ),
        Err(e) => format!("client error: {e}"),
    }
}

fn vhctl(args: &[&str]) -> Output {
    Command::new(our_bin("vhctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vhctl")
}

// ---- library: log manager ------------------------------------------------------------

fn log_scenario(d: &Daemon, tmp: &Path) -> Vec<String> {
    let path = tmp.join("vm1.log");
    let uuid = [0x11; 16];
    let mut out = Vec::new();
    let mut lm =
        LogManager::from_stream(std::os::unix::net::UnixStream::connect(d.socket()).unwrap());
    let (fd, pos): (OwnedFd, LogPosition) = lm.open_log("qemu", uuid, "vm1", &path, false).unwrap();
    assert_eq!(pos.inode, fs::metadata(&path).unwrap().ino());
    out.push(format!("open offset {}", pos.offset));
    let mut w = fs::File::from(fd);
    w.write_all(b"hello\n").unwrap();
    let p1 = lm.position(&path).unwrap();
    out.push(format!(
        "position {} same inode {}",
        p1.offset,
        p1.inode == pos.inode
    ));
    out.push(format!(
        "read {:?}",
        String::from_utf8_lossy(&lm.read(&path, pos, 1000).unwrap())
    ));
    lm.append("qemu", uuid, "vm1", &path, b"appended\n")
        .unwrap();
    out.push(format!(
        "after append {}",
        lm.position(&path).unwrap().offset
    ));
    out.push(format!(
        "read all {:?}",
        String::from_utf8_lossy(&lm.read(&path, pos, 1000).unwrap())
    ));
    // A second open of the same path is refused while the first writer is alive.
    let mut lm2 = LogManager::connect(&vh_client::Target::Socket(d.socket())).unwrap();
    let busy = lm2.open_log("qemu", uuid, "vm1", &path, false);
    assert!(
        busy.as_ref().is_err_and(|e| e.is_busy()),
        "{:?}",
        busy.err()
    );
    out.push(format!("second open: {}", outcome(busy, tmp)));
    out.push(format!(
        "position of unknown: {}",
        outcome(lm2.position(tmp.join("nope.log")), tmp)
    ));
    out.push(format!(
        "read of unknown: {}",
        outcome(
            lm2.read(tmp.join("nope.log"), LogPosition::default(), 10),
            tmp
        )
    ));
    drop(w);
    out
}

#[test]
fn log_manager_same_on_both_daemons() {
    let mut results = Vec::new();
    for (bin, label) in [
        (our_bin("virtlogd"), "ours"),
        (c_bin("virtlogd"), "libvirt"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = conf(tmp.path(), 100_000, 2);
        let d = Daemon::start(&bin, "virtlogd", Some(&cfg));
        let r = log_scenario(&d, tmp.path());
        eprintln!("{label}: {r:#?}");
        results.push(r);
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0][1], "position 6 same inode true");
    assert_eq!(results[0][3], "after append 15");
}

// ---- library: lock manager -----------------------------------------------------------

/// Owner pids that are not the connecting process, so closing a connection never makes
/// the daemon kill anything (virtlockd kills the owner pid only when it is the peer).
const PID_A: u32 = 4_000_001;
const PID_B: u32 = 4_000_002;

fn owner(name: &str, pid: u32) -> Owner {
    Owner {
        uuid: [pid as u8; 16],
        name: name.into(),
        id: 1,
        pid,
    }
}

fn lock_scenario(d: &Daemon, tmp: &Path) -> Vec<String> {
    let ls = tmp.join("files");
    let ls_s = ls.to_str().unwrap();
    let disk = tmp.join("disk.img");
    fs::write(&disk, b"").unwrap();
    let disk_s = disk.to_str().unwrap();
    let lease = lease_name_for_path(disk_s);
    let target = vh_client::Target::Socket(d.socket());
    let mut out = Vec::new();
    let mut c = LockManager::connect(&target).unwrap();
    out.push(outcome(c.create_lockspace(&ls), tmp));
    out.push(outcome(c.create_lockspace(&ls), tmp));
    drop(c);
    let mut a = LockManager::connect(&target).unwrap();
    let mut b = LockManager::connect(&target).unwrap();
    out.push(outcome(a.register(&owner("vmA", PID_A)), tmp));
    out.push(outcome(b.register(&owner("vmB", PID_B)), tmp));
    // Indirect exclusive lease: the second owner is busy.
    out.push(outcome(a.acquire(ls_s, &lease, false, true), tmp));
    out.push(format!("lease file {}", ls.join(&lease).exists()));
    let busy = b.acquire(ls_s, &lease, false, true);
    assert!(
        busy.as_ref().is_err_and(|e| e.is_busy()),
        "{:?}",
        busy.err()
    );
    out.push(outcome(busy, tmp));
    // Shared leases coexist; an exclusive request on a shared one is busy.
    out.push(outcome(a.acquire(ls_s, "shr", true, true), tmp));
    out.push(outcome(b.acquire(ls_s, "shr", true, true), tmp));
    out.push(outcome(b.acquire(ls_s, "shr2", false, true), tmp));
    out.push(outcome(a.acquire(ls_s, "shr2", true, true), tmp));
    // Direct lease on the image itself.
    out.push(outcome(a.acquire("", disk_s, false, false), tmp));
    out.push(outcome(b.acquire("", disk_s, false, false), tmp));
    // Release hands the lease over.
    out.push(outcome(a.release(ls_s, &lease), tmp));
    out.push(format!("lease file {}", ls.join(&lease).exists()));
    out.push(outcome(b.acquire(ls_s, &lease, false, true), tmp));
    out.push(outcome(a.release(ls_s, &lease), tmp));
    out.push(outcome(a.release(ls_s, "never"), tmp));
    // Unregistered and restricted connections.
    let mut u = LockManager::connect(&target).unwrap();
    out.push(outcome(u.acquire(ls_s, "x", false, true), tmp));
    let mut r = LockManager::connect(&target).unwrap();
    out.push(outcome(r.register(&owner("vmR", PID_A)), tmp));
    out.push(outcome(r.restrict(), tmp));
    out.push(outcome(r.acquire(ls_s, "x", false, true), tmp));
    out.push(outcome(
        a.acquire("/nonexistent-lockspace", "x", false, true),
        tmp,
    ));
    for (conn, pid) in [(&mut a, "A"), (&mut b, "B")] {
        for (l, n) in [
            (ls_s, lease.as_str()),
            (ls_s, "shr"),
            (ls_s, "shr2"),
            ("", disk_s),
        ] {
            let _ = conn.release(l, n);
        }
        let _ = pid;
    }
    // The lease name hashes the per-run temporary path.
    out.into_iter()
        .map(|s| s.replace(&lease, "LEASE"))
        .collect()
}

#[test]
fn lock_manager_same_on_both_daemons() {
    let mut results = Vec::new();
    for (bin, label) in [
        (our_bin("virtlockd"), "ours"),
        (c_bin("virtlockd"), "libvirt"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let d = Daemon::start(&bin, "virtlockd", None);
        let r = lock_scenario(&d, tmp.path());
        eprintln!("{label}: {r:#?}");
        results.push(r);
    }
    assert_eq!(results[0], results[1]);
}

// ---- vhctl ---------------------------------------------------------------------------

#[test]
fn vhctl_log_run_rotates_and_log_show_reads_across() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = conf(tmp.path(), 200, 2);
    let d = Daemon::start(&our_bin("virtlogd"), "virtlogd", Some(&cfg));
    let sock = d.socket();
    let sock = sock.to_str().unwrap();
    let log = tmp.path().join("app.log");
    let log_s = log.to_str().unwrap();
    let o = vhctl(&[
        "log-run",
        "--socket",
        sock,
        "--path",
        log_s,
        "--name",
        "app",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do echo \"line $i\"; echo \"err $i\" >&2; i=$((i+1)); done; exit 7",
    ]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The daemon closes the log when it has drained the pipe to EOF.
    let read_all = || {
        let mut s = Vec::new();
        for f in [
            format!("{log_s}.1"),
            format!("{log_s}.0"),
            log_s.to_string(),
        ] {
            if let Ok(b) = fs::read(&f) {
                s.extend(b);
            }
        }
        String::from_utf8(s).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read_all().ends_with("err 39\n") {
        assert!(
            Instant::now() < deadline,
            "log incomplete: {:?}",
            read_all()
        );
        sleep(Duration::from_millis(50));
    }
    for f in [
        format!("{log_s}.1"),
        format!("{log_s}.0"),
        log_s.to_string(),
    ] {
        let size = fs::metadata(&f)
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .len();
        assert!(size <= 200, "{f} is {size} bytes");
    }
    assert!(!Path::new(&format!("{log_s}.2")).exists());
    let all = read_all();
    // Rotation dropped the oldest lines; what is left is a consecutive tail.
    assert!(
        all.starts_with("line ") || all.starts_with("err "),
        "{all:?}"
    );
    let show = vhctl(&["log-show", "--socket", sock, "--path", log_s]);
    assert_eq!(
        show.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert_eq!(String::from_utf8(show.stdout).unwrap(), all);
    // A busy log refuses a second writer.
    let mut lm = LogManager::connect(&vh_client::Target::Socket(d.socket())).unwrap();
    let (_w, _) = lm.open_log("qemu", [0; 16], "x", &log, false).unwrap();
    let o = vhctl(&["log-run", "--socket", sock, "--path", log_s, "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Device or resource busy"));
}

fn children_of(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn vhctl_lease_scenario(d: &Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let sock = d.socket();
    let sock = sock.to_str().unwrap();
    let disk = tmp.path().join("vm.img");
    fs::write(&disk, b"").unwrap();
    let disk_s = disk.to_str().unwrap();
    let ls = tmp.path().join("files");
    let ls_s = ls.to_str().unwrap();
    let lease_file = ls.join(lease_name_for_path(disk_s));

    let mut holder = Command::new(our_bin("vhctl"))
        .args([
            "lease",
            "--socket",
            sock,
            "--indirect",
            ls_s,
            "--disk",
            disk_s,
        ])
        .args(["--", "sh", "-c", "while true; do sleep 0.1; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let shell = loop {
        if let Some(&p) = children_of(holder.id()).first() {
            if lease_file.exists() {
                break p;
            }
        }
        assert!(
            holder.try_wait().unwrap().is_none(),
            "vhctl lease exited early"
        );
        assert!(Instant::now() < deadline, "lease never taken");
        sleep(Duration::from_millis(20));
    };
    // Same disk again: refused with 2, CMD not started.
    let marker = tmp.path().join("ran");
    let o = vhctl(&[
        "lease",
        "--socket",
        sock,
        "--indirect",
        ls_s,
        "--disk",
        disk_s,
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(disk_s) && err.contains("busy"), "{err}");
    assert!(!marker.exists());
    // Killing the wrapped process ends vhctl with its status and releases the lease.
    // SAFETY: kill() on the pid of the shell our child spawned.
    unsafe {
        libc::kill(shell as i32, libc::SIGKILL);
    }
    let st = holder.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGKILL));
    assert!(!lease_file.exists(), "lease file left behind");
    let o = vhctl(&[
        "lease",
        "--socket",
        sock,
        "--indirect",
        ls_s,
        "--disk",
        disk_s,
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(marker.exists());
    // Direct leases and exit codes pass through.
    let o = vhctl(&[
        "lease", "--socket", sock, "--disk", disk_s, "--", "sh", "-c", "exit 5",
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn vhctl_lease_against_both_daemons() {
    for bin in [our_bin("virtlockd"), c_bin("virtlockd")] {
        let d = Daemon::start(&bin, "virtlockd", None);
        vhctl_lease_scenario(&d);
    }
}

#[test]
fn vhctl_usage_errors() {
    let o = vhctl(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("log-run"));
    assert_eq!(vhctl(&["bogus"]).status.code(), Some(1));
    assert_eq!(vhctl(&["lease", "--", "true"]).status.code(), Some(1));
    let o = vhctl(&[
        "log-run",
        "--socket",
        "/nonexistent/sock",
        "--path",
        "/tmp/x",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("Failed to connect socket to '/nonexistent/sock'"));
}

/// Needs `virtlogd::inspect::InspectProgram` / `virtlockd::inspect::InspectProgram` in
/// the daemons' `admin_programs`.
#[test]
fn vhctl_status_lists_logs_and_locks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = conf(tmp.path(), 100_000, 2);
    let logd = Daemon::start(&our_bin("virtlogd"), "virtlogd", Some(&cfg));
    let lockd = Daemon::start(&our_bin("virtlockd"), "virtlockd", None);
    let log = tmp.path().join("s.log");
    let mut lm = LogManager::connect(&vh_client::Target::Socket(logd.socket())).unwrap();
    let (_w, _) = lm.open_log("qemu", [3; 16], "svm", &log, false).unwrap();
    let mut lk = LockManager::connect(&vh_client::Target::Socket(lockd.socket())).unwrap();
    lk.register(&owner("svm", PID_A)).unwrap();
    let ls = tmp.path().join("ls");
    lk.create_lockspace(&ls).unwrap();
    lk.acquire(ls.to_str().unwrap(), "abc", false, true)
        .unwrap();
    let la = logd.root_run().join("virtlogd-admin-sock");
    let ka = lockd.root_run().join("virtlockd-admin-sock");
    let logs = vh_client::inspect::list_logs(&vh_client::Target::Socket(la.clone())).unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].domname, "svm");
    let locks = vh_client::inspect::list_locks(&vh_client::Target::Socket(ka.clone())).unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].owners, vec![PID_A]);
    let o = vhctl(&[
        "status",
        "--logd-admin",
        la.to_str().unwrap(),
        "--lockd-admin",
        ka.to_str().unwrap(),
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{s}");
    assert!(s.contains("svm") && s.contains("abc"), "{s}");
    lk.release(ls.to_str().unwrap(), "abc").unwrap();
}
