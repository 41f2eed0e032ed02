//! `vh-bench soak [--reexecs N] [logd|lockd]`: N SIGUSR1 re-execs of each of our
//! daemons, one after the other, under load. Not a timed test: it counts what a
//! re-exec must never lose.
//!
//! * virtlogd: writer threads stream numbered lines into 50 log pipes while a busy
//!   client asks for a log position in a loop; at the end every log must hold exactly
//!   its pipe's lines (bytes lost = bytes written that are not in the log, in order).
//! * virtlockd: 10 owner connections hold 1,000 leases, 4 busy owners acquire and
//!   release a lease of their own in a loop; at the end every lease must still be
//!   locked by the daemon (F_GETLK from this process) and each holder's connection
//!   must release and re-take one of its own.
//!
//! Clients lost = connections that failed a call or were closed, including the busy
//! ones (every call must succeed).

use crate::daemon::{Daemon, Impl, Kind, Res};
use crate::{lockd, logd, progress, reexec_downtime, Ctx};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const PIPES: usize = 50;
const LEASES: usize = 1000;
const HOLDERS: usize = 10;
const BUSY: usize = 4;

/// What one daemon's soak found.
#[derive(Debug, Default)]
pub struct Soak {
    pub reexecs: usize,
    /// Median and worst signal → first reply of the new image, ms.
    pub downtime_p50_ms: f64,
    pub downtime_max_ms: f64,
    /// Calls the busy clients made, all of which succeeded.
    pub busy_calls: u64,
    /// virtlogd: bytes written into the pipes.
    pub bytes_written: u64,
    pub bytes_lost: u64,
    /// virtlockd: leases held throughout.
    pub leases: usize,
    pub leases_lost: usize,
    pub clients: usize,
    pub clients_lost: usize,
    pub elapsed: Duration,
}

impl Soak {
    pub fn line(&self, kind: Kind) -> String {
        match kind {
            Kind::Logd => format!(
                "virtlogd: {} re-execs in {:.0} s (signal→first reply p50 {:.1} ms, max {:.1} ms); \
                 {} bytes written into {PIPES} pipes, bytes lost {}; {} busy calls; \
                 clients lost {} of {}",
                self.reexecs,
                self.elapsed.as_secs_f64(),
                self.downtime_p50_ms,
                self.downtime_max_ms,
                self.bytes_written,
                self.bytes_lost,
                self.busy_calls,
                self.clients_lost,
                self.clients
            ),
            Kind::Lockd => format!(
                "virtlockd: {} re-execs in {:.0} s (signal→first reply p50 {:.1} ms, max {:.1} ms); \
                 {} leases held, leases lost {}; {} busy acquire/release calls; \
                 clients lost {} of {}",
                self.reexecs,
                self.elapsed.as_secs_f64(),
                self.downtime_p50_ms,
                self.downtime_max_ms,
                self.leases,
                self.leases_lost,
                self.busy_calls,
                self.clients_lost,
                self.clients
            ),
        }
    }

    pub fn clean(&self) -> bool {
        self.bytes_lost == 0 && self.leases_lost == 0 && self.clients_lost == 0
    }
}

/// Threads calling the daemon in a loop until stopped; each counts its calls and
/// stops at its first failure (that client is lost).
struct Busy {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl Busy {
    fn start(mut calls: Vec<Box<dyn FnMut() -> Res<()> + Send>>) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let threads = calls
            .drain(..)
            .map(|mut call| {
                let (stop, count) = (stop.clone(), count.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        call().map_err(|e| e.to_string())?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Busy {
            stop,
            calls: count,
            threads,
        }
    }

    /// Stops the threads; returns (calls, clients lost).
    fn stop(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let mut lost = 0;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    progress(&format!("soak: a busy client failed: {e}"));
                    lost += 1;
                }
                Err(_) => lost += 1,
            }
        }
        (self.calls.load(Ordering::Relaxed), lost)
    }
}

/// `n` re-execs, each waited for until the new image answers a new client.
fn reexecs(
    d: &mut Daemon,
    n: usize,
    ping: fn(&mut vh_common::connection::blocking::Client) -> Res<()>,
    soak: &mut Soak,
) -> Res<()> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        if !d.alive() {
            return Err(format!("{} died after {i} re-execs", d.kind.name()).into());
        }
        times.push(reexec_downtime(d, ping)?);
        if (i + 1) % 100 == 0 {
            progress(&format!("soak {}: {} re-execs", d.kind.name(), i + 1));
        }
    }
    times.sort_by(f64::total_cmp);
    soak.reexecs = n;
    soak.downtime_p50_ms = times.get(n / 2).copied().unwrap_or(0.0);
    soak.downtime_max_ms = times.last().copied().unwrap_or(0.0);
    Ok(())
}

fn line(pipe: usize, seq: u64) -> String {
    format!("{pipe:03} {seq:010}\n")
}

/// A log and its rotated backups, oldest first, as one byte string.
fn log_contents(path: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for i in (1..=9).rev() {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        if let Ok(b) = fs::read(PathBuf::from(p)) {
            all.extend(b);
        }
    }
    if let Ok(b) = fs::read(path) {
        all.extend(b);
    }
    all
}

pub fn logd(cx: &Ctx, n: usize) -> Res<Soak> {
    let t0 = Instant::now();
    let mut soak = Soak::default();
    let mut d = cx.spawn(Kind::Logd, Impl::Ours)?;
    let dir = cx.dir("soak-logd");
    logd::fresh_dir(&dir)?;
    let mut opener = logd::connect(&d)?;
    let mut idle = logd::connect(&d)?;
    let paths: Vec<PathBuf> = (0..PIPES)
        .map(|i| dir.join(format!("vm{i:03}.log")))
        .collect();
    let mut pipes = Vec::with_capacity(PIPES);
    for (i, p) in paths.iter().enumerate() {
        pipes.push(logd::open_log(&mut opener, p, i)?);
    }
    // Writers: two threads, each line one write(2) (atomic on a pipe).
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut per: Vec<Vec<(usize, File)>> = vec![Vec::new(), Vec::new()];
    for (i, f) in pipes.into_iter().enumerate() {
        per[i % 2].push((i, f));
    }
    for mut mine in per {
        let stop = stop.clone();
        writers.push(thread::spawn(
            move || -> Result<Vec<(usize, u64, File)>, String> {
                let mut seq = vec![0u64; mine.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (k, (i, f)) in mine.iter_mut().enumerate() {
                        f.write_all(line(*i, seq[k]).as_bytes())
                            .map_err(|e| format!("pipe {i}: {e}"))?;
                        seq[k] += 1;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(mine
                    .into_iter()
                    .zip(seq)
                    .map(|((i, f), s)| (i, s, f))
                    .collect())
            },
        ));
    }
    let probe_path = paths[0].clone();
    let busy_calls: Vec<Box<dyn FnMut() -> Res<()> + Send>> = (0..2)
        .map(|_| {
            let mut c = logd::connect(&d)?;
            let path = probe_path.clone();
            let f: Box<dyn FnMut() -> Res<()> + Send> =
                Box::new(move || position(&mut c, &path).map(|_| ()));
            Ok(f)
        })
        .collect::<Res<_>>()?;
    let busy = Busy::start(busy_calls);
    soak.clients = 2 + 2;
    let res = reexecs(&mut d, n, logd::ping, &mut soak);
    let (calls, busy_lost) = busy.stop();
    soak.busy_calls = calls;
    stop.store(true, Ordering::Relaxed);
    let mut counts = vec![0u64; PIPES];
    let mut write_ends = Vec::with_capacity(PIPES);
    for w in writers {
        match w.join() {
            Ok(Ok(v)) => {
                for (i, s, f) in v {
                    counts[i] = s;
                    write_ends.push(f);
                }
            }
            Ok(Err(e)) => return Err(format!("a log writer failed: {e}").into()),
            Err(_) => return Err("a log writer panicked".into()),
        }
    }
    res?;
    // Every line must be in its log: the position call drains the pipe first.
    let mut lost_clients = busy_lost;
    for (i, p) in paths.iter().enumerate() {
        if position(&mut opener, p).is_err() {
            lost_clients += 1;
            opener = logd::connect(&d)?;
            position(&mut opener, p)?;
        }
        let expected: String = (0..counts[i]).map(|s| line(i, s)).collect();
        let got = log_contents(p);
        let same = got
            .iter()
            .zip(expected.as_bytes())
            .take_while(|(a, b)| a == b)
            .count() as u64;
        soak.bytes_written += expected.len() as u64;
        soak.bytes_lost += expected.len() as u64 - same;
    }
    if logd::ping(&mut idle).is_err() {
        lost_clients += 1;
    }
    drop(write_ends);
    soak.clients_lost = lost_clients;
    soak.elapsed = t0.elapsed();
    Ok(soak)
}

fn position(c: &mut vh_common::connection::blocking::Client, path: &Path) -> Res<()> {
    use vh_common::xdr::Encoder;
    use virtlogd::protocol as lp;
    let a = lp::GetLogFilePositionArgs {
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        flags: 0,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    c.call(lp::proc_::DOMAIN_GET_LOG_FILE_POSITION, e.as_bytes())?;
    Ok(())
}

/// The daemon holds an fcntl lock on `path` (another process's F_GETLK sees it).
fn locked_by(path: &Path, pid: i32) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_GETLK on an open fd with an initialised struct flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    r == 0 && i32::from(fl.l_type) != libc::F_UNLCK && fl.l_pid == pid
}

pub fn lockd(cx: &Ctx, n: usize) -> Res<Soak> {
    let t0 = Instant::now();
    let mut soak = Soak::default();
    let mut d = cx.spawn(Kind::Lockd, Impl::Ours)?;
    let dir = cx.lockspace("soak");
    let mut holders = lockd::hold_leases(&d, &dir, LEASES, HOLDERS)?;
    let dirs = dir.to_string_lossy().into_owned();
    let busy_calls: Vec<Box<dyn FnMut() -> Res<()> + Send>> = (0..BUSY)
        .map(|k| {
            let mut c = lockd::connect(&d)?;
            lockd::register(&mut c, 200_000 + k as u32)?;
            let dirs = dirs.clone();
            let name = format!("busy{k}");
            let f: Box<dyn FnMut() -> Res<()> + Send> = Box::new(move || {
                lockd::acquire(&mut c, &dirs, &name)?;
                lockd::release(&mut c, &dirs, &name)
            });
            Ok(f)
        })
        .collect::<Res<_>>()?;
    let busy = Busy::start(busy_calls);
    soak.clients = HOLDERS + BUSY;
    soak.leases = LEASES;
    let res = reexecs(&mut d, n, lockd::ping, &mut soak);
    let (calls, busy_lost) = busy.stop();
    soak.busy_calls = calls;
    res?;
    soak.leases_lost = (0..LEASES)
        .filter(|i| !locked_by(&dir.join(format!("lease{i}")), d.pid))
        .count();
    // Each holder still owns its leases: release one and take it back.
    let mut lost = busy_lost;
    for (k, c) in holders.iter_mut().enumerate() {
        let name = format!("lease{k}");
        if lockd::release(c, &dirs, &name)
            .and_then(|()| lockd::acquire(c, &dirs, &name))
            .is_err()
        {
            lost += 1;
        }
    }
    soak.clients_lost = lost;
    soak.elapsed = t0.elapsed();
    Ok(soak)
}

/// Runs the soak of the daemons asked for and prints one line each; fails unless
/// nothing was lost.
pub fn run(cx: &Ctx, n: usize, kinds: &[Kind]) -> Res<()> {
    let mut dirty = false;
    for &kind in kinds {
        progress(&format!("soak {}: {n} re-execs", kind.name()));
        let s = match kind {
            Kind::Logd => logd(cx, n)?,
            Kind::Lockd => lockd(cx, n)?,
        };
        println!("{}", s.line(kind));
        dirty |= !s.clean();
    }
    if dirty {
        return Err("the soak lost something".into());
    }
    Ok(())
}
