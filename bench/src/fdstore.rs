//! `vh-bench fdstore`: what keeping systemd's fd store current costs our daemons
//! (issue 15), store on vs off, and how long a crash takes to resume from it.
//!
//! No systemd is needed: a stand-in service manager binds the `NOTIFY_SOCKET`, keeps
//! what the daemon stores (`FDSTORE=1`/`FDNAME=`, `FDSTOREREMOVE=1`), counts `READY=1`,
//! and after a SIGKILL starts the daemon again with the stored fds as systemd does
//! (`LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID`, fds from 3 on). "Off" is the same
//! manager without `VH_FDSTORE=1`: `READY=1` still arrives, nothing is stored.
//!
//! Per mode and daemon: start-up (spawn → READY), per-change cost (virtlockd: each
//! ACQUIRE of N exclusive leases over one connection; virtlogd: each OPEN of M logs),
//! RSS holding them, SIGUSR1 re-exec (signal → next READY), and with the store on the
//! crash resume (SIGKILL → restart with the stored fds → READY, the leases still held).

use crate::daemon::Res;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vh_common::connection::blocking::Client;

/// What the stand-in manager holds.
#[derive(Default)]
struct Held {
    fds: Vec<(String, OwnedFd)>,
    ready: u64,
}

struct Manager {
    path: PathBuf,
    held: Arc<(Mutex<Held>, Condvar)>,
}

impl Manager {
    fn start(path: PathBuf) -> Res<Manager> {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path)?;
        let held: Arc<(Mutex<Held>, Condvar)> = Arc::default();
        let h = held.clone();
        std::thread::spawn(move || receive(sock, h));
        Ok(Manager { path, held })
    }

    fn ready(&self) -> u64 {
        self.held.0.lock().map(|h| h.ready).unwrap_or(0)
    }

    /// Waits for READY number `n` (counted since the manager started).
    fn wait_ready(&self, n: u64) -> Res<()> {
        let (m, cv) = &*self.held;
        let mut g = m.lock().map_err(|_| "manager poisoned")?;
        let t0 = Instant::now();
        while g.ready < n {
            if t0.elapsed() > Duration::from_secs(60) {
                return Err("no READY=1 within 60 s".into());
            }
            g = cv
                .wait_timeout(g, Duration::from_millis(100))
                .map_err(|_| "manager poisoned")?
                .0;
        }
        Ok(())
    }

    fn stored(&self) -> usize {
        self.held.0.lock().map(|h| h.fds.len()).unwrap_or(0)
    }

    fn take(&self) -> Vec<(String, OwnedFd)> {
        self.held
            .0
            .lock()
            .map(|mut h| std::mem::take(&mut h.fds))
            .unwrap_or_default()
    }
}

fn receive(sock: UnixDatagram, held: Arc<(Mutex<Held>, Condvar)>) {
    loop {
        let Ok((text, fds)) = vh_testkit::recv_notify(&sock) else {
            return;
        };
        let mut kv = HashMap::new();
        for l in text.lines() {
            if let Some((k, v)) = l.split_once('=') {
                kv.insert(k.to_string(), v.to_string());
            }
        }
        let (m, cv) = &*held;
        let Ok(mut h) = m.lock() else { return };
        let name = kv.get("FDNAME").cloned().unwrap_or_default();
        if kv.get("FDSTORE").is_some_and(|v| v == "1") {
            for fd in fds {
                h.fds.push((name.clone(), fd));
            }
        } else if kv.get("FDSTOREREMOVE").is_some_and(|v| v == "1") {
            h.fds.retain(|(n, _)| *n != name);
        }
        if kv.get("READY").is_some_and(|v| v == "1") {
            h.ready += 1;
            cv.notify_all();
        }
    }
}

/// A mount namespace with its own tmpfs `/run`, kept by a sleeping process, so that a
/// restarted daemon finds the sockets where the dead one bound them.
struct MountNs {
    holder: Child,
}

impl MountNs {
    fn new() -> Res<MountNs> {
        let holder = Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && exec sleep 100000",
            ])
            .stdin(Stdio::null())
            .spawn()?;
        let comm = PathBuf::from(format!("/proc/{}/comm", holder.id()));
        let t0 = Instant::now();
        // The tmpfs is mounted once the holder has become `sleep` (until then its /run
        // is the host's).
        while std::fs::read_to_string(&comm).map_or(true, |c| c.trim() != "sleep") {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("namespace holder did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(MountNs { holder })
    }

    fn socket(&self, kind: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/libvirt/{kind}-sock",
            self.holder.id()
        ))
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

struct Run {
    kind: &'static str,
    bin: PathBuf,
    conf: PathBuf,
    store: bool,
    ns: MountNs,
    mgr: Manager,
    child: Option<Child>,
    err: PathBuf,
}

impl Run {
    fn new(dir: &Path, bins: &Path, kind: &'static str, store: bool) -> Res<Run> {
        let conf = dir.join(format!("{kind}-fdstore.conf"));
        std::fs::write(
            &conf,
            "log_level = 3\nlog_outputs = \"3:stderr\"\nmax_clients = 10000\n",
        )?;
        Ok(Run {
            kind,
            bin: bins.join(kind),
            conf,
            store,
            ns: MountNs::new()?,
            mgr: Manager::start(dir.join(format!("notify-{kind}-{}", u8::from(store))))?,
            child: None,
            err: dir.join(format!("{kind}-fdstore-{}.stderr", u8::from(store))),
        })
    }

    /// Starts the daemon (with `passed` as systemd passes stored fds) and waits for its
    /// READY; returns the time that took.
    fn spawn(&mut self, passed: Vec<(String, OwnedFd)>) -> Res<Duration> {
        let want = self.mgr.ready() + 1;
        let names: Vec<String> = passed.iter().map(|(n, _)| n.clone()).collect();
        let raw: Vec<RawFd> = passed.iter().map(|(_, f)| f.as_raw_fd()).collect();
        let script = format!(
            "LISTEN_PID=$$ exec {} -f {}",
            self.bin.display(),
            self.conf.display()
        );
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.ns.holder.id().to_string(),
            "-m",
            "--",
            "sh",
            "-c",
        ])
        .arg(&script)
        .env("NOTIFY_SOCKET", &self.mgr.path)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.err)?,
        );
        if self.store {
            cmd.env("VH_FDSTORE", "1");
        }
        if !raw.is_empty() {
            cmd.env("LISTEN_FDS", raw.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            // The fds go to 3.. in the child, as systemd passes them.
            // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Lift them first, so no dup2 below overwrites one not yet moved.
                    let base = 3 + raw.len() as RawFd + 16;
                    let mut lifted = Vec::with_capacity(raw.len());
                    for &fd in &raw {
                        let up = libc::fcntl(fd, libc::F_DUPFD, base);
                        if up < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        lifted.push(up);
                    }
                    for (i, &fd) in lifted.iter().enumerate() {
                        if libc::dup2(fd, 3 + i as RawFd) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    Ok(())
                });
            }
        }
        let t0 = Instant::now();
        self.child = Some(cmd.spawn()?);
        drop(passed);
        self.mgr.wait_ready(want)?;
        Ok(t0.elapsed())
    }

    /// A client of the daemon's RPC program, on its socket in the namespace.
    fn client(&self) -> Res<Client> {
        let (program, version) = if self.kind == "virtlockd" {
            (virtlockd::protocol::PROGRAM, virtlockd::protocol::VERSION)
        } else {
            (virtlogd::protocol::PROGRAM, virtlogd::protocol::VERSION)
        };
        Ok(Client::connect(
            &self.ns.socket(self.kind),
            program,
            version,
        )?)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGUSR1 → the next READY.
    fn reexec(&self) -> Res<Duration> {
        let want = self.mgr.ready() + 1;
        let t0 = Instant::now();
        self.signal(libc::SIGUSR1);
        self.mgr.wait_ready(want)?;
        Ok(t0.elapsed())
    }

    /// SIGKILL, then a start with whatever the store holds (what systemd's
    /// Restart=on-failure does, minus RestartSec).
    fn crash_resume(&mut self) -> Res<Duration> {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let passed = self.mgr.take();
        self.spawn(passed)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.mgr.path);
    }
}

/// One mode's figures.
#[derive(Debug, Default, Clone)]
struct Figures {
    startup_ms: f64,
    per_change_us: f64,
    /// virtlockd: a second owner joining each of the N held shared leases (no file work:
    /// the RPC, the table and, with the store, the snapshot of N leases).
    per_join_us: f64,
    rss_kib: u64,
    reexec_ms: f64,
    stored: usize,
    crash_ms: Option<f64>,
    survived: Option<String>,
}

/// What a daemon's reps measure, each one sample per rep; medians in the end.
#[derive(Default)]
struct Samples {
    startups: Vec<f64>,
    per_change: Vec<f64>,
    joins: Vec<f64>,
    reexecs: Vec<f64>,
    crashes: Vec<f64>,
}

impl Samples {
    /// A fresh daemon of `kind`, started (the start-up sample).
    fn start(&mut self, dir: &Path, bins: &Path, kind: &'static str, store: bool) -> Res<Run> {
        let mut r = Run::new(dir, bins, kind, store)?;
        self.startups.push(ms(r.spawn(Vec::new())?));
        Ok(r)
    }

    /// After the load: the RSS, a re-exec, what the store then holds and, with the
    /// store on, a crash resume. Whether it crashed (then the caller checks what
    /// survived).
    fn reexec_and_crash(&mut self, r: &mut Run, f: &mut Figures) -> Res<bool> {
        f.rss_kib = f.rss_kib.max(r.rss_kib());
        self.reexecs.push(ms(r.reexec()?));
        // The store settles after the re-exec's READY (it stores before READY).
        f.stored = r.mgr.stored();
        if r.store {
            self.crashes.push(ms(r.crash_resume()?));
        }
        Ok(r.store)
    }

    /// `f` with the medians.
    fn medians(self, f: Figures) -> Figures {
        Figures {
            startup_ms: median(self.startups),
            per_change_us: median(self.per_change),
            per_join_us: median(self.joins),
            reexec_ms: median(self.reexecs),
            crash_ms: (!self.crashes.is_empty()).then(|| median(self.crashes)),
            ..f
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Microseconds per item of `n` done since `t0`.
fn us_each(t0: Instant, n: usize) -> f64 {
    t0.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// The median of each figure over the runs (the fastest run is no better a guide on a
/// shared machine: the first lockspace of a run creates its files faster than later
/// ones), the last run's store.
fn best(runs: &[Figures]) -> Figures {
    let med = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    let last = runs.last().cloned().unwrap_or_default();
    Figures {
        startup_ms: med(|r| r.startup_ms),
        per_change_us: med(|r| r.per_change_us),
        per_join_us: med(|r| r.per_join_us),
        rss_kib: med(|r| r.rss_kib as f64) as u64,
        reexec_ms: med(|r| r.reexec_ms),
        crash_ms: last.crash_ms.map(|_| med(|r| r.crash_ms.unwrap_or(0.0))),
        ..last
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// ACQUIRE_RESOURCE, shared, autocreate.
fn acquire_shared(c: &mut Client, dir: &str, name: &str) -> Res<()> {
    use virtlockd::protocol as kp;
    let a = kp::ResourceArgs {
        path: dir.to_owned(),
        name: name.to_owned(),
        flags: kp::ACQUIRE_SHARED | kp::ACQUIRE_AUTOCREATE,
    };
    let mut e = vh_common::xdr::Encoder::new();
    a.encode(&mut e);
    c.call(kp::proc_::ACQUIRE_RESOURCE, e.as_bytes())?;
    Ok(())
}

fn lockd(dir: &Path, bins: &Path, store: bool, n: usize, reps: usize) -> Res<Figures> {
    let mut f = Figures::default();
    let mut s = Samples::default();
    for rep in 0..reps {
        let mut r = s.start(dir, bins, "virtlockd", store)?;
        // On the namespace's tmpfs: the shared disk's file creation time varies by 20×
        // with other work, and would drown what the store adds.
        let lss = format!("/run/fdstore-leases-{rep}");
        let ls = PathBuf::from(format!("/proc/{}/root{lss}", r.ns.holder.id()));
        std::fs::create_dir_all(&ls)?;
        let mut c = r.client()?;
        crate::lockd::create_lockspace(&mut c, Path::new(&lss))?;
        crate::lockd::register(&mut c, 7)?;
        let t0 = Instant::now();
        for i in 0..n {
            acquire_shared(&mut c, &lss, &format!("lease-{i}"))?;
        }
        s.per_change.push(us_each(t0, n));
        let mut other = r.client()?;
        crate::lockd::register(&mut other, 8)?;
        let t0 = Instant::now();
        for i in 0..n {
            acquire_shared(&mut other, &lss, &format!("lease-{i}"))?;
        }
        s.joins.push(us_each(t0, n));
        drop(other);
        if s.reexec_and_crash(&mut r, &mut f)? {
            // The owner's connection still works after the crash: a release succeeds.
            crate::lockd::release(&mut c, &lss, "lease-0")?;
            let free = (1..n)
                .filter(|i| other_can_lock(&ls.join(format!("lease-{i}"))))
                .count();
            f.survived = Some(format!(
                "{} of {} leases held after the crash, owner's release ok",
                n - 1 - free,
                n - 1
            ));
        }
        drop(c);
        drop(r);
        let _ = std::fs::remove_dir_all(&ls);
    }
    Ok(s.medians(f))
}

fn other_can_lock(p: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(p) else {
        return true;
    };
    let fl = virtlockd::lease_lock::byte0(libc::F_WRLCK);
    // A POSIX lock from this (other) process: refused while an OFD lock is held.
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLK(&fl)).is_ok()
}

fn logd(dir: &Path, bins: &Path, store: bool, m: usize, reps: usize) -> Res<Figures> {
    let mut f = Figures::default();
    let mut s = Samples::default();
    for rep in 0..reps {
        let mut r = s.start(dir, bins, "virtlogd", store)?;
        // On the namespace's tmpfs, as the leases.
        let inner = PathBuf::from(format!("/run/fdstore-logs-{rep}"));
        let logs = PathBuf::from(format!(
            "/proc/{}/root/run/fdstore-logs-{rep}",
            r.ns.holder.id()
        ));
        std::fs::create_dir_all(&logs)?;
        let mut c = r.client()?;
        let t0 = Instant::now();
        let mut pipes = Vec::with_capacity(m);
        for i in 0..m {
            pipes.push(crate::logd::open_log(
                &mut c,
                &inner.join(format!("{i}.log")),
                i,
            )?);
        }
        s.per_change.push(us_each(t0, m));
        if s.reexec_and_crash(&mut r, &mut f)? {
            // Every pipe still drains into its file after the crash.
            for p in &mut pipes {
                p.write_all(b"after the crash\n")?;
            }
            let t = Instant::now();
            let mut landed = 0;
            while t.elapsed() < Duration::from_secs(10) {
                landed = (0..m)
                    .filter(|i| {
                        std::fs::read(logs.join(format!("{i}.log")))
                            .is_ok_and(|b| b.ends_with(b"after the crash\n"))
                    })
                    .count();
                if landed == m {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            f.survived = Some(format!(
                "{landed} of {m} pipes still drained into their files after the crash"
            ));
        }
        drop(pipes);
        drop(c);
        drop(r);
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(s.medians(f))
}

/// A figure's table row: store off, on (to `digits` decimals) and on/off.
fn ratio_row(md: &mut String, kind: &str, figure: &str, (off, on): (f64, f64), digits: usize) {
    let ratio = if off > 0.0 { on / off } else { 0.0 };
    md.push_str(&format!(
        "| {kind} | {figure} | {off:.digits$} | {on:.digits$} | {ratio:.2} |\n"
    ));
}

/// `vh-bench fdstore [--leases N] [--logs M] [--reps R] [--out FILE]`.
pub fn main(args: &[String], bins: &Path) -> Res<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (mount namespaces, system-mode daemons)".into());
    }
    let work = PathBuf::from(format!("/var/tmp/vh-bench-fdstore-{}", std::process::id()));
    let r = run(args, bins, &work);
    match &r {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&work);
        }
        // The daemons' stderr is there.
        Err(_) => eprintln!("kept {}", work.display()),
    }
    r
}

fn run(args: &[String], bins: &Path, work: &Path) -> Res<()> {
    let mut n = 1000;
    let mut m = 200;
    let mut reps = 5;
    let mut out: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--leases" => n = val()?.parse()?,
            "--logs" => m = val()?.parse()?,
            "--reps" => reps = val()?.parse()?,
            "--out" => out = Some(PathBuf::from(val()?)),
            other => return Err(format!("unknown fdstore argument {other:?}").into()),
        }
    }
    std::fs::create_dir_all(work)?;
    let mut rows = Vec::new();
    for (kind, what, count) in [("virtlockd", "lease", n), ("virtlogd", "log open", m)] {
        // Off and on alternate, rep by rep, so that the load other work puts on a shared
        // machine falls on both alike.
        let mut runs: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for store in [false, true] {
                let f = if kind == "virtlockd" {
                    lockd(work, bins, store, count, 1)?
                } else {
                    logd(work, bins, store, count, 1)?
                };
                eprintln!("{kind} store={store}: {f:?}");
                runs[usize::from(store)].push(f);
            }
        }
        rows.push((kind, what, count, [best(&runs[0]), best(&runs[1])]));
    }
    let mut md = String::new();
    md.push_str("| daemon | figure | store off | store on | on/off |\n|---|---|---|---|---|\n");
    for (kind, what, count, p) in &rows {
        let (off, on) = (&p[0], &p[1]);
        ratio_row(
            &mut md,
            kind,
            "start-up to READY (ms)",
            (off.startup_ms, on.startup_ms),
            1,
        );
        ratio_row(
            &mut md,
            kind,
            &format!("per {what}, {count} in a row, on tmpfs (µs)"),
            (off.per_change_us, on.per_change_us),
            0,
        );
        if off.per_join_us > 0.0 {
            ratio_row(
                &mut md,
                kind,
                &format!("per change with {count} held, no file work: a 2nd owner joins each shared lease (µs)"),
                (off.per_join_us, on.per_join_us),
                0,
            );
        }
        ratio_row(
            &mut md,
            kind,
            &format!("RSS holding {count} (KiB)"),
            (off.rss_kib as f64, on.rss_kib as f64),
            0,
        );
        ratio_row(
            &mut md,
            kind,
            &format!("SIGUSR1 re-exec to READY with {count} held (ms)"),
            (off.reexec_ms, on.reexec_ms),
            1,
        );
        md.push_str(&format!(
            "| {kind} | fds in the store after the re-exec | {} | {} | |\n",
            off.stored, on.stored
        ));
        if let Some(c) = on.crash_ms {
            md.push_str(&format!(
                "| {kind} | SIGKILL → resumed from the store, READY (ms) | (all lost) | {c:.1} | |\n"
            ));
        }
        if let Some(s) = &on.survived {
            md.push_str(&format!("| {kind} | after that crash | | {s} | |\n"));
        }
    }
    print!("{md}");
    if let Some(out) = out {
        std::fs::write(out, md)?;
    }
    Ok(())
}
