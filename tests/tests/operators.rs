//! Issue 18, the operators' toolkit, through the real daemons: `vhctl metrics` against
//! a scripted workload (bytes per path, rotations, leases, lease losses) and across a
//! re-exec; `vhctl log-show --follow` streaming exact bytes across many rotations and a
//! re-exec, telling a slow reader what it missed without stalling the log, and using no
//! CPU while idle (measured from /proc/PID/stat).
//!
//! Needs root (mount namespaces) and our built binaries (`cargo build --workspace`).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vh_client::{LockManager, LogManager, Owner, Target};
use vh_tests::{bin_dir, wait_until, Daemon, DaemonKind, OwnerChild, Service};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (mount namespaces); run them through ./test.sh"
    );
}

fn vhctl_bin() -> PathBuf {
    let p = bin_dir().join("vhctl");
    assert!(
        p.is_file(),
        "{} missing: cargo build --workspace",
        p.display()
    );
    p
}

fn vhctl(args: &[&str]) -> Output {
    Command::new(vhctl_bin())
        .args(args)
        .output()
        .expect("run vhctl")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// `vhctl metrics` parsed into `name{labels}` → value, after checking every family
/// has its HELP and TYPE lines before its samples.
fn metrics(logd: &Daemon, lockd: &Daemon) -> HashMap<String, u64> {
    let o = vhctl(&[
        "metrics",
        "--logd-admin",
        s(&logd.admin_sock()),
        "--lockd-admin",
        s(&lockd.admin_sock()),
    ]);
    let text = String::from_utf8(o.stdout).expect("metrics are UTF-8");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut out = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap();
            assert!(kind == "gauge" || kind == "counter", "{line}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            typed.insert(name);
        } else {
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let name = key.split('{').next().unwrap();
            assert!(
                typed.contains(name) && helped.contains(name),
                "{name} without HELP/TYPE"
            );
            out.insert(key.to_string(), value.parse().expect("integer value"));
        }
    }
    out
}

fn logd_conf(max_size: u64, max_backups: u64) -> String {
    format!("max_size = {max_size}\nmax_backups = {max_backups}\n")
}

/// The ids of a process's threads other than its main one.
fn threads(pid: u32) -> std::collections::HashSet<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&t| t != pid)
                .collect()
        })
        .unwrap_or_default()
}

/// SIGUSR1 and wait until the new image serves. Exec ends every thread but the main
/// one, so a multi-threaded daemon (virtlogd) is re-executed once none of its old other
/// threads exists and new ones run (thread ids are not reused this soon); a
/// single-threaded one (virtlockd) once its address space changed (the PIE base is
/// randomised per exec). Either way the state file must have been consumed.
fn reexec(d: &Daemon) {
    let maps = || fs::read_to_string(format!("/proc/{}/maps", d.pid())).unwrap_or_default();
    let first = |m: String| m.lines().next().unwrap_or_default().to_string();
    let before = (threads(d.pid()), first(maps()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    let state = d.host_path(format!("/run/{}-restart-exec.json", d.service.name()));
    wait_until("the daemon to exec its new image", || {
        let (tids, map) = (threads(d.pid()), first(maps()));
        let execed = if before.0.is_empty() {
            !map.is_empty() && map != before.1
        } else {
            !tids.is_empty() && tids.is_disjoint(&before.0)
        };
        execed && !state.exists()
    });
    // The new image answers once it has restored.
    wait_until("the new image to serve", || {
        std::os::unix::net::UnixStream::connect(d.admin_sock()).is_ok()
    });
}

/// Writes `n` bytes of 100-byte lines tagged `tag` into a log pipe.
fn write_lines(w: &mut fs::File, tag: &str, n: usize) {
    assert_eq!(n % 100, 0);
    let mut buf = Vec::with_capacity(n);
    for i in 0..n / 100 {
        let line = format!("{:.<99}\n", format!("{tag} line {i:08} "));
        buf.extend_from_slice(line.as_bytes());
    }
    w.write_all(&buf).expect("write log pipe");
}

fn files_total(path: &Path, backups: u64) -> u64 {
    let mut total = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    for i in 0..backups {
        total += fs::metadata(format!("{}.{i}", path.display()))
            .map(|m| m.len())
            .unwrap_or(0);
    }
    total
}

#[test]
fn metrics_follow_a_scripted_workload_and_survive_reexec() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let logd = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, &logd_conf(1000, 3));
    let lockd = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let target = Target::Socket(logd.sock());

    // Two logs; one path needs label escaping.
    let a = tmp.path().join("a.log");
    let b = tmp.path().join("we\"ird\\b.log");
    let mut lm = LogManager::connect(&target).unwrap();
    let (pa, _) = lm.open_log("qemu", [1; 16], "a", &a, false).unwrap();
    let (pb, _) = lm.open_log("qemu", [2; 16], "b", &b, false).unwrap();
    let (mut pa, mut pb) = (fs::File::from(pa), fs::File::from(pb));
    write_lines(&mut pa, "a", 2500);
    write_lines(&mut pb, "b", 300);
    lm.position(&a).unwrap();
    lm.position(&b).unwrap();
    lm.append("qemu", [2; 16], "b", &b, b"appended\n").unwrap();

    // Leases: an owner with one direct lease in the default lockspace and two in a
    // directory lockspace (one shared, held by a second owner too).
    let disk = tmp.path().join("disk.img");
    fs::write(&disk, b"").unwrap();
    let ls = tmp.path().join("ls");
    let mut owner1 = OwnerChild::connect(&lockd.sock());
    let mut owner2 = OwnerChild::connect(&lockd.sock());
    let lock_of = |o: &mut OwnerChild| {
        let stream = o.conn.take().unwrap().stream;
        LockManager::from_stream(stream)
    };
    let mut l1 = lock_of(&mut owner1);
    let mut l2 = lock_of(&mut owner2);
    for (l, o, name) in [(&mut l1, &owner1, "o1"), (&mut l2, &owner2, "o2")] {
        l.register(&Owner {
            uuid: [9; 16],
            name: name.into(),
            id: 1,
            pid: o.pid(),
        })
        .unwrap();
    }
    l1.create_lockspace(&ls).unwrap();
    l1.acquire("", s(&disk), false, false).unwrap();
    l1.acquire(s(&ls), "x", false, true).unwrap();
    l1.acquire(s(&ls), "y", true, true).unwrap();
    l2.acquire(s(&ls), "y", true, true).unwrap();

    let check = |m: &HashMap<String, u64>, extra_a: u64, rotations_a: u64| {
        let la = format!("{{path=\"{}\"}}", a.display());
        let lb = format!(
            "{{path=\"{}\"}}",
            b.display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
        );
        assert_eq!(m["virtlogd_up"], 1);
        assert_eq!(m["virtlogd_logs_open"], 2);
        assert_eq!(
            m[&format!("virtlogd_log_written_bytes_total{la}")],
            2500 + extra_a
        );
        assert_eq!(m[&format!("virtlogd_log_written_bytes_total{lb}")], 309);
        assert_eq!(m[&format!("virtlogd_log_dropped_bytes_total{la}")], 0);
        assert_eq!(m[&format!("virtlogd_log_rotations_total{la}")], rotations_a);
        assert_eq!(m[&format!("virtlogd_log_rotations_total{lb}")], 0);
        assert_eq!(m["virtlockd_up"], 1);
    };
    let m = metrics(&logd, &lockd);
    // 1000-byte files of 100-byte lines: 2500 bytes roll over twice.
    check(&m, 0, 2);
    assert_eq!(
        files_total(&a, 3),
        2500,
        "the files hold what the counter says"
    );
    assert_eq!(m["virtlockd_leases_held{lockspace=\"\"}"], 1, "{m:?}");
    assert_eq!(
        m[&format!("virtlockd_leases_held{{lockspace=\"{}\"}}", ls.display())],
        3
    );
    assert_eq!(m["virtlockd_owners"], 2);
    assert_eq!(m["virtlockd_lease_losses_total"], 0);

    // Owner 1 dies holding three leases: three lost (owner 2 keeps its one).
    drop(l1);
    owner1.exit();
    wait_until("virtlockd to release owner 1's leases", || {
        metrics(&logd, &lockd)["virtlockd_lease_losses_total"] == 3
    });
    let m = metrics(&logd, &lockd);
    assert_eq!(m["virtlockd_owners"], 1);
    assert_eq!(m["virtlockd_leases_held{lockspace=\"\"}"], 0);

    // Both re-exec: counters carry over, and keep counting.
    reexec(&logd);
    reexec(&lockd);
    let m = metrics(&logd, &lockd);
    check(&m, 0, 2);
    assert_eq!(m["virtlockd_lease_losses_total"], 3);
    assert_eq!(m["virtlockd_owners"], 1);
    write_lines(&mut pa, "a2", 600);
    lm.position(&a).unwrap();
    let m = metrics(&logd, &lockd);
    check(&m, 600, 3);
    assert_eq!(
        files_total(&a, 3),
        3100,
        "3 backups of 1000 bytes, 100 in LOG"
    );

    // A log that cannot be written counts what it drops (and keeps its pipe).
    let full = Path::new("/dev/full");
    let (pf, _) = lm.open_log("qemu", [3; 16], "f", full, false).unwrap();
    let mut pf = fs::File::from(pf);
    write_lines(&mut pf, "f", 500);
    lm.position(full).unwrap();
    let m = metrics(&logd, &lockd);
    assert_eq!(
        m["virtlogd_log_dropped_bytes_total{path=\"/dev/full\"}"],
        500
    );
    assert_eq!(m["virtlogd_log_written_bytes_total{path=\"/dev/full\"}"], 0);
    drop(l2);
    owner2.exit();
}

/// A reader of `vhctl log-show --follow`'s stdout, collected on a thread.
struct Follower {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 65536];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Follower {
    fn start(logd: &Daemon, path: &Path) -> Follower {
        let mut child = Command::new(vhctl_bin())
            .args([
                "log-show",
                "--socket",
                s(&logd.sock()),
                "--logd-admin",
                s(&logd.admin_sock()),
                "--path",
                s(path),
                "--follow",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vhctl");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Follower { child, out, err }
    }

    fn len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    fn wait_len(&self, n: usize) {
        let mut ok = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if self.len() >= n {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            ok,
            "vhctl printed {} of {n} bytes; its stderr: {}",
            self.len(),
            self.stderr()
        );
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the parenthesised command name; utime and stime are fields 14, 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn follow_streams_exact_bytes_across_rotations_and_reexec() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // Small files and few backups: history could not be rebuilt from the files.
    let logd = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, &logd_conf(4096, 2));
    let path = tmp.path().join("f.log");
    let mut lm = LogManager::connect(&Target::Socket(logd.sock())).unwrap();
    let (p, _) = lm.open_log("qemu", [1; 16], "f", &path, false).unwrap();
    let mut pipe = fs::File::from(p);
    let mut expected = Vec::new();
    let emit = |w: &mut fs::File, tag: &str, n: usize, exp: &mut Vec<u8>| {
        let before = exp.len();
        let mut buf = Vec::new();
        for i in 0..n / 100 {
            let line = format!("{:x<99}\n", format!("{tag} {i:08} "));
            buf.extend_from_slice(line.as_bytes());
        }
        w.write_all(&buf).unwrap();
        exp.extend_from_slice(&buf);
        exp.len() - before
    };
    // History: fits the three files on disk.
    emit(&mut pipe, "history", 8000, &mut expected);
    lm.position(&path).unwrap();
    let f = Follower::start(&logd, &path);
    f.wait_len(expected.len());
    // 2 MiB through ~500 rollovers while following.
    emit(&mut pipe, "live", 2 << 20, &mut expected);
    f.wait_len(expected.len());
    assert_eq!(f.len(), expected.len(), "{}", f.stderr());
    assert!(*f.out.lock().unwrap() == expected, "bytes differ");

    // Idle: neither the daemon nor the follower uses CPU.
    let (d0, v0) = (cpu_ticks(logd.pid()), cpu_ticks(f.child.id()));
    std::thread::sleep(Duration::from_secs(3));
    let (d1, v1) = (cpu_ticks(logd.pid()), cpu_ticks(f.child.id()));
    assert_eq!(
        (d1 - d0, v1 - v0),
        (0, 0),
        "CPU ticks while idle (daemon, vhctl)"
    );

    // A re-exec ends the stream; vhctl reads the gap and follows the new image (what
    // is written before it does is read back from the files, which 4 KiB logs would
    // rotate away: wait for it, as the metrics show).
    reexec(&logd);
    let admin = Target::Socket(logd.admin_sock());
    wait_until("vhctl to follow the new image", || {
        vh_client::inspect::log_metrics(&admin).is_ok_and(|l| l.len() == 1 && l[0].followers == 1)
    });
    emit(&mut pipe, "after", 512 << 10, &mut expected);
    f.wait_len(expected.len());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(f.len(), expected.len(), "{}", f.stderr());
    assert!(
        *f.out.lock().unwrap() == expected,
        "bytes differ after re-exec"
    );
    assert!(
        !f.stderr().contains("lost"),
        "nothing may be lost: {}",
        f.stderr()
    );
}

#[test]
fn slow_follower_is_told_what_it_missed_and_never_stalls_the_log() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let logd = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, &logd_conf(1 << 20, 2));
    let path = tmp.path().join("s.log");
    let mut lm = LogManager::connect(&Target::Socket(logd.sock())).unwrap();
    let (p, _) = lm.open_log("qemu", [1; 16], "s", &path, false).unwrap();
    let mut pipe = fs::File::from(p);
    let f = Follower::start(&logd, &path);
    // vhctl prints nothing before its FOLLOW_LOG call succeeded (history included), so
    // once this line is out it follows.
    lm.append("qemu", [1; 16], "s", &path, b"start\n").unwrap();
    f.wait_len(6);
    let vpid = nix::unistd::Pid::from_raw(f.child.id() as i32);
    nix::sys::signal::kill(vpid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // 64 MiB while the follower sleeps: the writes complete (the log never waits for
    // it) and the file has every byte.
    let total: usize = 64 << 20;
    let chunk = vec![b'z'; 1 << 20];
    for _ in 0..total / chunk.len() {
        pipe.write_all(&chunk).unwrap();
    }
    lm.position(&path).unwrap();
    let written = vh_client::inspect::log_metrics(&Target::Socket(logd.admin_sock())).unwrap();
    assert_eq!(written[0].counters.written, 6 + total as u64);
    nix::sys::signal::kill(vpid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let missed = || -> u64 {
        f.stderr()
            .lines()
            .filter_map(|l| l.strip_prefix("vhctl: "))
            .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // The reader is told what it missed as soon as it has room again, with no further
    // write: what it shows plus what it was told it missed is everything written.
    wait_until("shown + missed to add up to what was written", || {
        f.len() as u64 + missed() == (6 + total) as u64
    });
    assert!(
        missed() > 0,
        "a stopped reader must miss bytes: {}",
        f.stderr()
    );
    // And it follows on.
    lm.append("qemu", [1; 16], "s", &path, b"end\n").unwrap();
    wait_until("vhctl to print the end", || {
        f.out.lock().unwrap().ends_with(b"end\n")
    });
    assert_eq!(f.len() as u64 + missed(), (6 + total + 4) as u64);
}

/// The man pages come from the same source as `--help` (`vh_common::manual`) and must
/// render cleanly: `groff -ww` (all warnings) prints nothing, `man -l` formats them.
#[test]
fn man_pages_render_without_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    for (page, section) in [("vhctl", 1), ("virtlogd", 8), ("virtlockd", 8)] {
        let o = vhctl(&["man", page]);
        assert_eq!(o.status.code(), Some(0), "vhctl man {page}");
        let src = tmp.path().join(format!("{page}.{section}"));
        fs::write(&src, &o.stdout).unwrap();
        let g = Command::new("groff")
            .args(["-ww", "-man", "-Tutf8", "-z"])
            .arg(&src)
            .output()
            .expect("groff is required (install man-db / groff-base)");
        assert!(g.status.success(), "groff failed on {page}");
        assert_eq!(
            String::from_utf8_lossy(&g.stderr),
            "",
            "groff warnings for {page}"
        );
        let m = Command::new("man")
            .args(["-l", "-Tutf8"])
            .arg(&src)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_STDERR", "1")
            .output()
            .expect("man is required (install man-db)");
        // grotty's bold and underline are overstrikes ("N\bN"): keep the last char.
        let raw: Vec<char> = String::from_utf8_lossy(&m.stdout).chars().collect();
        let mut text = String::new();
        let mut i = 0;
        while i < raw.len() {
            if raw.get(i + 1) == Some(&'\u{8}') {
                i += 2;
                continue;
            }
            text.push(raw[i]);
            i += 1;
        }
        assert!(m.status.success(), "man -l {page}");
        assert_eq!(
            String::from_utf8_lossy(&m.stderr),
            "",
            "man warnings for {page}"
        );
        assert!(text.contains("NAME") && text.contains(page), "{text}");
        if section == 8 {
            for want in [
                "SIGUSR1",
                "max_clients",
                "--timeout",
                "DIFFERENCES FROM LIBVIRT",
            ] {
                assert!(text.contains(want), "{page}(8) lacks {want}:\n{text}");
            }
        }
    }
    // --help is the same page rendered as text.
    let h = vhctl(&["--help"]);
    let help = String::from_utf8_lossy(&h.stdout);
    for cmd in ["log-run", "log-show", "lease", "status", "metrics", "man"] {
        assert!(help.contains(&format!("  {cmd} ")), "--help lacks {cmd}");
    }
}

/// The Debian package's install/remove cycle under live daemons holding a guest's log
/// pipe and lease (packaging/test-deb.sh, in a private mount namespace with overlays,
/// so the host's dpkg database and /usr are untouched).
#[test]
fn debian_package_swaps_live_daemons_both_ways() {
    require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile = bin_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        profile == "debug" || profile == "release",
        "binaries in {}",
        bin_dir().display()
    );
    // Inside `cargo test` cargo holds the build lock: package what is built.
    let deb = Command::new(root.join("packaging/deb.sh"))
        .env("VH_DEB_PROFILE", &profile)
        .env("VH_DEB_NO_BUILD", "1")
        .output()
        .expect("run packaging/deb.sh");
    assert!(
        deb.status.success(),
        "deb.sh: {}",
        String::from_utf8_lossy(&deb.stderr)
    );
    let path = String::from_utf8_lossy(&deb.stdout).trim().to_string();
    let t = Command::new(root.join("packaging/test-deb.sh"))
        .arg(root.join(&path))
        .env("VH_DEB_PROFILE", &profile)
        .output()
        .expect("run packaging/test-deb.sh");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&t.stdout),
        String::from_utf8_lossy(&t.stderr)
    );
    assert!(t.status.success(), "{out}");
    assert!(out.contains("test-deb: PASS"), "{out}");
}

/// Against libvirt's C virtlogd (no inspect program) --follow falls back to polling
/// the main socket, and says so.
#[test]
fn follow_falls_back_to_polling_with_libvirts_daemon() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let logd = Daemon::spawn(DaemonKind::C, Service::Virtlogd, &logd_conf(4096, 2));
    let path = tmp.path().join("c.log");
    let mut lm = LogManager::connect(&Target::Socket(logd.sock())).unwrap();
    let (p, _) = lm.open_log("qemu", [1; 16], "c", &path, false).unwrap();
    let mut pipe = fs::File::from(p);
    pipe.write_all(b"before\n").unwrap();
    let f = Follower::start(&logd, &path);
    f.wait_len(7);
    pipe.write_all(b"after\n").unwrap();
    f.wait_len(13);
    assert_eq!(*f.out.lock().unwrap(), b"before\nafter\n");
    assert!(f.stderr().contains("polling it instead"), "{}", f.stderr());
}

/// `vhctl --session` as a normal user with no session daemon running starts ours (the
/// virtlogd beside vhctl, not /usr/sbin's libvirt one) and says which it started.
#[test]
fn session_vhctl_starts_our_daemon_and_says_so() {
    use std::os::unix::fs::{chown, PermissionsExt};
    require_root();
    // Binaries and runtime directory where uid 65534 can reach them.
    let dir = tempfile::Builder::new()
        .prefix("vh-session-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for b in ["vhctl", "virtlogd"] {
        fs::copy(bin_dir().join(b), dir.path().join(b)).unwrap();
    }
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    chown(&home, Some(65534), Some(65534)).unwrap();
    let log = home.join("s.log");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(dir.path().join("vhctl"))
        .args(["log-run", "--session", "--path", s(&log), "--", "true"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .output()
        .expect("setpriv (util-linux) is required");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let pidfile = home.join("libvirt/virtlogd.pid");
    let pid = fs::read_to_string(&pidfile).unwrap_or_default();
    let exe = fs::read_link(format!("/proc/{}/exe", pid.trim())).ok();
    if let Ok(p) = pid.trim().parse::<i32>() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    assert_eq!(o.status.code(), Some(0), "{err}");
    let ours = dir.path().join("virtlogd");
    assert!(
        err.contains(&format!(
            "virtlogd is not running; starting {}",
            ours.display()
        )),
        "{err}"
    );
    assert_eq!(
        exe.as_deref(),
        Some(ours.as_path()),
        "the session daemon run"
    );
}

/// A relative --path is vhctl's, not the daemon's (whose working directory is /).
#[test]
fn relative_log_paths_are_resolved_by_vhctl() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let logd = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, &logd_conf(0, 0));
    let o = Command::new(vhctl_bin())
        .args(["log-run", "--socket", s(&logd.sock()), "--path", "rel.log"])
        .args(["--", "echo", "relative"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let log = tmp.path().join("rel.log");
    wait_until("the line in ./rel.log", || {
        fs::read(&log).is_ok_and(|b| b == b"relative\n")
    });
}
