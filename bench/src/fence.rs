//! `vh-bench fence`: what a network partition does to an exclusive lease across two hosts,
//! libvirt 9.0's C virtlockd against ours with lease renewal, on the real GlusterFS bed of
//! `tests/gluster/bed.sh` (one volume, FUSE-mounted by host A and host B, each client in
//! its own network namespace). Writes `bench/FENCING.md`.
//!
//! Per trial (C and ours alternate, so that a slow phase of the machine does not land on
//! one of them only): host A's owner, a real process (`sleep`) that holds its own lock
//! connection as QEMU does (connected from the owner process, registered with its pid),
//! holds an exclusive lease; host B's daemon refuses it. Then A's link is cut and B asks
//! for the lease every 50 ms. Measured from the moment the cut command returned:
//! (a) until A's owner is dead (reaped by us, its parent, polled every 2 ms), (b) until B
//! acquired the lease, and (c) the window between the two. C never kills the owner: the
//! trial then watches it for `--hold` seconds after B acquired and reports the overlap as
//! open (at least that long; in production it lasts until the owner exits by itself).
//! Then the link heals and the trial measures how soon A's daemon serves a lease on the
//! volume again. For ours it also times, while A's link is still cut, a local lockspace's
//! acquire+release on A's daemon every 100 ms for 5 s after the fence: the fenced owner's
//! connection has just closed and its lease is being released on the dead mount, which
//! must not stall the daemon.
//!
//! Each host's daemon runs in system mode in private mount and UTS namespaces (its own
//! `/run`, hostname `vhg-A` or `vhg-B`, so that the two renewal heartbeats in one
//! lockspace do not collide). The bench brings the bed up with `bed.sh up` and down
//! again at the end, and refuses to start when a bed is already up (another run's).

use crate::daemon::{Bins, Impl, Res};
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vh_common::connection::blocking::{CallError, Client};
use vh_common::error::code;
use vh_common::xdr::Encoder;
use vh_testkit::Launch;
use virtlockd::protocol as kp;

const USAGE: &str = "vh-bench fence [--trials N] [--renew-interval S] [--renew-timeout S] \
                     [--hold S] [--settle S] [--out DIR]";

/// Owner pids registered by the bench's own (non-owner) connections: above the kernel's
/// pid range, so that no daemon ever kills a process for them.
const FAKE_PID: u32 = 4_190_000;

/// The volume `bed.sh` creates.
const VOLUME: &str = "vhgv";

/// The volume options that decide the lock-recovery time, as the bed set them.
const BED_OPTIONS: [&str; 6] = [
    "network.ping-timeout",
    "server.tcp-user-timeout",
    "client.tcp-user-timeout",
    "server.keepalive-time",
    "server.keepalive-interval",
    "server.keepalive-count",
];

struct Opts {
    trials: usize,
    renew_interval: u64,
    renew_timeout: u64,
    hold: Duration,
    /// How long the lease is held before the cut.
    settle: Duration,
    out: PathBuf,
}

fn progress(msg: &str) {
    eprintln!("[vh-bench fence] {msg}");
}

/// `args`: everything after `fence`. Our daemons are the ones next to this binary; the
/// report goes to `<workspace>/bench` unless `--out` says otherwise.
pub fn main(args: &[String]) -> Res<()> {
    let exe = std::env::current_exe()?;
    let ours_dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
    // target/{debug,release}/vh-bench → <workspace>/bench
    let out = ours_dir
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("bench"), |w| w.join("bench"));
    let bins = Bins { ours_dir };
    let mut o = Opts {
        trials: 6,
        renew_interval: 1,
        renew_timeout: 4,
        hold: Duration::from_secs(10),
        settle: Duration::from_secs(2),
        out,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value; {USAGE}"))
        };
        match a.as_str() {
            "--trials" => o.trials = val()?.parse()?,
            "--renew-interval" => o.renew_interval = val()?.parse()?,
            "--renew-timeout" => o.renew_timeout = val()?.parse()?,
            "--hold" => o.hold = Duration::from_secs_f64(val()?.parse()?),
            "--settle" => o.settle = Duration::from_secs_f64(val()?.parse()?),
            "--out" => o.out = PathBuf::from(val()?),
            "-h" | "--help" => {
                println!("usage: {USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}; {USAGE}").into()),
        }
    }
    if o.trials == 0 || o.renew_interval == 0 || o.renew_timeout == 0 {
        return Err(format!("trials, renewal interval and timeout must be > 0; {USAGE}").into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (network namespaces, FUSE mounts, unshare)".into());
    }
    let work = PathBuf::from(format!("/var/tmp/vh-bench-fence-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let r = run(&o, &bins, &work);
    let _ = fs::remove_dir_all(&work);
    r
}

fn run(o: &Opts, bins: &Bins, work: &Path) -> Res<()> {
    let bed = Bed::up(&bins.ours_dir)?;
    let settings = bed.settings();
    let load_start = loadavg();
    let started = Instant::now();
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let renewal = format!(
        "lease_renew_interval = {}\nlease_renew_timeout = {}\n",
        o.renew_interval, o.renew_timeout
    );
    // One pair of hosts per implementation, each with its own lockspace on the volume.
    let mut pairs = Vec::new();
    for imp in [Impl::C, Impl::Ours] {
        let extra = if imp == Impl::Ours {
            renewal.as_str()
        } else {
            ""
        };
        let tag = crate::daemon::tag(imp);
        let a = HostDaemon::spawn(bins, imp, "A", extra, work)?;
        let b = HostDaemon::spawn(bins, imp, "B", extra, work)?;
        let rel = format!("fence-{tag}");
        let mut cb = connect(&b.socket())?;
        let ls_b = bed.mount("B").join(&rel);
        create_lockspace(&mut cb, &ls_b)?;
        register(&mut cb, FAKE_PID + 1, "host-b")?;
        let local = work.join(format!("local-{tag}"));
        fs::create_dir_all(&local)?;
        pairs.push(Pair {
            imp,
            a,
            b,
            ls_a: bed.mount("A").join(&rel),
            ls_b,
            cb,
            local,
        });
    }
    let mut trials = Vec::new();
    for n in 1..=o.trials {
        for p in pairs.iter_mut() {
            let t = trial(o, &bed, p, n).map_err(|e| {
                format!(
                    "{} trial {n}: {e}; A's daemon said:\n{}",
                    p.imp.label(),
                    p.a.log()
                )
            })?;
            progress(&t.summary());
            trials.push(t);
        }
    }
    let kills: Vec<usize> = pairs
        .iter()
        .map(|p| p.a.log().matches("owner killed").count())
        .collect();
    for p in pairs.iter_mut() {
        if !p.a.running() {
            return Err(format!("{}: A's daemon died:\n{}", p.imp.label(), p.a.log()).into());
        }
    }
    drop(pairs);
    let md = report(&Report {
        o,
        settings: &settings,
        trials: &trials,
        kills: &kills,
        date,
        elapsed: started.elapsed(),
        load_start,
        load_end: loadavg(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    });
    fs::create_dir_all(&o.out)?;
    let file = o.out.join("FENCING.md");
    fs::write(&file, md)?;
    progress(&format!("wrote {}", file.display()));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The bed
// ---------------------------------------------------------------------------------------

/// The GlusterFS bed, up for the bench's lifetime (`bed.sh down` on drop).
struct Bed {
    script: PathBuf,
    dir: PathBuf,
}

impl Bed {
    fn up(ours_dir: &Path) -> Res<Bed> {
        // target/{debug,release}/ → <workspace>/tests/gluster/bed.sh
        let script = ours_dir
            .parent()
            .and_then(Path::parent)
            .map(|w| w.join("tests/gluster/bed.sh"))
            .filter(|p| p.exists())
            .ok_or("tests/gluster/bed.sh not found next to the build directory")?;
        let dir =
            PathBuf::from(std::env::var_os("VH_GLUSTER_DIR").unwrap_or("/tmp/vh-gluster".into()));
        // bed.sh up tears down whatever bed is there first: never someone else's.
        let netns = sh("ip", &["netns", "list"]);
        if netns.split_whitespace().any(|n| n == "vhg-srv") {
            return Err(
                "a GlusterFS bed is already up (network namespace vhg-srv): another \
                        run of tests/gluster? If it is stale: tests/gluster/bed.sh down"
                    .into(),
            );
        }
        progress("bringing the GlusterFS bed up (tests/gluster/bed.sh up)");
        let bed = Bed { script, dir };
        bed.run("up", None)?;
        Ok(bed)
    }

    fn run(&self, action: &str, host: Option<&str>) -> Res<()> {
        let st = Command::new(&self.script)
            .arg(action)
            .args(host)
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            return Err(format!("bed.sh {action} {}: {st}", host.unwrap_or("")).into());
        }
        Ok(())
    }

    fn mount(&self, host: &str) -> PathBuf {
        self.dir.join(format!("m{host}"))
    }

    /// The volume options that set the lock-recovery time, read back from glusterd.
    fn settings(&self) -> Vec<(String, String)> {
        let pid = fs::read_to_string(self.dir.join("glusterd.pid")).unwrap_or_default();
        BED_OPTIONS
            .iter()
            .map(|opt| {
                let out = sh(
                    "nsenter",
                    &[
                        "-t",
                        pid.trim(),
                        "-m",
                        "-n",
                        "gluster",
                        "--mode=script",
                        "volume",
                        "get",
                        VOLUME,
                        opt,
                    ],
                );
                let val = out
                    .lines()
                    .find(|l| l.starts_with(opt))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("?")
                    .to_string();
                (opt.to_string(), val)
            })
            .collect()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        progress("tearing the GlusterFS bed down (tests/gluster/bed.sh down)");
        if let Err(e) = self.run("down", None) {
            progress(&format!("{e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hosts' daemons
// ---------------------------------------------------------------------------------------

/// One host's virtlockd: system mode, private `/run` and hostname.
struct HostDaemon {
    child: Child,
    pid: u32,
    stderr: PathBuf,
}

impl HostDaemon {
    fn spawn(bins: &Bins, imp: Impl, host: &str, extra: &str, work: &Path) -> Res<HostDaemon> {
        let bin = bins.path(crate::daemon::Kind::Lockd, imp);
        if !bin.exists() {
            return Err(format!("{} not found (cargo build -p virtlockd)", bin.display()).into());
        }
        let tag = format!("{}-{host}", crate::daemon::tag(imp));
        let conf = work.join(format!("virtlockd-{tag}.conf"));
        fs::write(
            &conf,
            format!("log_level = 3\nlog_outputs = \"3:stderr\"\n{extra}"),
        )?;
        let stderr = work.join(format!("virtlockd-{tag}.stderr"));
        let log = fs::File::create(&stderr)?;
        // Private mounts with a fresh /run, and a hostname of its own: set up in the
        // child before exec by the kit (no shell line).
        let child = crate::daemon::launch(
            Launch::new(&bin).hostname(format!("vhg-{host}")),
            &conf,
            log,
        )?;
        let mut d = HostDaemon {
            pid: child.id(),
            child,
            stderr,
        };
        let t0 = Instant::now();
        while UnixStream::connect(d.socket()).is_err() {
            if !d.running() || t0.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "{} virtlockd for host {host} did not start:\n{}",
                    imp.label(),
                    d.log()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/libvirt/virtlockd-sock",
            self.pid
        ))
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child, not yet reaped.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while self.running() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Lock calls
// ---------------------------------------------------------------------------------------

fn client(stream: UnixStream) -> Res<Client> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    Ok(Client::from_stream(stream, kp::PROGRAM, kp::VERSION))
}

fn connect(sock: &Path) -> Res<Client> {
    client(UnixStream::connect(sock)?)
}

fn create_lockspace(c: &mut Client, dir: &Path) -> Res<()> {
    let mut e = Encoder::new();
    e.string(&dir.to_string_lossy());
    c.call(kp::proc_::CREATE_LOCKSPACE, e.as_bytes())?;
    Ok(())
}

fn register(c: &mut Client, pid: u32, name: &str) -> Res<()> {
    let mut uuid = [0xfe; 16];
    uuid[..4].copy_from_slice(&pid.to_be_bytes());
    let a = kp::RegisterArgs {
        owner: kp::Owner {
            uuid,
            name: name.to_string(),
            id: 1,
            pid,
        },
        flags: 0,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    c.call(kp::proc_::REGISTER, e.as_bytes())?;
    Ok(())
}

fn resource(c: &mut Client, proc_: i32, dir: &Path, name: &str) -> Result<(), CallError> {
    let flags = if proc_ == kp::proc_::ACQUIRE_RESOURCE {
        kp::ACQUIRE_AUTOCREATE
    } else {
        0
    };
    let a = kp::ResourceArgs {
        path: dir.to_string_lossy().into_owned(),
        name: name.to_string(),
        flags,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    c.call(proc_, e.as_bytes()).map(|_| ())
}

/// `Ok(true)`: acquired; `Ok(false)`: refused as busy (held elsewhere).
fn try_acquire(c: &mut Client, dir: &Path, name: &str) -> Res<bool> {
    match resource(c, kp::proc_::ACQUIRE_RESOURCE, dir, name) {
        Ok(()) => Ok(true),
        Err(CallError::Remote(e)) if e.code == code::RESOURCE_BUSY => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn release(c: &mut Client, dir: &Path, name: &str) -> Res<()> {
    Ok(resource(c, kp::proc_::RELEASE_RESOURCE, dir, name)?)
}

/// A real owner process (`sleep`) holding `name` exclusively in `ls` over its own
/// connection to `sock`, as QEMU holds the one libvirt hands it: connected from the owner
/// process (the daemon sees its pid as the peer) and registered with its pid. Our copy of
/// the socket is closed on return, so the connection closes when the owner dies.
fn spawn_owner(sock: &Path, ls: &Path, name: &str) -> Res<Child> {
    let (mut child, conn) = vh_testkit::Sleeper {
        secs: 3600,
        keep_connection: true,
        ignore_sigterm: false,
    }
    .spawn_connected(sock)
    .map_err(|e| format!("owner connecting to {}: {e}", sock.display()))?;
    let setup = (|| -> Res<()> {
        let mut c = client(conn)?;
        create_lockspace(&mut c, ls)?;
        register(&mut c, child.id(), "vm-fence")?;
        Ok(resource(&mut c, kp::proc_::ACQUIRE_RESOURCE, ls, name)?)
    })();
    if let Err(e) = setup {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("owner set-up: {e}").into());
    }
    Ok(child)
}

// ---------------------------------------------------------------------------------------
// One trial
// ---------------------------------------------------------------------------------------

struct Pair {
    imp: Impl,
    a: HostDaemon,
    b: HostDaemon,
    ls_a: PathBuf,
    ls_b: PathBuf,
    /// Host B's connection, asking for the lease.
    cb: Client,
    /// A lockspace on local disk, served by A's daemon throughout.
    local: PathBuf,
}

#[derive(Debug, Clone)]
struct Trial {
    imp: Impl,
    n: usize,
    /// How long `bed.sh cut A` took, ms (the link is down once it returned).
    cut_ms: f64,
    /// (a) seconds from the cut until A's owner was dead, if it died before the trial ended.
    fenced: Option<f64>,
    /// (b) seconds from the cut until host B acquired the lease.
    acquired: f64,
    /// Seconds from the cut until the trial stopped watching A's owner.
    ended: f64,
    /// A's daemon in the 5 s after the fence (ours).
    after_fence: Option<AfterFence>,
    /// Seconds from the heal until A's daemon granted a lease on the volume again.
    serves_after_heal: f64,
    /// Whether B's lease file was still there (as B sees it) once A served again.
    b_file_kept: bool,
}

impl Trial {
    /// (c) B acquired minus A's owner died: positive, the owner was dead first (margin);
    /// `Err(overlap)`: B got the lease while the owner still ran, for at least `overlap`.
    fn window(&self) -> Result<f64, f64> {
        match self.fenced {
            Some(f) if f < self.acquired => Ok(self.acquired - f),
            Some(f) => Err(f - self.acquired),
            None => Err(self.ended - self.acquired),
        }
    }

    fn summary(&self) -> String {
        let fenced = self
            .fenced
            .map_or("never (alive at trial end)".into(), |f| format!("{f:.2} s"));
        let window = match self.window() {
            Ok(m) => format!("owner dead {m:.2} s before B acquired"),
            Err(o) if self.fenced.is_none() => {
                format!("OVERLAP: B acquired while A's owner ran, >= {o:.2} s")
            }
            Err(o) => format!("OVERLAP: B acquired {o:.2} s before A's owner died"),
        };
        format!(
            "{} trial {}: owner dead {fenced}; B acquired {:.2} s after the cut; {window}; A \
             serves again {:.2} s after the heal",
            self.imp.label(),
            self.n,
            self.acquired,
            self.serves_after_heal
        )
    }
}

/// Waits for A's heartbeat in the lockspace (as host B reads it) to list the lease: ours
/// has begun renewing it.
fn wait_renewing(ls_b: &Path, name: &str, owner: u32) -> Res<()> {
    let hb = ls_b.join(".virtlockd-renew.vhg-A");
    let want = format!("lease={name} exclusive owners={owner}\n");
    let t0 = Instant::now();
    while !fs::read_to_string(&hb).is_ok_and(|t| t.contains(&want)) {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("A's heartbeat {} never listed {name}", hb.display()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What A's daemon did in the 5 s after the fence (ours).
#[derive(Debug, Clone, Default)]
struct AfterFence {
    /// Local acquire+release round trips made, and the slowest, ms.
    calls: usize,
    worst_ms: f64,
    /// Round trips after which some daemon thread other than the renewal probes was
    /// waiting for an answer from FUSE (the fenced owner's release on the dead mount), and
    /// those threads' names.
    pending: usize,
    waiters: Vec<String>,
}

/// The names of `pid`'s threads waiting for an answer from FUSE, renewal probes excepted.
fn fuse_waiters(pid: u32) -> Vec<String> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let wchan = fs::read_to_string(t.join("wchan")).ok()?;
            let comm = fs::read_to_string(t.join("comm")).ok()?.trim().to_string();
            (wchan.contains("request_wait_answer") && comm != "lease-probe").then_some(comm)
        })
        .collect()
}

/// Times local acquire+release round trips on A's daemon every 100 ms for 5 s (it has a
/// fenced owner's lease to release on a dead mount meanwhile), sampling its threads.
fn after_fence(sock: &Path, pid: u32, local: &Path, n: usize) -> Res<AfterFence> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut r = AfterFence::default();
    let name = format!("local-{n}");
    while Instant::now() < end {
        let t = Instant::now();
        let mut c = connect(sock)?;
        create_lockspace(&mut c, local)?;
        register(&mut c, FAKE_PID + 2, "local")?;
        resource(&mut c, kp::proc_::ACQUIRE_RESOURCE, local, &name)?;
        release(&mut c, local, &name)?;
        r.worst_ms = r.worst_ms.max(t.elapsed().as_secs_f64() * 1e3);
        r.calls += 1;
        let w = fuse_waiters(pid);
        if !w.is_empty() {
            r.pending += 1;
        }
        for comm in w {
            if !r.waiters.contains(&comm) {
                r.waiters.push(comm);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(r)
}

/// Watches the owner from its parent: when it died, and (ours) A's daemon's local round
/// trips right after.
struct Watch {
    died: Arc<Mutex<Option<Instant>>>,
    local: Arc<Mutex<Option<Result<AfterFence, String>>>>,
    stop: Arc<AtomicBool>,
    owner: Arc<Mutex<Child>>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    fn start(owner: Child, local_probe: Option<(PathBuf, u32, PathBuf, usize)>) -> Watch {
        let died: Arc<Mutex<Option<Instant>>> = Default::default();
        let local: Arc<Mutex<Option<Result<AfterFence, String>>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let owner = Arc::new(Mutex::new(owner));
        let thread = {
            let (died, local, stop, owner) =
                (died.clone(), local.clone(), stop.clone(), owner.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let gone = owner
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .try_wait()
                        .map_or(true, |s| s.is_some());
                    if gone {
                        *died.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                        if let Some((sock, pid, dir, n)) = local_probe {
                            let r = after_fence(&sock, pid, &dir, n).map_err(|e| e.to_string());
                            *local.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Watch {
            died,
            local,
            stop,
            owner,
            thread,
        }
    }

    fn died(&self) -> Option<Instant> {
        *self.died.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kills the owner if it still runs, and collects the watcher.
    fn finish(self) -> Option<Result<AfterFence, String>> {
        self.stop.store(true, Ordering::Relaxed);
        {
            let mut o = self.owner.lock().unwrap_or_else(|e| e.into_inner());
            let _ = o.kill();
            let _ = o.wait();
        }
        let _ = self.thread.join();
        self.local.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn trial(o: &Opts, bed: &Bed, p: &mut Pair, n: usize) -> Res<Trial> {
    let name = format!("disk-{n}");
    let owner = spawn_owner(&p.a.socket(), &p.ls_a, &name)?;
    let pid = owner.id();
    let acquired_early = try_acquire(&mut p.cb, &p.ls_b, &name);
    let probe = (p.imp == Impl::Ours).then(|| (p.a.socket(), p.a.pid, p.local.clone(), n));
    let watch = Watch::start(owner, probe);
    match acquired_early {
        Ok(false) => {}
        Ok(true) => {
            watch.finish();
            return Err("host B acquired the lease A's owner holds, before any cut".into());
        }
        Err(e) => {
            watch.finish();
            return Err(e);
        }
    }
    if p.imp == Impl::Ours {
        if let Err(e) = wait_renewing(&p.ls_b, &name, pid) {
            watch.finish();
            return Err(e);
        }
    }
    // Steady state: the lease held for a while, as a running guest's is.
    std::thread::sleep(o.settle);

    let t0 = Instant::now();
    if let Err(e) = bed.run("cut", Some("A")) {
        watch.finish();
        return Err(e);
    }
    let cut = Instant::now();
    let cut_ms = (cut - t0).as_secs_f64() * 1e3;
    let acquired = loop {
        match try_acquire(&mut p.cb, &p.ls_b, &name) {
            Ok(true) => break Instant::now(),
            Ok(false) => {}
            Err(e) => {
                let _ = bed.run("heal", Some("A"));
                watch.finish();
                return Err(format!("host B's acquire: {e}").into());
            }
        }
        if cut.elapsed() > Duration::from_secs(120) {
            let _ = bed.run("heal", Some("A"));
            watch.finish();
            return Err("host B never got the lease after A's link was cut".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Watch A's owner for `hold` more (C's never dies; ours is normally dead already).
    let until = acquired + o.hold;
    while watch.died().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ended = Instant::now();
    let died = watch.died();
    // Give the local round trips (ours) their 5 s while the link is still cut.
    if let Some(d) = died {
        let probe_end = d + Duration::from_millis(5300);
        if p.imp == Impl::Ours && Instant::now() < probe_end {
            std::thread::sleep(probe_end - Instant::now());
        }
    }
    let local = watch.finish();

    bed.run("heal", Some("A"))?;
    let healed = Instant::now();
    let probe = format!("after-heal-{n}");
    let serves_after_heal = loop {
        let r = connect(&p.a.socket()).and_then(|mut c| {
            create_lockspace(&mut c, &p.ls_a)?;
            register(&mut c, FAKE_PID + 3, "after-heal")?;
            if try_acquire(&mut c, &p.ls_a, &probe)? {
                let t = healed.elapsed();
                release(&mut c, &p.ls_a, &probe)?;
                Ok(Some(t))
            } else {
                Ok(None)
            }
        });
        if let Ok(Some(t)) = r {
            break t.as_secs_f64();
        }
        if healed.elapsed() > Duration::from_secs(120) {
            return Err(
                format!("A's daemon does not serve the volume after the heal: {r:?}").into(),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let b_file_kept = p.ls_b.join(&name).exists();
    release(&mut p.cb, &p.ls_b, &name)?;
    if !p.a.running() || !p.b.running() {
        return Err("a host's daemon died".into());
    }
    let since = |t: Instant| (t - cut).as_secs_f64();
    Ok(Trial {
        imp: p.imp,
        n,
        cut_ms,
        fenced: died.filter(|&d| d <= ended).map(since),
        acquired: since(acquired),
        ended: since(ended),
        after_fence: match local {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => return Err(format!("local round trips on A: {e}").into()),
            None => None,
        },
        serves_after_heal,
        b_file_kept,
    })
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

struct Report<'a> {
    o: &'a Opts,
    settings: &'a [(String, String)],
    trials: &'a [Trial],
    kills: &'a [usize],
    date: String,
    elapsed: Duration,
    load_start: String,
    load_end: String,
    command: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// "min / median / max" of `v`, in seconds (or "–").
fn mmm(v: &[f64], unit: &str) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let f = |x: f64| {
        if unit == "ms" {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    format!("{} / {} / {} {unit}", f(s[0]), f(med), f(s[s.len() - 1]))
}

fn report(r: &Report) -> String {
    let o = r.o;
    let mut md = String::new();
    let setting = |k: &str| {
        r.settings
            .iter()
            .find(|(n, _)| n == k)
            .map_or("?".to_string(), |(_, v)| v.clone())
    };
    md.push_str("# Fencing across hosts: libvirt 9.0's C virtlockd vs ours (GlusterFS bed)\n\n");
    md.push_str(&format!(
        "Generated by `{}` (bench/src/fence.rs) on {}, {} trials per daemon in {:.0} s; \
         load average {} at the start, {} at the end ({} cores, kernel {}, {}).\n\n",
        r.command,
        r.date,
        o.trials,
        r.elapsed.as_secs_f64(),
        r.load_start,
        r.load_end,
        sh("nproc", &[]),
        sh("uname", &["-r"]),
        sh("glusterfs", &["--version"])
            .lines()
            .next()
            .unwrap_or("glusterfs ?"),
    ));
    md.push_str(
        "Host A's owner, a real process holding its own lock connection (as QEMU does: \
         connected from the owner, registered with its pid), holds an exclusive lease on a \
         directory lockspace on the GlusterFS volume; host B's daemon refuses it. The bench \
         cuts A's link (`tests/gluster/bed.sh cut A`; times count from the moment that \
         command returned, when the link is down) while B asks for the lease every 50 ms. \
         Both hosts run the same daemon: libvirt 9.0's C virtlockd (Debian 12), or ours \
         with lease renewal. A's owner is polled every 2 ms by its parent (the bench).\n\n",
    );
    md.push_str("## Settings\n\n");
    md.push_str(&format!(
        "* The bed (`tests/gluster/bed.sh`): `network.ping-timeout` {}, \
         `server.tcp-user-timeout` {}, `client.tcp-user-timeout` {}, server keepalive \
         time/interval/count {}/{}/{} (read back from glusterd). The brick gave a cut \
         client's locks away {} after the cut in these trials (column (b)).\n",
        setting("network.ping-timeout"),
        setting("server.tcp-user-timeout"),
        setting("client.tcp-user-timeout"),
        setting("server.keepalive-time"),
        setting("server.keepalive-interval"),
        setting("server.keepalive-count"),
        {
            let b: Vec<f64> = r.trials.iter().map(|t| t.acquired).collect();
            let lo = b.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = b.iter().copied().fold(0.0, f64::max);
            format!("{lo:.1}-{hi:.1} s")
        }
    ));
    md.push_str(&format!(
        "* Ours, on both hosts: `lease_renew_interval = {}`, `lease_renew_timeout = {}`, \
         `lease_loss_action = \"kill\"` (the default). The C daemon has no renewal.\n",
        o.renew_interval, o.renew_timeout
    ));
    md.push_str(&format!(
        "* A's owner holds the lease for {:.1} s before the cut (`--settle`). A trial \
         watches A's owner for {:.0} s after B acquired; a C owner still running then is \
         reported as an open overlap (in production it lasts until the owner exits by \
         itself). Then the link heals.\n\n",
        o.settle.as_secs_f64(),
        o.hold.as_secs_f64()
    ));

    md.push_str("## Summary (min / median / max)\n\n");
    md.push_str(
        "| daemon | (a) cut → A's owner dead | (b) cut → B acquired | (c) A's owner dead → B \
         acquired | overlap (B holds, A's owner runs) | A serves again after the heal |\n\
         |---|---|---|---|---|---|\n",
    );
    for imp in [Impl::C, Impl::Ours] {
        let ts: Vec<&Trial> = r.trials.iter().filter(|t| t.imp == imp).collect();
        let fenced: Vec<f64> = ts.iter().filter_map(|t| t.fenced).collect();
        let acq: Vec<f64> = ts.iter().map(|t| t.acquired).collect();
        let margins: Vec<f64> = ts.iter().filter_map(|t| t.window().ok()).collect();
        let overlaps: Vec<f64> = ts.iter().filter_map(|t| t.window().err()).collect();
        let open = ts.iter().filter(|t| t.fenced.is_none()).count();
        let heal: Vec<f64> = ts.iter().map(|t| t.serves_after_heal).collect();
        let fenced_s = if fenced.len() == ts.len() {
            mmm(&fenced, "s")
        } else if fenced.is_empty() {
            format!("never ({} of {} trials)", ts.len(), ts.len())
        } else {
            format!(
                "{} ({} of {} never)",
                mmm(&fenced, "s"),
                ts.len() - fenced.len(),
                ts.len()
            )
        };
        let margin_s = if margins.is_empty() {
            "– (never dead first)".into()
        } else {
            format!(
                "{} ({} of {} trials)",
                mmm(&margins, "s"),
                margins.len(),
                ts.len()
            )
        };
        let overlap_s = if overlaps.is_empty() {
            format!("none in {} trials", ts.len())
        } else if open > 0 {
            format!(
                "{} of {} trials, open: ≥ {} (the owner still ran when the trial ended)",
                overlaps.len(),
                ts.len(),
                mmm(&overlaps, "s")
            )
        } else {
            format!(
                "{} of {} trials: {}",
                overlaps.len(),
                ts.len(),
                mmm(&overlaps, "s")
            )
        };
        md.push_str(&format!(
            "| {} | {fenced_s} | {} | {margin_s} | {overlap_s} | {} |\n",
            imp.label(),
            mmm(&acq, "s"),
            mmm(&heal, "s")
        ));
    }
    let after: Vec<&AfterFence> = r
        .trials
        .iter()
        .filter_map(|t| t.after_fence.as_ref())
        .collect();
    let worst: Vec<f64> = after.iter().map(|a| a.worst_ms).collect();
    let calls: usize = after.iter().map(|a| a.calls).sum();
    let pending: usize = after.iter().map(|a| a.pending).sum();
    let mut waiters: Vec<&str> = after
        .iter()
        .flat_map(|a| a.waiters.iter().map(String::as_str))
        .collect();
    waiters.sort_unstable();
    waiters.dedup();
    md.push_str(&format!(
        "\nOurs, after the fence and while A's link was still cut: the fenced owner's \
         connection has closed, so A's daemon releases its lease on the dead mount. A's \
         daemon answered {calls} acquire+release round trips on a local lockspace (a new \
         connection each, every 100 ms for 5 s after the owner died); the slowest per \
         trial: {}. After {pending} of them a daemon thread other than the renewal probes \
         was waiting for FUSE (`request_wait_answer`), i.e. the release was still pending \
         on the dead mount while the daemon answered; those threads: {}.\n",
        mmm(&worst, "ms"),
        if waiters.is_empty() {
            "none seen".to_string()
        } else {
            waiters.join(", ")
        }
    ));
    md.push_str(&format!(
        "\nA's daemon logged \"owner killed\" {} times (C) and {} times (ours); both A \
         daemons ran to the end. B's lease file was still in place after every heal: {}.\n",
        r.kills.first().copied().unwrap_or(0),
        r.kills.get(1).copied().unwrap_or(0),
        if r.trials.iter().all(|t| t.b_file_kept) {
            "yes".to_string()
        } else {
            let bad: Vec<String> = r
                .trials
                .iter()
                .filter(|t| !t.b_file_kept)
                .map(|t| format!("{} trial {}", t.imp.label(), t.n))
                .collect();
            format!("NO ({})", bad.join(", "))
        }
    ));

    md.push_str("\n## Trials\n\n");
    md.push_str(
        "| daemon | trial | cut cmd | (a) cut → owner dead | (b) cut → B acquired | (c) \
         window | slowest local RPC after the fence | heal → A serves |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for t in r.trials {
        let window = match t.window() {
            Ok(m) => format!("owner dead {m:.2} s before B acquired"),
            Err(ov) if t.fenced.is_none() => {
                format!("**overlap ≥ {ov:.2} s**, owner still running at the trial's end")
            }
            Err(ov) => format!("**overlap {ov:.2} s** (B acquired first)"),
        };
        md.push_str(&format!(
            "| {} | {} | {:.0} ms | {} | {:.2} s | {window} | {} | {:.2} s |\n",
            t.imp.label(),
            t.n,
            t.cut_ms,
            t.fenced.map_or("never".into(), |f| format!("{f:.2} s")),
            t.acquired,
            t.after_fence.as_ref().map_or("–".into(), |a| format!(
                "{:.1} ms ({} calls, {} with the release pending)",
                a.worst_ms, a.calls, a.pending
            )),
            t.serves_after_heal
        ));
    }
    md.push_str(
        "\nRe-run (as root, no other GlusterFS bed up; about 5 minutes): `cargo build -p \
         virtlockd -p vh-bench && target/debug/vh-bench fence` (or the release build). \
         See README.md, \"Lease renewal and fencing across hosts\", for the rule these \
         settings follow and the file systems the design covers.\n",
    );
    md
}
