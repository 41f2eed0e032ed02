//! vh-bench: measures our virtlogd/virtlockd against Debian's C daemons in one run and
//! writes bench/RESULTS.md and bench/growth.svg.
//!
//! Usage: `vh-bench all [--quick] [--dir WORKDIR] [--out DIR]` (run as root: each daemon
//! runs in system mode in its own private mount namespace, set up by `vh-testkit`), and
//! `vh-bench soak [--reexecs N] [logd|lockd]` (see soak.rs), `vh-bench fence`
//! (fencing across hosts on the GlusterFS bed, see fence.rs), and `vh-bench fdstore`
//! (what systemd's fd store costs, see fdstore.rs).
//!
//! | module | job |
//! |---|---|
//! | `daemon` | spawning a daemon (ours or the C one) in a private mount namespace; its counters |
//! | `logd` | virtlogd load: log pipes fed by writer threads |
//! | `lockd` | virtlockd load: owners doing ACQUIRE/RELEASE round trips |
//! | `lockfs` | the filesystem the virtlockd benchmarks keep their lockspaces on |
//! | `soak` | N re-execs of each daemon under load, counting what must never be lost |
//! | `fence` | fencing across two hosts on the GlusterFS bed |
//! | `fdstore` | the cost of keeping systemd's fd store current, store on vs off |
//! | `report` | RESULTS.md and the growth SVG |

mod daemon;
mod fdstore;
mod fence;
mod lockd;
mod lockfs;
mod logd;
mod report;
mod soak;

use daemon::{Bins, Daemon, Impl, Kind, Res};
use report::{Row, Series, Stat};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vh_common::connection::blocking::Client;

const IMPLS: [Impl; 2] = [Impl::C, Impl::Ours];

/// Every size the run uses; `quick` shrinks them for a smoke test.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub reps: usize,
    pub one_pipe_bytes: u64,
    pub eight_pipe_bytes: u64,
    pub small_pipes: usize,
    pub small_lines: usize,
    pub owners: Vec<usize>,
    pub rtt_secs: f64,
    /// Repetitions of the figures that swing most on a small machine: virtlockd's round
    /// trips (tail latency above all) and the re-exec downtimes.
    pub noisy_reps: usize,
    pub held_pipes: usize,
    /// As many pipes as RLIMIT_NOFILE lets a daemon hold (each log costs it a pipe and
    /// a file), at most 10,000: set from the limit at start.
    pub max_pipes: usize,
    pub max_pipe_reps: usize,
    pub leases: usize,
    pub lease_conns: usize,
    pub growth: Vec<usize>,
    pub growth_bytes: u64,
    pub growth_rtt_secs: f64,
    pub growth_owners: Vec<usize>,
    /// 100-byte lines spread over the pipes at every growth size (daemon CPU per GiB).
    pub growth_small_lines: usize,
    pub startup_reps: usize,
    pub busy: Vec<usize>,
    pub probes: usize,
    pub ref_bytes: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            reps: 3,
            one_pipe_bytes: 256 << 20,
            eight_pipe_bytes: 32 << 20,
            small_pipes: 1000,
            small_lines: 300_000,
            owners: vec![1, 256, 5000],
            rtt_secs: 3.0,
            noisy_reps: 5,
            held_pipes: 1000,
            max_pipes: 10_000,
            max_pipe_reps: 3,
            leases: 10_000,
            lease_conns: 10,
            growth: vec![10, 100, 1000, 10_000],
            growth_bytes: 64 << 20,
            growth_rtt_secs: 2.0,
            growth_owners: vec![10, 100, 1000, 5000],
            growth_small_lines: 200_000,
            startup_reps: 5,
            busy: vec![1, 100, 1000],
            probes: 300,
            ref_bytes: 256 << 20,
        }
    }
    fn quick() -> Self {
        Sizes {
            reps: 1,
            one_pipe_bytes: 16 << 20,
            eight_pipe_bytes: 2 << 20,
            small_pipes: 100,
            small_lines: 5_000,
            owners: vec![1, 16],
            rtt_secs: 0.5,
            noisy_reps: 1,
            held_pipes: 100,
            max_pipes: 300,
            max_pipe_reps: 1,
            leases: 500,
            lease_conns: 2,
            growth: vec![10, 100],
            growth_bytes: 8 << 20,
            growth_rtt_secs: 0.5,
            growth_owners: vec![10, 100],
            growth_small_lines: 5_000,
            startup_reps: 2,
            busy: vec![1, 10],
            probes: 30,
            ref_bytes: 16 << 20,
        }
    }
}

fn progress(msg: &str) {
    eprintln!("[vh-bench] {msg}");
}

struct Ctx {
    bins: Bins,
    work: PathBuf,
    sz: Sizes,
    lockfs: lockfs::LockFs,
}

impl Ctx {
    fn spawn(&self, kind: Kind, imp: Impl) -> Res<Daemon> {
        Daemon::spawn(&self.bins, kind, imp, &self.work)
    }
    fn dir(&self, name: &str) -> PathBuf {
        self.work.join("data").join(name)
    }
    /// A directory on tmpfs, unique to this run.
    fn tmpfs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/dev/shm/vh-bench-{}", std::process::id()))
    }
    /// Where a virtlockd benchmark's lockspace goes (see lockfs.rs for why not `dir`).
    fn lockspace(&self, name: &str) -> PathBuf {
        self.lockfs.dir(name)
    }
}

/// Runs `f` `reps` times on one daemon per implementation, collecting one value. The
/// repetitions alternate between the two (C, ours, C, ours, ...), so that a slow phase
/// of the machine (writeback, the ext4 journal) does not land on one of them only.
fn per_impl<T>(
    cx: &Ctx,
    kind: Kind,
    reps: usize,
    mut f: impl FnMut(&Daemon, usize) -> Res<T>,
) -> Res<[Vec<T>; 2]> {
    let mut out = [Vec::new(), Vec::new()];
    let daemons = [cx.spawn(kind, IMPLS[0])?, cx.spawn(kind, IMPLS[1])?];
    for r in 0..reps {
        for (k, d) in daemons.iter().enumerate() {
            settle();
            let v = f(d, r).map_err(|e| failure(cx, d, r, e))?;
            out[k].push(v);
        }
    }
    Ok(out)
}

/// A failed repetition's error, with which daemon it was and the end of that daemon's
/// stderr (a run that fails keeps its work directory, see `real_main`, but the error
/// line is what reaches RESULTS.md).
fn failure(
    cx: &Ctx,
    d: &Daemon,
    rep: usize,
    e: Box<dyn std::error::Error>,
) -> Box<dyn std::error::Error> {
    let alive = std::path::Path::new(&format!("/proc/{}/auxv", d.pid)).exists();
    let log = cx
        .work
        .join(format!("{}-{}.stderr", d.kind.name(), daemon::tag(d.imp)));
    let tail: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .rev()
        .take(5)
        .map(str::to_owned)
        .collect();
    format!(
        "{} {} (pid {}, {}), repetition {rep}: {e}; its stderr ends: {:?}",
        d.imp.label(),
        d.kind.name(),
        d.pid,
        if alive { "still running" } else { "gone" },
        tail.into_iter().rev().collect::<Vec<_>>()
    )
    .into()
}

/// Flushes dirty pages left by the previous test, so that background writeback does not
/// land in the middle of the next one (it slows file creation and unlink in particular).
fn settle() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(100));
}

/// `vh-bench one logd|lockd c|ours N [SECS]`: one test on one fresh daemon, printing its
/// pid first and waiting 2 s so a profiler can attach (`perf record -p PID`).
/// One scenario against one daemon, for profiling and quick iteration:
/// `one logd c|ours N` (1 pipe × N MiB), `one logd c|ours eight N` (8 pipes × N MiB),
/// `one logd c|ours small N` (N lines over 1000 pipes), `one logd c|ours reexec N`
/// (re-exec downtime with N open pipes), `one logd c|ours ref N` (the pipe→file
/// reference copier, N MiB; the daemon idles), `one logd c|ours latency N` (write → file
/// with N busy pipes), `one logd c|ours growth N` (the growth phase's pair of loads on N
/// pipes, three times), `one logd c|ours hold N SECS` (N logs held open for SECS, to look
/// at the daemon), `one lockd c|ours N [SECS]` (N owners),
/// `one lockd c|ours reexec N` (re-exec downtime with N leases), `one lockd c|ours hold
/// N SECS` (N leases held over 10 connections for SECS, VmRSS printed).
fn one(cx: &Ctx, args: &[String]) -> Res<()> {
    const USAGE: &str =
        "one logd|lockd c|ours [eight|small|reexec|ref|latency|growth|hold] N [SECS]";
    let kind = match args.first().map(String::as_str) {
        Some("logd") => Kind::Logd,
        Some("lockd") => Kind::Lockd,
        _ => return Err(USAGE.into()),
    };
    let imp = match args.get(1).map(String::as_str) {
        Some("c") => Impl::C,
        Some("ours") => Impl::Ours,
        _ => return Err(USAGE.into()),
    };
    let (mode, rest) = match args.get(2).map(String::as_str) {
        Some(m @ ("eight" | "small" | "reexec" | "ref" | "latency" | "growth" | "hold")) => {
            (m, &args[3..])
        }
        _ => ("", &args[2..]),
    };
    let n: usize = rest.first().ok_or(USAGE)?.parse()?;
    let secs: f64 = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let d = cx.spawn(kind, imp)?;
    println!("pid {}", d.pid);
    std::thread::sleep(Duration::from_secs(2));
    settle();
    let dir = match kind {
        Kind::Logd => cx.dir("one"),
        Kind::Lockd => cx.lockspace("one"),
    };
    match (kind, mode) {
        (Kind::Logd, "") => println!("{:?}", logd::bulk(&d, &dir, 1, (n as u64) << 20, 1)?),
        (Kind::Logd, "eight") => println!("{:?}", logd::bulk(&d, &dir, 8, (n as u64) << 20, 8)?),
        (Kind::Logd, "ref") => println!(
            "{:?} {:?}",
            logd::reference(&dir, (n as u64) << 20, logd::CopyMode::ReadWrite)?,
            logd::reference(&dir, (n as u64) << 20, logd::CopyMode::Splice)?
        ),
        (Kind::Logd, "latency") => println!("{:?}", logd::latency(&d, &dir, n, 300)?),
        (Kind::Logd, "small") => println!("{:?}", logd::small(&d, &dir, 1000, n)?),
        (Kind::Logd, "growth") => {
            // The growth phase's pair of loads on N pipes, three times in a row.
            let per =
                (cx.sz.growth_bytes / n as u64 / logd::CHUNK as u64).max(1) * logd::CHUNK as u64;
            for _ in 0..3 {
                println!("{:?}", logd::bulk(&d, &dir, n, per, n.min(4))?);
                settle();
                println!("{:?}", logd::small(&d, &dir, n, cx.sz.growth_small_lines)?);
                settle();
            }
        }
        (Kind::Logd, "hold") => {
            // N open logs held for SECS seconds (to look at the daemon meanwhile).
            let _pipes = logd::hold_pipes(&d, &dir, n)?;
            println!("holding {n} logs, rss {} KiB", d.rss_kib()?);
            std::thread::sleep(Duration::from_secs_f64(secs));
        }
        (Kind::Logd, "reexec") => {
            let _pipes = logd::hold_pipes(&d, &dir, n)?;
            println!("downtime {:.2} ms", reexec_downtime(&d, logd::ping)?);
        }
        (Kind::Lockd, "hold") => {
            // N leases over 10 connections (as the full run's RSS row), held for SECS.
            let _held = lockd::hold_leases(&d, &dir, n, 10)?;
            println!("holding {n} leases, rss {} KiB", d.rss_kib()?);
            std::thread::sleep(Duration::from_secs_f64(secs));
        }
        (Kind::Lockd, "reexec") => {
            let _held = lockd::hold_leases(&d, &dir, n, 10)?;
            println!("downtime {:.2} ms", reexec_downtime(&d, lockd::ping)?);
        }
        (Kind::Lockd, _) => println!(
            "{:?}",
            lockd::round_trips(&d, &dir, n, Duration::from_secs_f64(secs))?
        ),
        _ => return Err(USAGE.into()),
    }
    Ok(())
}

/// SIGUSR1, wait for the exec (the process's auxv changes), then until a new client's
/// call gets a reply. Returns milliseconds.
fn reexec_downtime(d: &Daemon, ping: fn(&mut Client) -> Res<()>) -> Res<f64> {
    let fp0 = d.exec_fingerprint()?;
    let connect = |d: &Daemon| -> Res<Client> {
        match d.kind {
            Kind::Logd => logd::connect(d),
            Kind::Lockd => lockd::connect(d),
        }
    };
    // The C daemons listen before they install their SIGUSR1 handler (a signal in that
    // window kills them), so first make sure the event loop is serving.
    ping(&mut connect(d)?)?;
    let t0 = Instant::now();
    d.signal(libc::SIGUSR1)?;
    loop {
        if d.exec_fingerprint().is_ok_and(|fp| fp != fp0) {
            break;
        }
        if !Path::new(&format!("/proc/{}/auxv", d.pid)).exists() {
            return Err(format!("{} {} died on SIGUSR1", d.imp.label(), d.kind.name()).into());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "{} {} did not re-exec within 60 s",
                d.imp.label(),
                d.kind.name()
            )
            .into());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    let t_exec = t0.elapsed();
    loop {
        let r = connect(d).and_then(|mut c| ping(&mut c));
        if std::env::var_os("VH_DEBUG").is_some() {
            eprintln!(
                "exec seen at {:?}, attempt at {:?}: {:?}",
                t_exec,
                t0.elapsed(),
                r.as_ref().err().map(|e| e.to_string())
            );
        }
        if r.is_ok() {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "{} {}: no reply within 60 s of SIGUSR1",
                d.imp.label(),
                d.kind.name()
            )
            .into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn kib_to_mib(v: u64) -> f64 {
    v as f64 / 1024.0
}

fn run_all(cx: &Ctx, rows: &mut Vec<Row>, series: &mut Vec<Series>) -> Res<()> {
    let sz = &cx.sz;
    let reps = sz.reps;

    // ---- the machine's limits for one log's bytes
    progress("physical limits: memcpy, page cache write rate");
    let mut mem = Vec::new();
    let mut pc_disk = Vec::new();
    let mut pc_tmpfs = Vec::new();
    for _ in 0..reps {
        settle();
        mem.push(logd::memcpy_rate());
        settle();
        pc_disk.push(logd::page_cache_rate(&cx.dir("pagecache"), sz.ref_bytes)?);
        pc_tmpfs.push(logd::page_cache_rate(&cx.tmpfs_dir(), sz.ref_bytes)?);
    }
    rows.push(Row::single(
        "machine",
        "memory bandwidth, one copy (memcpy of 256 MiB in 1 MiB pieces), MiB/s",
        Stat::of(mem.iter().copied()),
    ));
    rows.push(Row::single(
        "machine",
        "page cache write rate, data directory's ext4 (64 KiB write(2)s from memory, rotated like a log), MiB/s",
        Stat::of(pc_disk.iter().copied()),
    ));
    rows.push(Row::single(
        "machine",
        "page cache write rate, tmpfs (/dev/shm, same writes), MiB/s",
        Stat::of(pc_tmpfs.iter().copied()),
    ));

    // ---- virtlogd throughput, with the references in the same alternation
    progress(&format!(
        "virtlogd 1 pipe x {} MiB, with the pipe->file references",
        sz.one_pipe_bytes >> 20
    ));
    let mut one: [Vec<logd::Flow>; 2] = [Vec::new(), Vec::new()];
    let mut refs = Vec::new();
    let mut refs_splice = Vec::new();
    {
        let daemons = [
            cx.spawn(Kind::Logd, IMPLS[0])?,
            cx.spawn(Kind::Logd, IMPLS[1])?,
        ];
        for _ in 0..reps {
            for (k, d) in daemons.iter().enumerate() {
                settle();
                one[k].push(logd::bulk(d, &cx.dir("bulk1"), 1, sz.one_pipe_bytes, 1)?);
            }
            settle();
            refs.push(logd::reference(
                &cx.dir("ref"),
                sz.one_pipe_bytes,
                logd::CopyMode::ReadWrite,
            )?);
            settle();
            refs_splice.push(logd::reference(
                &cx.dir("ref"),
                sz.one_pipe_bytes,
                logd::CopyMode::Splice,
            )?);
        }
    }
    let ref_med = Stat::of(refs.iter().map(|f| f.mib_s)).med;
    let splice_med = Stat::of(refs_splice.iter().map(|f| f.mib_s)).med;
    rows.push(Row::ratio(
        "virtlogd",
        &format!("1 pipe × {} MiB, MiB/s", sz.one_pipe_bytes >> 20),
        one.each(|f| f.mib_s),
        "ours ≥ 3× C",
        3.0,
        true,
    ));
    rows.push(Row::single(
        "virtlogd",
        "pipe→file reference: read/write 64 KiB, 1 MiB pipe, rotated like a log (2 MiB × 3 backups), after sync, MiB/s",
        Stat::of(refs.iter().map(|f| f.mib_s)),
    ));
    rows.push(Row::single(
        "virtlogd",
        "pipe→file reference: splice, 1 MiB pipe, same rotation and settle, MiB/s",
        Stat::of(refs_splice.iter().map(|f| f.mib_s)),
    ));
    let ours_one = Stat::of(one[1].iter().map(|f| f.mib_s)).med;
    rows.push(Row::note(
        "virtlogd",
        "1 pipe: ours / read-write reference (medians)",
        format!("{:.0} %", 100.0 * ours_one / ref_med),
        "≥ 90 %",
        ours_one >= 0.9 * ref_med,
    ));
    rows.push(Row::note(
        "virtlogd",
        "1 pipe: ours / splice reference (medians)",
        format!("{:.0} %", 100.0 * ours_one / splice_med),
        "—",
        true,
    ));
    let mem_med = Stat::of(mem.iter().copied()).med;
    let pc_med = Stat::of(pc_disk.iter().copied()).med;
    rows.push(Row::note(
        "virtlogd",
        "1 pipe: ours / page cache write rate / memory bandwidth (medians)",
        format!(
            "{:.0} % / {:.0} %",
            100.0 * ours_one / pc_med,
            100.0 * ours_one / mem_med
        ),
        "—",
        true,
    ));
    rows.push(Row::ratio(
        "virtlogd",
        "1 pipe, daemon CPU-s per GiB",
        one.each(|f| f.cpu_per_gib),
        "ours ≤ 1/6 of C",
        1.0 / 6.0,
        false,
    ));
    rows.push(Row::single(
        "virtlogd",
        "read/write reference copier CPU-s per GiB",
        Stat::of(refs.iter().map(|f| f.cpu_per_gib)),
    ));
    rows.push(Row::single(
        "virtlogd",
        "splice reference copier CPU-s per GiB",
        Stat::of(refs_splice.iter().map(|f| f.cpu_per_gib)),
    ));

    progress(&format!(
        "virtlogd 8 pipes x {} MiB",
        sz.eight_pipe_bytes >> 20
    ));
    let eight = per_impl(cx, Kind::Logd, reps, |d, _| {
        logd::bulk(d, &cx.dir("bulk8"), 8, sz.eight_pipe_bytes, 8)
    })?;
    rows.push(Row::ratio(
        "virtlogd",
        &format!(
            "8 pipes × {} MiB (aggregate), MiB/s",
            sz.eight_pipe_bytes >> 20
        ),
        eight.each(|f| f.mib_s),
        "—",
        0.0,
        true,
    ));
    rows.push(Row::ratio(
        "virtlogd",
        "8 pipes, daemon CPU-s per GiB",
        eight.each(|f| f.cpu_per_gib),
        "ours ≤ 1/6 of C",
        1.0 / 6.0,
        false,
    ));

    progress(&format!(
        "virtlogd {} pipes, {} x 100-byte lines at random intervals",
        sz.small_pipes, sz.small_lines
    ));
    let small = per_impl(cx, Kind::Logd, reps, |d, _| {
        logd::small(d, &cx.dir("small"), sz.small_pipes, sz.small_lines)
    })?;
    rows.push(Row::ratio(
        "virtlogd",
        &format!(
            "{} pipes, {} × 100-byte lines, MiB/s (writer-paced)",
            sz.small_pipes, sz.small_lines
        ),
        small.each(|f| f.mib_s),
        "—",
        0.0,
        true,
    ));
    rows.push(Row::ratio(
        "virtlogd",
        &format!(
            "{} pipes small writes, daemon CPU-s per GiB",
            sz.small_pipes
        ),
        small.each(|f| f.cpu_per_gib),
        "ours ≤ 1/6 of C",
        1.0 / 6.0,
        false,
    ));

    // ---- virtlockd round trips
    for &n in &sz.owners {
        progress(&format!("virtlockd {n} owners x {} s", sz.rtt_secs));
        let r = per_impl(cx, Kind::Lockd, sz.noisy_reps, |d, rep| {
            lockd::round_trips(
                d,
                &cx.lockspace(&format!("ls{n}-{rep}-{}", daemon::tag(d.imp))),
                n,
                Duration::from_secs_f64(sz.rtt_secs),
            )
        })?;
        rows.push(Row::ratio(
            "virtlockd",
            &format!("{n} owner(s): acquire+release round trips/s"),
            r.each(|x| x.per_sec),
            "ours ≥ C",
            1.0,
            true,
        ));
        rows.push(Row::ratio(
            "virtlockd",
            &format!("{n} owner(s): p50 latency, µs"),
            r.each(|x| x.p50_us),
            "—",
            0.0,
            false,
        ));
        rows.push(Row::ratio(
            "virtlockd",
            &format!("{n} owner(s): p99 latency, µs"),
            r.each(|x| x.p99_us),
            "ours ≤ C",
            1.0,
            false,
        ));
        if n > 1 {
            rows.push(Row::ratio(
                "virtlockd",
                &format!("{n} owner(s): busiest/idlest owner's round trips"),
                r.each(|x| x.owner_max as f64 / x.owner_min.max(1) as f64),
                "—",
                0.0,
                false,
            ));
        }
    }

    // ---- start-up time and idle RSS
    progress("start-up time and idle RSS");
    for kind in [Kind::Logd, Kind::Lockd] {
        let mut st = [Vec::new(), Vec::new()];
        let mut idle = [Vec::new(), Vec::new()];
        for _ in 0..sz.startup_reps {
            for (k, imp) in IMPLS.iter().enumerate() {
                let d = cx.spawn(kind, *imp)?;
                st[k].push(d.startup.as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(200));
                idle[k].push(kib_to_mib(d.rss_kib()?));
            }
        }
        rows.push(Row::ratio(
            kind.name(),
            "start-up to socket-ready (spawn incl. unshare+mount), ms",
            st,
            "—",
            0.0,
            false,
        ));
        rows.push(Row::ratio(
            kind.name(),
            "VmRSS idle, MiB",
            idle,
            "—",
            0.0,
            false,
        ));
    }

    // ---- RSS with state held, and re-exec downtime
    progress(&format!(
        "RSS + re-exec with 1, {} and {} pipes",
        sz.held_pipes, sz.max_pipes
    ));
    for n in [1, sz.held_pipes, sz.max_pipes] {
        let mut rss = [Vec::new(), Vec::new()];
        let mut down = [Vec::new(), Vec::new()];
        let mut lost = [0usize, 0usize];
        let reps = if n == sz.max_pipes {
            sz.max_pipe_reps
        } else {
            sz.noisy_reps
        };
        for _ in 0..reps {
            for (k, imp) in IMPLS.iter().enumerate() {
                let mut d = cx.spawn(Kind::Logd, *imp)?;
                let pipes = logd::hold_pipes(&d, &cx.dir("held"), n)?;
                rss[k].push(kib_to_mib(d.rss_kib()?));
                // Pipes, not all fds: after re-exec our logs reopen their files on
                // first use, so only a lost pipe would be a lost log.
                let fds0 = d.npipes()?;
                settle();
                down[k].push(reexec_downtime(&d, logd::ping)?);
                std::thread::sleep(Duration::from_millis(100));
                if !d.alive() {
                    return Err(format!("{} virtlogd died after re-exec", imp.label()).into());
                }
                let fds1 = d.npipes()?;
                if fds1 < fds0 {
                    lost[k] += fds0 - fds1;
                    progress(&format!(
                        "warning: {} virtlogd had {fds0} pipes before re-exec, {fds1} after",
                        imp.label()
                    ));
                }
                drop(pipes);
            }
        }
        if n > 1 {
            rows.push(Row::ratio(
                "virtlogd",
                &format!("VmRSS with {n} open pipes, MiB"),
                rss,
                "—",
                0.0,
                false,
            ));
        }
        let (target, threshold) = if n >= 1000 {
            ("ours ≤ 1/10 of C", 0.1)
        } else {
            ("—", 0.0)
        };
        rows.push(Row::ratio(
            "virtlogd",
            &format!("re-exec downtime (SIGUSR1 → new client's reply), {n} pipe(s), ms"),
            down,
            target,
            threshold,
            false,
        ));
        if n > 1 {
            rows.push(Row::note(
                "virtlogd",
                &format!("{n} pipes: pipes lost across re-exec (C / ours, all repetitions)"),
                format!("{} / {}", lost[0], lost[1]),
                "ours 0",
                lost[1] == 0,
            ));
        }
    }
    progress(&format!("RSS + re-exec with {} leases", sz.leases));
    {
        let mut rss = [Vec::new(), Vec::new()];
        let mut down = [Vec::new(), Vec::new()];
        let mut idle_down = [Vec::new(), Vec::new()];
        for rep in 0..sz.noisy_reps {
            for (k, imp) in IMPLS.iter().enumerate() {
                let d = cx.spawn(Kind::Lockd, *imp)?;
                idle_down[k].push(reexec_downtime(&d, lockd::ping)?);
                let held = lockd::hold_leases(
                    &d,
                    &cx.lockspace(&format!("leases{rep}")),
                    sz.leases,
                    sz.lease_conns,
                )?;
                rss[k].push(kib_to_mib(d.rss_kib()?));
                settle();
                down[k].push(reexec_downtime(&d, lockd::ping)?);
                drop(held);
            }
        }
        rows.push(Row::ratio(
            "virtlockd",
            &format!("VmRSS with {} held leases, MiB", sz.leases),
            rss,
            "—",
            0.0,
            false,
        ));
        rows.push(Row::ratio(
            "virtlockd",
            "re-exec downtime, no leases, ms",
            idle_down,
            "—",
            0.0,
            false,
        ));
        rows.push(Row::ratio(
            "virtlockd",
            &format!("re-exec downtime, {} leases, ms", sz.leases),
            down,
            "ours ≤ 1/4 of C",
            0.25,
            false,
        ));
    }

    // ---- latency: a guest's write → the bytes in the file
    for &n in &sz.busy {
        progress(&format!("latency with {n} busy pipe(s)"));
        let l = per_impl(cx, Kind::Logd, reps, |d, _| {
            logd::latency(d, &cx.dir("latency"), n, sz.probes)
        })?;
        rows.push(Row::ratio(
            "virtlogd",
            &format!("{n} busy pipe(s): write → in the file, p50, ms"),
            l.each(|x| x.p50_ms),
            "—",
            0.0,
            false,
        ));
        let p99 = l.each(|x| x.p99_ms);
        let ours_p99 = Stat::of(p99[1].iter().copied()).med;
        rows.push(Row::ratio(
            "virtlogd",
            &format!("{n} busy pipe(s): write → in the file, p99, ms"),
            p99,
            "ours ≤ 25 ms",
            0.0,
            false,
        ));
        rows.push(Row::note(
            "virtlogd",
            &format!("{n} busy pipe(s): ours p99 ≤ 25 ms"),
            format!("{ours_p99:.1} ms"),
            "≤ 25 ms",
            ours_p99 <= 25.0,
        ));
        rows.push(Row::ratio(
            "virtlogd",
            &format!("{n} busy pipe(s): daemon CPU meanwhile, % of a core"),
            l.each(|x| x.cpu_pct),
            "—",
            0.0,
            false,
        ));
    }

    // ---- growth
    let mut tput = [Vec::new(), Vec::new()];
    let mut prss = [Vec::new(), Vec::new()];
    let mut scpu = [Vec::new(), Vec::new()];
    let mut opens = [Vec::new(), Vec::new()];
    let mut rtts = [Vec::new(), Vec::new()];
    let mut orss = [Vec::new(), Vec::new()];
    for &n in &sz.growth {
        let n = n.min(sz.max_pipes);
        progress(&format!(
            "growth: {n} pipes sharing {} MiB, then {} small lines",
            sz.growth_bytes >> 20,
            sz.growth_small_lines
        ));
        let per = (sz.growth_bytes / n as u64 / logd::CHUNK as u64).max(1) * logd::CHUNK as u64;
        let g = per_impl(cx, Kind::Logd, reps, |d, _| {
            let bulk = logd::bulk(d, &cx.dir("growth"), n, per, n.min(4))?;
            settle();
            let small = logd::small(d, &cx.dir("growth"), n, sz.growth_small_lines)?;
            Ok((bulk, small))
        })?;
        for k in 0..2 {
            tput[k].push((n, Stat::of(g[k].iter().map(|f| f.0.mib_s))));
            prss[k].push((
                n,
                Stat::of(
                    g[k].iter()
                        .map(|f| kib_to_mib(f.0.peak_rss_kib.max(f.1.peak_rss_kib))),
                ),
            ));
            scpu[k].push((n, Stat::of(g[k].iter().map(|f| f.1.cpu_per_gib))));
            opens[k].push((
                n,
                Stat::of(
                    g[k].iter()
                        .map(|f| 1000.0 * (f.0.open_secs + f.1.open_secs) / 2.0),
                ),
            ));
        }
    }
    for &n in &sz.growth_owners {
        progress(&format!("growth: {n} owners"));
        let o = per_impl(cx, Kind::Lockd, reps, |d, rep| {
            lockd::round_trips(
                d,
                &cx.lockspace(&format!("gls{n}-{rep}-{}", daemon::tag(d.imp))),
                n,
                Duration::from_secs_f64(sz.growth_rtt_secs),
            )
        })?;
        for k in 0..2 {
            rtts[k].push((n, Stat::of(o[k].iter().map(|x| x.per_sec))));
            orss[k].push((n, Stat::of(o[k].iter().map(|x| kib_to_mib(x.rss_kib)))));
        }
    }
    series.push(Series::new("virtlogd throughput, MiB/s", "pipes", tput));
    series.push(Series::new("virtlogd peak VmRSS, MiB", "pipes", prss));
    series.push(Series::new(
        "virtlogd CPU-s per GiB, 100-byte lines",
        "pipes",
        scpu,
    ));
    series.push(Series::new(
        "virtlogd: time to open all logs, ms",
        "pipes",
        opens,
    ));
    series.push(Series::new("virtlockd round trips/s", "owners", rtts));
    series.push(Series::new("virtlockd VmRSS, MiB", "owners", orss));
    Ok(())
}

trait Each<T> {
    fn each(&self, f: impl Fn(&T) -> f64) -> [Vec<f64>; 2];
}

impl<T> Each<T> for [Vec<T>; 2] {
    fn each(&self, f: impl Fn(&T) -> f64) -> [Vec<f64>; 2] {
        [
            self[0].iter().map(&f).collect(),
            self[1].iter().map(&f).collect(),
        ]
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("vh-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fdstore") {
        let exe = std::env::current_exe()?;
        return fdstore::main(&args[2..], exe.parent().ok_or("no exe dir")?);
    }
    if args.get(1).map(String::as_str) == Some("copy") {
        let path = PathBuf::from(args.get(2).ok_or("copy PATH rw|splice")?);
        return logd::copy_main(&path, args.get(3).map_or("rw", String::as_str));
    }
    if args.get(1).map(String::as_str) == Some("fence") {
        return fence::main(&args[2..]);
    }
    let mut quick = false;
    // Unique per run, so that two runs on one machine never wipe each other's files.
    let mut work = PathBuf::from(format!("/var/tmp/vh-bench-work-{}", std::process::id()));
    let mut out: Option<PathBuf> = None;
    let mut keep = false;
    let mut cmd = None;
    let mut rest: Vec<String> = Vec::new();
    let mut reexecs: usize = 1000;
    let mut soak_kinds: Vec<Kind> = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--keep" => keep = true,
            "--dir" => work = PathBuf::from(it.next().ok_or("--dir needs a value")?),
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a value")?)),
            "all" => cmd = Some("all"),
            "soak" => cmd = Some("soak"),
            "--reexecs" => {
                reexecs = it.next().ok_or("--reexecs needs a value")?.parse()?;
            }
            "logd" if cmd == Some("soak") => soak_kinds.push(Kind::Logd),
            "lockd" if cmd == Some("soak") => soak_kinds.push(Kind::Lockd),
            "one" => {
                cmd = Some("one");
                rest = it.by_ref().cloned().collect();
            }
            "-h" | "--help" => {
                println!("usage: vh-bench all [--quick] [--dir WORKDIR] [--out DIR] [--keep]");
                println!("       vh-bench soak [--reexecs N] [logd|lockd]");
                println!("       vh-bench fence --help (GlusterFS bed; writes FENCING.md)");
                println!("       vh-bench fdstore [--leases N] [--logs M] [--reps R] [--out FILE]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)").into()),
        }
    }
    if cmd.is_none() {
        return Err("usage: vh-bench all [--quick] [--dir WORKDIR] [--out DIR] [--keep]".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (unshare -m, system-mode daemons)".into());
    }
    let exe = std::env::current_exe()?;
    let ours_dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
    let out = out.unwrap_or_else(|| {
        // target/release/vh-bench → <workspace>/bench
        ours_dir
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("bench"))
            .unwrap_or_else(|| PathBuf::from("bench"))
    });
    let nofile = daemon::raise_nofile();
    if work.exists() {
        lockfs::unmount_stale(&work);
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(work.join("data"))?;
    let cx = Ctx {
        bins: Bins {
            ours_dir: vh_testkit::bin_dir(),
        },
        work: work.clone(),
        sz: {
            let mut sz = if quick { Sizes::quick() } else { Sizes::full() };
            // Each log costs a daemon two fds (its pipe's read end and the file); keep
            // 64 for everything else.
            sz.max_pipes = sz.max_pipes.min((nofile.saturating_sub(64) / 2) as usize);
            sz
        },
        lockfs: lockfs::LockFs::setup(&work, work.join("data")),
    };
    if cmd == Some("soak") {
        if soak_kinds.is_empty() {
            soak_kinds = vec![Kind::Logd, Kind::Lockd];
        }
        let r = soak::run(&cx, reexecs, &soak_kinds);
        drop(cx); // unmounts the lockspaces' filesystem
        if !keep {
            let _ = std::fs::remove_dir_all(&work);
        }
        return r;
    }
    if cmd == Some("one") {
        let r = one(&cx, &rest);
        drop(cx); // unmounts the lockspaces' filesystem
        if !keep {
            let _ = std::fs::remove_dir_all(&work);
        }
        return r;
    }
    let load_start = report::sh("cut", &["-d", " ", "-f", "1-3", "/proc/loadavg"]);
    let t0 = Instant::now();
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let res = run_all(&cx, &mut rows, &mut series);
    let elapsed = t0.elapsed();
    if let Err(e) = &res {
        progress(&format!("run failed: {e} (writing partial results)"));
    }
    let md = report::markdown(&report::Env {
        command: args.join(" "),
        sizes: &cx.sz,
        work: &work,
        elapsed,
        nofile,
        quick,
        rows: &rows,
        series: &series,
        lockspaces: cx.lockfs.describe(),
        analysis: std::fs::read_to_string(out.join("ANALYSIS.md")).ok(),
        error: res.as_ref().err().map(|e| e.to_string()),
        load_start,
    });
    std::fs::create_dir_all(&out)?;
    let name = if quick {
        "RESULTS-quick.md"
    } else {
        "RESULTS.md"
    };
    std::fs::write(out.join(name), md)?;
    if !series.is_empty() {
        let svg = if quick {
            "growth-quick.svg"
        } else {
            "growth.svg"
        };
        std::fs::write(out.join(svg), report::svg(&series))?;
    }
    progress(&format!(
        "done in {:.0} s; wrote {}",
        elapsed.as_secs_f64(),
        out.join(name).display()
    ));
    drop(cx); // unmounts the lockspaces' filesystem
    if !keep && res.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    } else if res.is_err() {
        progress(&format!("work directory kept: {}", work.display()));
    }
    res
}
