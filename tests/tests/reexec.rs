//! Exec-restart (SIGUSR1) end to end, with the real binaries.
//!
//! Every daemon runs in system mode in a private mount namespace with its own tmpfs on
//! /run (`unshare -m`), so several can run side by side without touching the host's
//! /run. The daemon is started through a path P in a temporary directory (`argv[0]` =
//! P); what is at P when SIGUSR1 arrives is what the daemon execs. Every re-exec
//! replaces P with a fresh copy (a new inode), so the exec is observed as a change of
//! the inode behind `/proc/<pid>/exe`, with the pid unchanged.
//!
//! * ours → ours: virtlogd with 1000 pipes under continuous writes, virtlockd with
//!   10,000 leases;
//! * a failed exec (P deleted): the daemon stays up with everything it held;
//! * C → ours → C, for both daemons: our reader and writer of libvirt 9.0's state
//!   format against Debian 12's daemons.
//!
//! Needs root (mount namespaces, system mode) and Debian's /usr/sbin/virtlogd and
//! /usr/sbin/virtlockd; fails loudly without them. Waits are bounded; nothing is
//! asserted about timing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vh_common::connection::blocking::{CallError, Client};
use vh_common::xdr::{Decoder, Encoder};
use virtlockd::protocol as lockp;
use virtlogd::protocol as logp;

/// Upper bound of every wait in this file.
const WAIT: Duration = Duration::from_secs(60);
/// Bytes of one numbered line written into a log pipe: "PPPP SSSSSSSS\n".
const LINE_LEN: u64 = 14;

/// These tests are heavy (1000 pipes, 10,000 leases) on a small machine; run them one at
/// a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the re-exec tests need root (unshare -m, system-mode daemons)"
    );
}

/// Our binaries: next to this test's `deps/` directory (target/<profile>/), or in
/// $VH_BIN_DIR.
fn our_bin(name: &str) -> PathBuf {
    let dir = vh_testkit::bin_dir();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p virtlogd -p virtlockd` first",
        p.display()
    );
    p
}

/// Debian 12's C daemon; its absence is a failure, not a skip.
fn c_bin(name: &str) -> PathBuf {
    let p = PathBuf::from("/usr/sbin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: the C-interop re-exec tests need Debian 12's libvirt-daemon \
         (apt-get install libvirt-daemon-system)",
        p.display()
    );
    p
}

/// Soft RLIMIT_NOFILE up to the hard limit; returns the hard limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// Puts a fresh copy of `src` at `dst` (new inode, atomically), as a package upgrade
/// does.
fn install_binary(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    fs::copy(src, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    fs::rename(&tmp, dst).expect("rename binary into place");
}

/// Polls `f` until it gives `Some`, for at most [`WAIT`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn uuid_of(n: u32) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[..4].copy_from_slice(&n.to_be_bytes());
    u[6] = 0x40;
    u[8] = 0x80;
    u
}

/// One daemon in its own mount namespace; stopped (and reaped) on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    pid: i32,
    stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `argv0` (a copy of a daemon binary) as `name` with config `conf`.
    fn start(name: &'static str, argv0: &Path, conf: &Path, dir: &Path) -> Daemon {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let err = File::create(&stderr_path).expect("stderr file");
        let child = vh_testkit::Launch::new(argv0)
            .command()
            .arg("-f")
            .arg(conf)
            .env("LIBVIRT_LOG_OUTPUTS", "3:stderr")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start the daemon");
        let pid = child.id() as i32;
        let mut d = Daemon {
            name,
            child,
            pid,
            stderr_path,
        };
        let sock = d.sock();
        wait_for(&format!("{name} to listen"), || {
            d.assert_alive();
            UnixStream::connect(&sock).ok()
        });
        d
    }

    fn sock(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/libvirt/{}-sock",
            self.pid, self.name
        ))
    }

    fn state_file(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/{}-restart-exec.json",
            self.pid, self.name
        ))
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn exe_inode(&self) -> Option<u64> {
        fs::metadata(format!("/proc/{}/exe", self.pid))
            .ok()
            .map(|m| m.ino())
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "{} (pid {}) exited: {st}; stderr:\n{}",
                self.name,
                self.pid,
                self.stderr()
            );
        }
    }

    fn connect(&mut self, prog: u32) -> Client {
        self.assert_alive();
        let s = UnixStream::connect(self.sock()).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.set_write_timeout(Some(WAIT)).expect("timeout");
        Client::from_stream(s, prog, 1)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig).expect("kill");
    }

    /// Installs `next` at `argv0`, sends SIGUSR1 and waits until the new image has
    /// consumed the state file and serves a new client (`probe`). Returns the time from
    /// the signal to the first reply of the new image.
    fn reexec(&mut self, argv0: &Path, next: &Path, probe: impl Fn(&mut Client)) -> Duration {
        let before = self.exe_inode().expect("exe inode");
        install_binary(next, argv0);
        let new_ino = fs::metadata(argv0).expect("stat binary").ino();
        let t0 = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGUSR1);
        let (pid, name) = (self.pid, self.name);
        wait_for(
            &format!("{name} (pid {pid}) to exec the new binary"),
            || {
                self.assert_alive();
                match self.exe_inode() {
                    Some(i) if i != before => Some(i),
                    _ => None,
                }
            },
        );
        assert_eq!(self.exe_inode(), Some(new_ino), "exec'd something else");
        let state = self.state_file();
        wait_for("the new image to consume the state file", || {
            self.assert_alive();
            (!state.exists()).then_some(())
        });
        let prog = if self.name == "virtlogd" {
            logp::PROGRAM
        } else {
            lockp::PROGRAM
        };
        let mut c = self.connect(prog);
        probe(&mut c);
        let downtime = t0.elapsed();
        self.assert_alive();
        downtime
    }

    /// SIGUSR1 with nothing executable at argv[0]: waits for the daemon to report the
    /// failure; it must still be the same process afterwards.
    fn failed_reexec(&mut self, argv0: &Path) {
        fs::remove_file(argv0).expect("remove binary");
        self.signal(nix::sys::signal::Signal::SIGUSR1);
        wait_for("the exec failure to be reported", || {
            self.assert_alive();
            self.stderr()
                .contains("Unable to restart self")
                .then_some(())
        });
        self.assert_alive();
        let state = self.state_file();
        wait_for("the state file to be removed", || {
            (!state.exists()).then_some(())
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::env::var_os("VH_SHOW_STDERR").is_some() {
            eprintln!("--- {} stderr:\n{}---", self.name, self.stderr());
        }
        vh_testkit::stop(&mut self.child);
    }
}

/// `sleep 600` processes standing in for QEMU: real pids to register as lock owners.
struct Sleepers(Vec<Child>);

impl Sleepers {
    fn spawn(n: usize) -> Sleepers {
        Sleepers(
            (0..n)
                .map(|_| {
                    Command::new("sleep")
                        .arg("600")
                        .spawn()
                        .expect("spawn sleep")
                })
                .collect(),
        )
    }

    fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client calling the daemon in a loop, across the re-exec: every call must succeed.
struct Busy {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: JoinHandle<Result<(), String>>,
}

impl Busy {
    fn start(mut call: impl FnMut() -> Result<(), String> + Send + 'static) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (st, n) = (stop.clone(), count.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                call().map_err(|e| format!("call {}: {e}", n.load(Ordering::Relaxed)))?;
                n.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        Busy {
            stop,
            count,
            thread,
        }
    }

    /// Waits for `more` further successful calls.
    fn wait_more(&self, more: u64) {
        let base = self.count.load(Ordering::Relaxed);
        wait_for("the busy client to make progress", || {
            assert!(!self.thread.is_finished(), "the busy client failed");
            (self.count.load(Ordering::Relaxed) >= base + more).then_some(())
        });
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(())) => self.count.load(Ordering::Relaxed),
            Ok(Err(e)) => panic!("busy client: {e}"),
            Err(_) => panic!("busy client panicked"),
        }
    }
}

/// Every warning or error the daemon logged is one of `allowed`.
fn assert_quiet(d: &Daemon, allowed: &[&str]) {
    let err = d.stderr();
    for l in err.lines() {
        if (l.contains(" warning : ") || l.contains(" error : "))
            && !allowed.iter().any(|a| l.contains(a))
        {
            panic!(
                "unexpected log line from {}: {l}\nfull stderr:\n{err}",
                d.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// virtlogd

fn open_log(c: &mut Client, path: &Path, n: u32) -> OwnedFd {
    let mut e = Encoder::new();
    logp::OpenLogFileArgs {
        driver: "qemu".into(),
        dom: logp::Domain {
            uuid: uuid_of(n),
            name: format!("vm{n}"),
        },
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        flags: 0,
    }
    .encode(&mut e);
    let mut r = c
        .call(logp::proc_::DOMAIN_OPEN_LOG_FILE, e.as_bytes())
        .unwrap_or_else(|e| panic!("OpenLogFile {}: {e}", path.display()));
    assert_eq!(r.fds.len(), 1, "OpenLogFile returns one fd");
    r.fds.pop().expect("pipe fd")
}

fn log_position(c: &mut Client, path: &Path) -> Result<logp::LogFilePosition, CallError> {
    let mut e = Encoder::new();
    logp::GetLogFilePositionArgs {
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        flags: 0,
    }
    .encode(&mut e);
    let r = c.call(logp::proc_::DOMAIN_GET_LOG_FILE_POSITION, e.as_bytes())?;
    Ok(logp::LogFilePosition::decode(&mut Decoder::new(&r.payload)).expect("position reply"))
}

fn line(pipe: usize, seq: u64) -> String {
    format!("{pipe:04} {seq:08}\n")
}

/// Threads writing numbered lines round-robin into many pipes until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    counts: Arc<Vec<AtomicU64>>,
    threads: Vec<JoinHandle<Vec<(usize, File)>>>,
}

impl Writers {
    fn start(pipes: Vec<OwnedFd>, nthreads: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new((0..pipes.len()).map(|_| AtomicU64::new(0)).collect());
        let mut per: Vec<Vec<(usize, File)>> = (0..nthreads).map(|_| Vec::new()).collect();
        for (i, fd) in pipes.into_iter().enumerate() {
            per[i % nthreads].push((i, File::from(fd)));
        }
        let threads = per
            .into_iter()
            .map(|mut mine| {
                let (stop, counts) = (stop.clone(), counts.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for (i, f) in mine.iter_mut() {
                            let seq = counts[*i].load(Ordering::Relaxed);
                            // One write(2) of 14 bytes: atomic on a pipe.
                            f.write_all(line(*i, seq).as_bytes())
                                .unwrap_or_else(|e| panic!("pipe {i}, line {seq}: {e}"));
                            counts[*i].store(seq + 1, Ordering::Relaxed);
                        }
                        // Pace: about 100 lines a second per pipe.
                        thread::sleep(Duration::from_millis(10));
                    }
                    mine
                })
            })
            .collect();
        Writers {
            stop,
            counts,
            threads,
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every pipe got at least `more` lines beyond `base`.
    fn wait_progress(&self, base: &[u64], more: u64) {
        wait_for("the writers to make progress", || {
            let now = self.snapshot();
            now.iter()
                .zip(base)
                .all(|(n, b)| *n >= b + more)
                .then_some(())
        });
    }

    /// Stops the writers; returns each pipe's write end and line count, by index.
    fn stop(self) -> Vec<(File, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<(usize, File)> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("writer thread panicked"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter()
            .map(|(i, f)| (f, self.counts[i].load(Ordering::Relaxed)))
            .collect()
    }
}

/// Drains every pipe through GetLogFilePosition on `c`, then checks that each log holds
/// exactly its pipe's lines, each once, in order.
fn verify_logs(c: &mut Client, paths: &[PathBuf], written: &[(File, u64)]) -> u64 {
    let mut total = 0;
    for (i, (path, (_, n))) in paths.iter().zip(written).enumerate() {
        let pos = log_position(c, path)
            .unwrap_or_else(|e| panic!("GetLogFilePosition {}: {e}", path.display()));
        let mut got = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut got))
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let expected: String = (0..*n).map(|s| line(i, s)).collect();
        if got != expected.as_bytes() {
            let got = String::from_utf8_lossy(&got);
            let bad = got
                .lines()
                .zip(expected.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(got.lines().count().min(expected.lines().count()));
            panic!(
                "{}: {} bytes, expected {} ({n} lines); first difference at line {bad}: \
                 got {:?}, expected {:?}",
                path.display(),
                got.len(),
                expected.len(),
                got.lines().nth(bad),
                expected.lines().nth(bad)
            );
        }
        assert_eq!(pos.offset, n * LINE_LEN, "{}: position", path.display());
        total += n;
    }
    total
}

/// Starts `name` from a copy of `image` installed as `dir/name` (so a test can swap
/// the binary under argv[0] before a reload), with that daemon's test config.
fn start_installed(name: &'static str, image: &Path) -> (tempfile::TempDir, PathBuf, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let argv0 = dir.path().join(name);
    install_binary(image, &argv0);
    let conf = if name == "virtlogd" {
        write_logd_conf(dir.path())
    } else {
        write_lockd_conf(dir.path())
    };
    let d = Daemon::start(name, &argv0, &conf, dir.path());
    (dir, argv0, d)
}

fn write_logd_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("virtlogd.conf");
    // No rollover: every line stays in the one file.
    fs::write(&conf, "max_size = 0\n").expect("write conf");
    conf
}

/// What a virtlogd scenario keeps between steps.
struct LogSetup {
    paths: Vec<PathBuf>,
    writers: Writers,
    /// Connections that opened the logs and stay open across every re-exec.
    openers: Vec<Client>,
    /// Connections that never called anything before the re-exec.
    idle: Vec<Client>,
}

fn setup_logs(d: &mut Daemon, dir: &Path, npipes: usize, nconns: usize) -> LogSetup {
    let logdir = dir.join("logs");
    fs::create_dir_all(&logdir).expect("mkdir logs");
    let mut openers: Vec<Client> = (0..nconns).map(|_| d.connect(logp::PROGRAM)).collect();
    let idle: Vec<Client> = (0..3).map(|_| d.connect(logp::PROGRAM)).collect();
    let mut paths = Vec::with_capacity(npipes);
    let mut pipes = Vec::with_capacity(npipes);
    for i in 0..npipes {
        let p = logdir.join(format!("vm{i:04}.log"));
        pipes.push(open_log(&mut openers[i % nconns], &p, i as u32));
        paths.push(p);
    }
    let writers = Writers::start(pipes, 4);
    LogSetup {
        paths,
        writers,
        openers,
        idle,
    }
}

fn probe_logd(path: PathBuf) -> impl Fn(&mut Client) {
    move |c: &mut Client| {
        log_position(c, &path).expect("new client served");
    }
}

/// Ends a virtlogd scenario: stops the writers, checks every log through an old
/// connection, checks the idle old connections and a new one, closes the pipes.
fn finish_logs(d: &mut Daemon, mut s: LogSetup) -> u64 {
    let written = s.writers.stop();
    let lines = verify_logs(&mut s.openers[0], &s.paths, &written);
    for c in s.openers.iter_mut().chain(s.idle.iter_mut()) {
        log_position(c, &s.paths[0]).expect("old connection still served");
    }
    let mut fresh = d.connect(logp::PROGRAM);
    log_position(&mut fresh, &s.paths[s.paths.len() - 1]).expect("new connection served");
    drop(written);
    // Closing the write ends closes the logs in the daemon.
    let last = s.paths[s.paths.len() - 1].clone();
    wait_for("the logs to close after their pipes did", || {
        log_position(&mut fresh, &last).is_err().then_some(())
    });
    d.assert_alive();
    lines
}

/// 1. ours → ours, 1000 pipes under continuous writes, idle clients kept connected.
#[test]
fn virtlogd_reexec_ours_to_ours_1000_pipes() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);
    let pid = d.pid;

    let s = setup_logs(&mut d, dir.path(), 1000, 4);
    let busy = busy_logd(&mut d, s.paths[500].clone());
    s.writers.wait_progress(&[0; 1000], 20);
    busy.wait_more(10);
    let downtime = d.reexec(&argv0, &ours, probe_logd(s.paths[0].clone()));
    assert_eq!(d.pid, pid);
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 20);
    busy.wait_more(10);
    let calls = busy.stop();
    let lines = finish_logs(&mut d, s);
    eprintln!(
        "virtlogd ours→ours: 1000 pipes, {lines} lines verified, {calls} calls of a busy \
         client, signal→first new reply {downtime:?}"
    );
    assert_quiet(&d, &[]);
}

/// The daemon's epoll sets (tokio's and the log pump's).
fn epoll_sets(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("eventpoll"))
        .count()
}

/// ours → ours, three times: the log pump's epoll set, with its 200 pipes registered,
/// goes to the next image and is adopted there (none is left behind in the process,
/// none is added), and every pipe keeps flowing through it.
#[test]
fn virtlogd_reexec_hands_the_pump_epoll_set_over() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);
    let s = setup_logs(&mut d, dir.path(), 200, 2);
    s.writers.wait_progress(&[0; 200], 20);
    let sets = epoll_sets(d.pid);
    for i in 0..3 {
        d.reexec(&argv0, &ours, probe_logd(s.paths[i].clone()));
        let after = s.writers.snapshot();
        s.writers.wait_progress(&after, 20);
        assert_eq!(
            epoll_sets(d.pid),
            sets,
            "epoll sets after re-exec {}",
            i + 1
        );
    }
    let lines = finish_logs(&mut d, s);
    eprintln!("virtlogd pump epoll set handed over 3 times: 200 pipes, {lines} lines verified");
    assert_quiet(&d, &[]);
}

/// The fds of process `pid` open on `path`, each with whether it is close-on-exec.
fn fds_on(pid: i32, path: &Path) -> Vec<(i32, bool)> {
    use std::os::unix::fs::MetadataExt;
    // By identity, not by the link's text: a daemon in its own mount namespace under a
    // chroot (.ci/fresh-machine) shows its files by their path from the real root.
    let id = |m: fs::Metadata| (m.dev(), m.ino());
    let want = id(fs::metadata(path).expect("stat log file"));
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        if fs::metadata(e.path()).ok().map(id) != Some(want) {
            continue;
        }
        let fd: i32 = e.file_name().to_string_lossy().parse().expect("fd number");
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .expect("fdinfo flags");
        out.push((fd, flags & libc::O_CLOEXEC as u32 != 0));
    }
    out
}

/// Opens `n` logs and writes one line into each; returns the paths and write ends
/// once every line is in its file (so each log has its file open).
fn logs_with_a_line(d: &mut Daemon, dir: &Path, n: usize) -> (Client, Vec<PathBuf>, Vec<File>) {
    let logdir = dir.join("logs");
    fs::create_dir_all(&logdir).expect("mkdir logs");
    let mut c = d.connect(logp::PROGRAM);
    let mut paths = Vec::new();
    let mut pipes = Vec::new();
    for i in 0..n {
        let p = logdir.join(format!("vm{i:04}.log"));
        let mut w = File::from(open_log(&mut c, &p, i as u32));
        w.write_all(line(i, 0).as_bytes()).expect("write line");
        paths.push(p);
        pipes.push(w);
    }
    for p in &paths {
        wait_for("the first line in the file", || {
            (fs::metadata(p).ok()?.len() == LINE_LEN).then_some(())
        });
    }
    (c, paths, pipes)
}

/// ours → ours, twice: each log's file goes to the next image open (the same fd, not
/// closed and reopened by path; log files are inheritable all along, as their pipes
/// are), and the first use there keeps it and appends after what the old image wrote.
#[test]
fn virtlogd_reexec_into_ours_hands_the_files_over() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);
    let (mut c, paths, mut pipes) = logs_with_a_line(&mut d, dir.path(), 20);
    let before: Vec<i32> = paths
        .iter()
        .map(|p| match fds_on(d.pid, p)[..] {
            [(fd, false)] => fd,
            ref other => panic!("{}: before re-exec {other:?}", p.display()),
        })
        .collect();
    for round in 1..=2u64 {
        // The probe uses log 0, so that one is used in the new image and the rest not.
        d.reexec(&argv0, &ours, probe_logd(paths[0].clone()));
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(
                fds_on(d.pid, p),
                [(before[i], false)],
                "{} after re-exec {round}",
                p.display()
            );
        }
        let comm = fs::read_to_string(format!("/proc/{}/comm", d.pid)).expect("comm");
        assert_eq!(comm.trim_end(), "virtlogd", "process name after re-exec");
        for (i, w) in pipes.iter_mut().enumerate() {
            w.write_all(line(i, round).as_bytes()).expect("write line");
        }
        for (i, p) in paths.iter().enumerate() {
            let want: String = (0..=round).map(|s| line(i, s)).collect();
            wait_for("the line after re-exec in the file", || {
                (fs::read_to_string(p).ok()? == want).then_some(())
            });
            let pos = log_position(&mut c, p).expect("position");
            assert_eq!(pos.offset, (round + 1) * LINE_LEN, "{}", p.display());
        }
    }
    drop(pipes);
    d.assert_alive();
    assert_quiet(&d, &[]);
}

/// ours → a program that is not ours (a script, which then runs libvirt's C daemon):
/// no log file reaches it open, though they are inheritable in our image; the C
/// daemon takes the pipes and opens the files itself, once each.
#[test]
fn virtlogd_reexec_into_a_stranger_hands_no_files_over() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let c_daemon = c_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);
    // One round into ours first: the files it carries over (inheritable until used)
    // must not reach the stranger either.
    let (_c, paths, mut pipes) = logs_with_a_line(&mut d, dir.path(), 20);
    d.reexec(&argv0, &ours, probe_logd(paths[0].clone()));
    let dump = dir.path().join("fds-after-exec");
    let script = format!(
        "#!/bin/sh\nls -l /proc/$$/fd > {dump}.tmp && mv {dump}.tmp {dump}\nexec {c} \"$@\"\n",
        dump = dump.display(),
        c = c_daemon.display()
    );
    let tmp = argv0.with_extension("new");
    fs::write(&tmp, script).expect("write script");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod script");
    fs::rename(&tmp, &argv0).expect("install script");
    let c_ino = fs::metadata(&c_daemon).expect("stat C daemon").ino();
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for("the script to run the C daemon", || {
        d.assert_alive();
        (d.exe_inode() == Some(c_ino) && !d.state_file().exists()).then_some(())
    });
    let listing = fs::read_to_string(&dump).expect("the script's fd listing");
    for p in &paths {
        let name = p.to_string_lossy();
        assert!(
            // Its tail: under a chroot the link names the file from the real root.
            !listing.lines().any(|l| l.ends_with(&*name)),
            "{name} reached the next program open:\n{listing}"
        );
    }
    let mut c = d.connect(logp::PROGRAM);
    for (i, (p, w)) in paths.iter().zip(pipes.iter_mut()).enumerate() {
        w.write_all(line(i, 1).as_bytes()).expect("write line");
        let want = format!("{}{}", line(i, 0), line(i, 1));
        wait_for("the C daemon to write the line", || {
            (fs::read_to_string(p).ok()? == want).then_some(())
        });
        log_position(&mut c, p).expect("position from the C daemon");
        assert_eq!(
            fds_on(d.pid, p).len(),
            1,
            "{}: fds in the C daemon",
            p.display()
        );
    }
    drop(pipes);
    d.assert_alive();
}

/// A connection calling GetLogFilePosition in a loop.
fn busy_logd(d: &mut Daemon, path: PathBuf) -> Busy {
    let mut c = d.connect(logp::PROGRAM);
    Busy::start(move || {
        log_position(&mut c, &path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// 3a. A failed exec (argv[0] gone): virtlogd keeps its pid, pipes and clients.
#[test]
fn virtlogd_failed_exec_keeps_everything() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);

    let s = setup_logs(&mut d, dir.path(), 50, 2);
    let busy = busy_logd(&mut d, s.paths[7].clone());
    s.writers.wait_progress(&[0; 50], 20);
    busy.wait_more(10);
    d.failed_reexec(&argv0);
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 20);
    busy.wait_more(10);
    busy.stop();
    let lines = finish_logs(&mut d, s);
    eprintln!("virtlogd failed exec: 50 pipes, {lines} lines verified");
    assert_quiet(&d, &["Unable to restart self"]);
}

/// 4a. C → ours → C with open logs, writers and connected clients.
#[test]
fn virtlogd_reexec_c_to_ours_to_c() {
    let _g = serial();
    require_root();
    raise_nofile();
    let c = c_bin("virtlogd");
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &c);

    let s = setup_logs(&mut d, dir.path(), 40, 2);
    s.writers.wait_progress(&[0; 40], 20);
    let t1 = d.reexec(&argv0, &ours, probe_logd(s.paths[0].clone()));
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 20);
    let t2 = d.reexec(&argv0, &c, probe_logd(s.paths[1].clone()));
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 20);
    let lines = finish_logs(&mut d, s);
    eprintln!("virtlogd C→ours ({t1:?}) → C ({t2:?}): 40 pipes, {lines} lines verified");
    // The only error: the position of a log after its pipe closed (finish_logs).
    assert_quiet(&d, &["No open log file"]);
}

// ---------------------------------------------------------------------------------
// virtlockd

fn call_lock(c: &mut Client, proc_: i32, args: &[u8]) -> Result<(), CallError> {
    c.call(proc_, args).map(|_| ())
}

fn register(c: &mut Client, sleepers: &Sleepers, k: usize) {
    let mut e = Encoder::new();
    lockp::RegisterArgs {
        owner: lockp::Owner {
            uuid: uuid_of(k as u32 + 1),
            name: format!("vm{k}"),
            id: k as u32 + 1,
            pid: sleepers.pid(k),
        },
        flags: 0,
    }
    .encode(&mut e);
    call_lock(c, lockp::proc_::REGISTER, e.as_bytes()).expect("REGISTER");
}

fn create_lockspace(c: &mut Client, dir: &Path) {
    let mut e = Encoder::new();
    e.string(dir.to_str().expect("utf-8 path"));
    call_lock(c, lockp::proc_::CREATE_LOCKSPACE, e.as_bytes()).expect("CREATE_LOCKSPACE");
}

fn resource(
    c: &mut Client,
    proc_: i32,
    space: &str,
    name: &str,
    flags: u32,
) -> Result<(), CallError> {
    let mut e = Encoder::new();
    lockp::ResourceArgs {
        path: space.into(),
        name: name.into(),
        flags,
    }
    .encode(&mut e);
    call_lock(c, proc_, e.as_bytes())
}

fn acquire(c: &mut Client, space: &str, name: &str, flags: u32) -> Result<(), CallError> {
    resource(c, lockp::proc_::ACQUIRE_RESOURCE, space, name, flags)
}

fn release(c: &mut Client, space: &str, name: &str) -> Result<(), CallError> {
    resource(c, lockp::proc_::RELEASE_RESOURCE, space, name, 0)
}

/// The fcntl lock on byte 0 of `path` as another process sees it: (type, pid), or None
/// when unlocked or gone.
fn lock_on(path: &Path) -> Option<(i32, i32)> {
    let f = File::open(path).ok()?;
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_GETLK on an open fd with a valid, initialised struct flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_GETLK {}", path.display());
    (i32::from(fl.l_type) != libc::F_UNLCK).then_some((i32::from(fl.l_type), fl.l_pid))
}

/// One lease of the scenario: where, which owners, shared or not.
struct Lease {
    space: String,
    name: String,
    file: PathBuf,
    owners: Vec<usize>,
    shared: bool,
}

/// Builds `nexcl` exclusive and `nshared` shared leases in the directory lockspace and
/// `dexcl` / `dshared` in the default lockspace, spread over `nowners` owners.
fn plan_leases(dir: &Path, disks: &Path, nowners: usize, counts: [usize; 4]) -> Vec<Lease> {
    let [nexcl, nshared, dexcl, dshared] = counts;
    let space = dir.to_str().expect("utf-8").to_string();
    let mut v = Vec::new();
    for i in 0..nexcl + nshared {
        let name = format!("{:064x}", i + 1);
        let shared = i >= nexcl;
        v.push(Lease {
            space: space.clone(),
            file: dir.join(&name),
            name,
            owners: if shared {
                vec![i % nowners, (i + 1) % nowners]
            } else {
                vec![i % nowners]
            },
            shared,
        });
    }
    for i in 0..dexcl + dshared {
        let file = disks.join(format!("disk{i:05}.img"));
        File::create(&file).expect("create disk");
        let shared = i >= dexcl;
        v.push(Lease {
            space: String::new(),
            name: file.to_str().expect("utf-8").to_string(),
            file,
            owners: if shared {
                vec![i % nowners, (i + 1) % nowners]
            } else {
                vec![i % nowners]
            },
            shared,
        });
    }
    v
}

fn lease_flags(l: &Lease) -> u32 {
    let mut f = if l.shared { lockp::ACQUIRE_SHARED } else { 0 };
    if !l.space.is_empty() {
        f |= lockp::ACQUIRE_AUTOCREATE;
    }
    f
}

/// Every lease is held by `pid`, with the right lock type, as another process sees it.
fn check_held(leases: &[Lease], pid: i32) {
    for l in leases {
        let want = if l.shared {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match lock_on(&l.file) {
            Some((t, p)) => {
                // Our daemon's leases are OFD locks, which F_GETLK reports with pid -1
                // (they belong to the open file, not a process); a C daemon's are POSIX.
                assert!(
                    p == pid || p == -1,
                    "{}: lock held by pid {p}",
                    l.file.display()
                );
                assert_eq!(t, want, "{}: lock type", l.file.display());
            }
            None => panic!("{}: not locked any more", l.file.display()),
        }
    }
}

/// What a virtlockd scenario keeps between steps.
struct LockSetup {
    sleepers: Sleepers,
    leases: Vec<Lease>,
    /// Owner 0's registered connection, open across every re-exec.
    kept: Client,
}

fn setup_leases(d: &mut Daemon, dir: &Path, nowners: usize, counts: [usize; 4]) -> LockSetup {
    // Owners 0..nowners hold the leases; nowners is a stranger, nowners + 1 is busy.
    let sleepers = Sleepers::spawn(nowners + 2);
    let lockdir = dir.join("lockspace");
    let disks = dir.join("disks");
    fs::create_dir_all(&lockdir).expect("mkdir lockspace");
    fs::create_dir_all(&disks).expect("mkdir disks");
    let leases = plan_leases(&lockdir, &disks, nowners, counts);
    let mut conns: Vec<Client> = (0..nowners)
        .map(|k| {
            let mut c = d.connect(lockp::PROGRAM);
            register(&mut c, &sleepers, k);
            c
        })
        .collect();
    create_lockspace(&mut conns[0], &lockdir);
    for l in &leases {
        for &o in &l.owners {
            acquire(&mut conns[o], &l.space, &l.name, lease_flags(l))
                .unwrap_or_else(|e| panic!("acquire {} for owner {o}: {e}", l.name));
        }
    }
    // libvirtd's acquire connections close once the leases are taken; owner 0's stays.
    let kept = conns.swap_remove(0);
    drop(conns);
    check_held(&leases, d.pid);
    LockSetup {
        sleepers,
        leases,
        kept,
    }
}

/// A registered connection acquiring and releasing a lease of its own in a loop.
fn busy_lockd(d: &mut Daemon, s: &LockSetup, dir: &Path, nowners: usize) -> Busy {
    let mut c = d.connect(lockp::PROGRAM);
    register(&mut c, &s.sleepers, nowners + 1);
    let space = dir.join("lockspace").to_str().expect("utf-8").to_string();
    Busy::start(move || {
        acquire(&mut c, &space, "busy", lockp::ACQUIRE_AUTOCREATE).map_err(|e| e.to_string())?;
        release(&mut c, &space, "busy").map_err(|e| e.to_string())
    })
}

fn probe_lockd(sleepers: &Sleepers, k: usize) -> impl Fn(&mut Client) + '_ {
    move |c: &mut Client| register(c, sleepers, k)
}

/// After the last re-exec: conflicts refused, releases through the kept connection
/// unlock, new clients can take what was freed.
fn finish_leases(d: &mut Daemon, s: LockSetup, nowners: usize) {
    let LockSetup {
        sleepers,
        leases,
        mut kept,
    } = s;
    check_held(&leases, d.pid);
    // A new owner: every conflicting acquire is refused by the daemon.
    let stranger = nowners;
    let mut c = d.connect(lockp::PROGRAM);
    register(&mut c, &sleepers, stranger);
    let excl = leases.iter().filter(|l| !l.shared);
    let shared = leases.iter().filter(|l| l.shared);
    let step = |n: usize| (n / 50).max(1);
    let (nx, ns) = (excl.clone().count(), shared.clone().count());
    for l in excl.step_by(step(nx)).chain(shared.step_by(step(ns))) {
        let flags = if l.shared { 0 } else { lockp::ACQUIRE_SHARED };
        for f in [flags, lease_flags(l) & !lockp::ACQUIRE_SHARED] {
            let r = acquire(&mut c, &l.space, &l.name, f);
            assert!(
                matches!(r, Err(CallError::Remote(_))),
                "conflicting acquire of {} (flags {f}) was not refused: {r:?}",
                l.name
            );
        }
    }
    check_held(&leases, d.pid);
    // Owner 0 releases through the connection that stayed open across the re-exec.
    let mine: Vec<&Lease> = leases.iter().filter(|l| l.owners.contains(&0)).collect();
    for l in &mine {
        release(&mut kept, &l.space, &l.name)
            .unwrap_or_else(|e| panic!("release {} by owner 0: {e}", l.name));
    }
    for l in &mine {
        match lock_on(&l.file) {
            None => {
                assert!(
                    l.owners == [0],
                    "{}: a shared co-owner still holds it",
                    l.name
                );
                // What was released can be taken by someone else.
                acquire(&mut c, &l.space, &l.name, lease_flags(l))
                    .unwrap_or_else(|e| panic!("re-acquire released {}: {e}", l.name));
                assert!(lock_on(&l.file).is_some());
            }
            Some((t, p)) => {
                assert!(p == d.pid || p == -1, "held by pid {p}");
                assert!(
                    l.shared && t == libc::F_RDLCK && l.owners.len() > 1,
                    "{}",
                    l.name
                );
            }
        }
    }
    d.assert_alive();
}

fn write_lockd_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("virtlockd.conf");
    fs::write(&conf, "max_clients = 1024\n").expect("write conf");
    conf
}

/// 2. ours → ours with 10,000 leases in a directory lockspace and the default one.
#[test]
fn virtlockd_reexec_ours_to_ours_10000_leases() {
    let _g = serial();
    require_root();
    let hard = raise_nofile();
    assert!(
        hard >= 10_500,
        "RLIMIT_NOFILE hard limit {hard} is too low for 10,000 lock fds"
    );
    let ours = our_bin("virtlockd");
    let (dir, argv0, mut d) = start_installed("virtlockd", &ours);
    let pid = d.pid;

    let nowners = 4;
    let s = setup_leases(&mut d, dir.path(), nowners, [7000, 1000, 1500, 500]);
    assert_eq!(s.leases.len(), 10_000);
    let busy = busy_lockd(&mut d, &s, dir.path(), nowners);
    busy.wait_more(10);
    let downtime = d.reexec(&argv0, &ours, probe_lockd(&s.sleepers, nowners));
    assert_eq!(d.pid, pid);
    busy.wait_more(10);
    busy.stop();
    finish_leases(&mut d, s, nowners);
    assert_quiet(&d, &[]);
    eprintln!("virtlockd ours→ours: 10000 leases held across, signal→first new reply {downtime:?}");
}

/// 3b. A failed exec: virtlockd keeps its pid, every lease and its clients.
#[test]
fn virtlockd_failed_exec_keeps_everything() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlockd");
    let (dir, argv0, mut d) = start_installed("virtlockd", &ours);

    let nowners = 3;
    let s = setup_leases(&mut d, dir.path(), nowners, [60, 20, 15, 5]);
    let busy = busy_lockd(&mut d, &s, dir.path(), nowners);
    busy.wait_more(10);
    d.failed_reexec(&argv0);
    busy.wait_more(10);
    busy.stop();
    finish_leases(&mut d, s, nowners);
    assert_quiet(&d, &["Unable to restart self"]);
}

/// 4b. C → ours → C with leases of every kind and a connection kept open.
#[test]
fn virtlockd_reexec_c_to_ours_to_c() {
    let _g = serial();
    require_root();
    raise_nofile();
    let c = c_bin("virtlockd");
    let ours = our_bin("virtlockd");
    let (dir, argv0, mut d) = start_installed("virtlockd", &c);

    let nowners = 3;
    let s = setup_leases(&mut d, dir.path(), nowners, [60, 20, 15, 5]);
    let t1 = d.reexec(&argv0, &ours, probe_lockd(&s.sleepers, nowners));
    check_held(&s.leases, d.pid);
    let t2 = d.reexec(&argv0, &c, probe_lockd(&s.sleepers, nowners));
    finish_leases(&mut d, s, nowners);
    eprintln!("virtlockd C→ours ({t1:?}) → C ({t2:?}): 100 leases held across both");
    // The only errors: the conflicting acquires finish_leases makes on purpose.
    assert_quiet(&d, &["is locked"]);
}

// ---------------------------------------------------------------------------------
// Re-exec under any timing: reload storms, and clients caught half way through a
// request or a reply.

/// Bit of SIGUSR1 in the masks of /proc/PID/status.
const USR1_BIT: u64 = 1 << (libc::SIGUSR1 - 1);

/// A signal mask line ("SigBlk", "SigCgt", "ShdPnd", ...) of the daemon's main thread.
fn sig_mask(pid: i32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        u64::from_str_radix(v.trim(), 16).ok()
    })
}

/// `n` SIGUSR1 1 ms apart; the daemon must be alive after each. (Before the fix, a
/// release build died within a few dozen at this pace: one landed between `execve`
/// and the new image's handler.)
fn storm(d: &mut Daemon, n: usize) {
    for _ in 0..n {
        d.signal(nix::sys::signal::Signal::SIGUSR1);
        thread::sleep(Duration::from_millis(1));
        d.assert_alive();
    }
}

/// Waits until no reload is left: the state file consumed, SIGUSR1 neither blocked
/// (ours unblocks it once it serves) nor pending, and a new client served.
fn settle_reloads(d: &mut Daemon, probe: &dyn Fn(&mut Client)) {
    let (pid, state) = (d.pid, d.state_file());
    for _ in 0..2 {
        wait_for("the reloads to settle", || {
            d.assert_alive();
            let quiet = !state.exists()
                && sig_mask(pid, "SigBlk")? & USR1_BIT == 0
                && (sig_mask(pid, "ShdPnd")? | sig_mask(pid, "SigPnd")?) & USR1_BIT == 0;
            quiet.then_some(())
        });
        let prog = if d.name == "virtlogd" {
            logp::PROGRAM
        } else {
            lockp::PROGRAM
        };
        probe(&mut d.connect(prog));
    }
}

/// Sends SIGUSR1 while the exec into `next` (already at argv[0]) is under way, until
/// the new image has consumed the state file: the signals land in the old image's
/// hand-off or in the new image's start-up, never after a C image installed its own
/// handler (a C image re-executing a C image is libvirt's own window, not ours).
fn storm_through_exec(d: &mut Daemon, max: usize) -> usize {
    let state = d.state_file();
    let before = d.exe_inode().expect("exe inode");
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    let mut sent = 1;
    // The state file appears before the exec and goes when the new image read it.
    wait_for("the hand-off to begin", || {
        d.assert_alive();
        (state.exists() || d.exe_inode() != Some(before)).then_some(())
    });
    while sent < max && state.exists() {
        d.signal(nix::sys::signal::Signal::SIGUSR1);
        sent += 1;
        thread::sleep(Duration::from_millis(1));
    }
    wait_for("the new image to take over", || {
        d.assert_alive();
        (d.exe_inode() != Some(before) && !state.exists()).then_some(())
    });
    sent
}

/// SIGUSR1 to a C daemon whose argv[0] is now ours; returns once our image runs and
/// holds SIGUSR1 (blocked: the first thing our `main` does), from when on any number
/// of reloads is safe.
fn c_execs_ours(d: &mut Daemon) {
    let before = d.exe_inode().expect("exe inode");
    let pid = d.pid;
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for("our image to start", || {
        d.assert_alive();
        (d.exe_inode() != Some(before)
            && (sig_mask(pid, "SigBlk")? & USR1_BIT != 0 || !d.state_file().exists()))
        .then_some(())
    });
}

/// A C image that must keep answering reloads: SIGUSR1 caught, not blocked.
fn assert_c_hears_reloads(d: &Daemon) {
    let blk = sig_mask(d.pid, "SigBlk").expect("SigBlk");
    let cgt = sig_mask(d.pid, "SigCgt").expect("SigCgt");
    assert_eq!(blk & USR1_BIT, 0, "the C image inherited a blocked SIGUSR1");
    assert_ne!(cgt & USR1_BIT, 0, "the C image does not catch SIGUSR1");
}

/// 5a. 100 SIGUSR1 1 ms apart against virtlockd holding 10,000 leases, with a live
/// owner connection and a busy client: same pid, every lease held throughout.
#[test]
fn virtlockd_reload_storm_10000_leases() {
    let _g = serial();
    require_root();
    let hard = raise_nofile();
    assert!(hard >= 10_500, "RLIMIT_NOFILE hard limit {hard} is too low");
    let ours = our_bin("virtlockd");
    let (dir, _argv0, mut d) = start_installed("virtlockd", &ours);
    let pid = d.pid;

    let nowners = 4;
    let s = setup_leases(&mut d, dir.path(), nowners, [7000, 1000, 1500, 500]);
    let busy = busy_lockd(&mut d, &s, dir.path(), nowners);
    busy.wait_more(10);
    storm(&mut d, 100);
    check_held(&s.leases, pid);
    settle_reloads(&mut d, &probe_lockd(&s.sleepers, nowners));
    assert_eq!(d.pid, pid);
    busy.wait_more(10);
    busy.stop();
    finish_leases(&mut d, s, nowners);
    assert_quiet(&d, &[]);
}

/// 5b. The same storm against virtlogd with writers on 200 pipes: every line lands,
/// once, in order.
#[test]
fn virtlogd_reload_storm_with_writers() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, _argv0, mut d) = start_installed("virtlogd", &ours);
    let pid = d.pid;

    let s = setup_logs(&mut d, dir.path(), 200, 4);
    let busy = busy_logd(&mut d, s.paths[100].clone());
    s.writers.wait_progress(&[0; 200], 10);
    busy.wait_more(10);
    storm(&mut d, 100);
    settle_reloads(&mut d, &probe_logd(s.paths[0].clone()));
    assert_eq!(d.pid, pid);
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 10);
    busy.wait_more(10);
    busy.stop();
    let lines = finish_logs(&mut d, s);
    eprintln!("virtlogd reload storm: 200 pipes, {lines} lines verified");
    assert_quiet(&d, &[]);
}

/// Bytes the peer has not read yet of what we sent (SIOCOUTQ).
fn unread_by_peer(s: &UnixStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer; the fd is open.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ");
    n
}

/// Bytes waiting to be read on our side (SIOCINQ).
fn readable_now(s: &UnixStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int through the pointer; the fd is open.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "SIOCINQ");
    n
}

fn call_frame(prog: u32, proc_: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    let h = vh_common::protocol::Header {
        prog,
        vers: 1,
        proc_,
        type_: vh_common::protocol::msg_type::CALL,
        serial,
        status: vh_common::protocol::status::OK,
    };
    vh_common::protocol::encode_frame(&h, None, args)
}

/// Reads one reply from `c` and checks it answers `serial` without an error.
fn expect_ok_reply(c: &mut Client, serial: u32) -> Vec<u8> {
    let mut s = c.stream().try_clone().expect("clone stream");
    let r = vh_common::connection::blocking::read_reply(&mut s).expect("reply");
    assert_eq!(r.header.serial, serial, "reply to another call");
    assert_eq!(
        r.header.status,
        vh_common::protocol::status::OK,
        "call failed: {:?}",
        vh_common::RpcError::decode(&mut Decoder::new(&r.payload))
    );
    r.payload
}

/// 6a. Clients caught with half a length word and with half a frame when SIGUSR1
/// arrives both complete their call after the re-exec, on the same connection.
#[test]
fn virtlockd_reexec_resumes_half_sent_requests() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlockd");
    let (dir, argv0, mut d) = start_installed("virtlockd", &ours);
    let sleepers = Sleepers::spawn(3);
    let space = dir.path().join("lockspace");
    fs::create_dir_all(&space).expect("mkdir");
    let space_s = space.to_str().expect("utf-8").to_string();

    let mut conns: Vec<Client> = (0..2)
        .map(|k| {
            let mut c = d.connect(lockp::PROGRAM);
            register(&mut c, &sleepers, k);
            c
        })
        .collect();
    create_lockspace(&mut conns[0], &space);
    let frames: Vec<Vec<u8>> = (0..2)
        .map(|k| {
            let mut e = Encoder::new();
            lockp::ResourceArgs {
                path: space_s.clone(),
                name: format!("half{k}"),
                flags: lockp::ACQUIRE_AUTOCREATE,
            }
            .encode(&mut e);
            // Serial 0 was REGISTER, 1 was CREATE_LOCKSPACE on conns[0].
            call_frame(
                lockp::PROGRAM,
                lockp::proc_::ACQUIRE_RESOURCE,
                7,
                e.as_bytes(),
            )
        })
        .collect();
    // Half a length word, and the length word plus part of the body.
    let cut = [2, 4 + 13];
    for k in 0..2 {
        conns[k]
            .stream()
            .write_all(&frames[k][..cut[k]])
            .expect("write first part");
    }
    for c in &conns {
        wait_for("the daemon to read the first part", || {
            (unread_by_peer(c.stream()) == 0).then_some(())
        });
    }
    d.reexec(&argv0, &ours, probe_lockd(&sleepers, 2));
    for k in 0..2 {
        conns[k]
            .stream()
            .write_all(&frames[k][cut[k]..])
            .expect("write the rest");
        expect_ok_reply(&mut conns[k], 7);
        let (_, holder) = lock_on(&space.join(format!("half{k}"))).expect("lease taken");
        // OFD leases are reported with pid -1 (see `check_held`).
        assert!(holder == d.pid || holder == -1, "held by pid {holder}");
    }
    assert_quiet(&d, &[]);
}

/// 6b. A client that does not read its (2 MiB) reply when SIGUSR1 arrives gets all of
/// it after the re-exec, and the connection goes on.
#[test]
fn virtlogd_reexec_delivers_an_unread_reply() {
    let _g = serial();
    require_root();
    raise_nofile();
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);

    let path = dir.path().join("big.log");
    let content: Vec<u8> = (0..2u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    fs::write(&path, &content).expect("write log");
    let mut c = d.connect(logp::PROGRAM);
    let mut e = Encoder::new();
    logp::ReadLogFileArgs {
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        pos: logp::LogFilePosition {
            inode: fs::metadata(&path).expect("stat log").ino(),
            offset: 0,
        },
        maxlen: content.len() as u64,
        flags: 0,
    }
    .encode(&mut e);
    c.stream()
        .write_all(&call_frame(
            logp::PROGRAM,
            logp::proc_::DOMAIN_READ_LOG_FILE,
            3,
            e.as_bytes(),
        ))
        .expect("send call");
    // The reply has begun and fills the socket: the daemon is stuck writing it.
    wait_for("the reply to start", || {
        (readable_now(c.stream()) > 0).then_some(())
    });
    d.reexec(&argv0, &ours, |c: &mut Client| {
        // No log is open at that path: an error reply, but a reply.
        match log_position(c, &path) {
            Ok(_) | Err(CallError::Remote(_)) => {}
            Err(e) => panic!("new client not served: {e}"),
        }
    });
    let payload = expect_ok_reply(&mut c, 3);
    let got = Decoder::new(&payload)
        .string_lossless(8 << 20)
        .expect("string");
    assert_eq!(got.len(), content.len(), "reply length");
    assert!(got == content, "reply content differs");
    log_position(&mut c, &path).expect_err("no open log at that path");
    assert_quiet(&d, &["No open log file"]);
}

/// 5c. virtlockd: a storm through the exec from ours into C (the C image must survive
/// the signals of its start-up and still answer reloads), then C → ours with a storm
/// from our start-up on. A client caught half way through a request rides along: C
/// must ignore the key that carries it.
#[test]
fn virtlockd_reload_storm_ours_to_c_to_ours() {
    let _g = serial();
    require_root();
    raise_nofile();
    let c = c_bin("virtlockd");
    let ours = our_bin("virtlockd");
    let (dir, argv0, mut d) = start_installed("virtlockd", &ours);
    let pid = d.pid;

    let nowners = 3;
    let s = setup_leases(&mut d, dir.path(), nowners, [60, 20, 15, 5]);
    // An admin client with half a length word: its state carries the extra key.
    let admin = UnixStream::connect(format!("/proc/{pid}/root/run/libvirt/virtlockd-admin-sock"))
        .expect("connect admin");
    (&admin).write_all(&[0, 0]).expect("half a length word");
    wait_for("the daemon to read it", || {
        (unread_by_peer(&admin) == 0).then_some(())
    });

    install_binary(&c, &argv0);
    let sent = storm_through_exec(&mut d, 50);
    d.assert_alive();
    assert_eq!(d.pid, pid);
    check_held(&s.leases, pid);
    // C restored everything, and can still be reloaded.
    probe_lockd(&s.sleepers, nowners)(&mut d.connect(lockp::PROGRAM));
    assert_c_hears_reloads(&d);

    install_binary(&ours, &argv0);
    c_execs_ours(&mut d);
    storm(&mut d, 100);
    check_held(&s.leases, pid);
    settle_reloads(&mut d, &probe_lockd(&s.sleepers, nowners));
    assert_eq!(d.pid, pid);
    finish_leases(&mut d, s, nowners);
    drop(admin);
    eprintln!("virtlockd ours→C with {sent} signals through the exec, C→ours + 100: leases held");
    assert_quiet(&d, &["is locked"]);
}

/// 5d. virtlogd: the same, with writers on 40 pipes; every line lands.
#[test]
fn virtlogd_reload_storm_ours_to_c_to_ours() {
    let _g = serial();
    require_root();
    raise_nofile();
    let c = c_bin("virtlogd");
    let ours = our_bin("virtlogd");
    let (dir, argv0, mut d) = start_installed("virtlogd", &ours);
    let pid = d.pid;

    let s = setup_logs(&mut d, dir.path(), 40, 2);
    s.writers.wait_progress(&[0; 40], 10);
    install_binary(&c, &argv0);
    let sent = storm_through_exec(&mut d, 50);
    assert_eq!(d.pid, pid);
    probe_logd(s.paths[0].clone())(&mut d.connect(logp::PROGRAM));
    assert_c_hears_reloads(&d);
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 10);

    install_binary(&ours, &argv0);
    c_execs_ours(&mut d);
    storm(&mut d, 100);
    settle_reloads(&mut d, &probe_logd(s.paths[1].clone()));
    assert_eq!(d.pid, pid);
    let after = s.writers.snapshot();
    s.writers.wait_progress(&after, 10);
    let lines = finish_logs(&mut d, s);
    eprintln!(
        "virtlogd ours→C with {sent} signals through the exec, C→ours + 100: {lines} lines verified"
    );
    assert_quiet(&d, &["No open log file"]);
}
