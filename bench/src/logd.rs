//! virtlogd load: pipes from OpenLogFile fed by writer threads.

use crate::daemon::{thread_cpu, Daemon, Res};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use vh_common::connection::blocking::Client;
use vh_common::xdr::Encoder;
use virtlogd::protocol as lp;

pub const CHUNK: usize = 4100;

pub fn connect(d: &Daemon) -> Res<Client> {
    let c = Client::connect(&d.socket(), lp::PROGRAM, lp::VERSION)?;
    c.stream().set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(c)
}

/// OpenLogFile; returns the pipe's write end.
pub fn open_log(c: &mut Client, path: &Path, i: usize) -> Res<File> {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    let a = lp::OpenLogFileArgs {
        driver: "qemu".into(),
        dom: lp::Domain {
            uuid,
            name: format!("bench{i}"),
        },
        path: path.as_os_str().as_encoded_bytes().to_vec(),
        flags: lp::OPEN_TRUNCATE,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    let r = c.call(lp::proc_::DOMAIN_OPEN_LOG_FILE, e.as_bytes())?;
    let fd: OwnedFd = r
        .fds
        .into_iter()
        .next()
        .ok_or("OpenLogFile returned no fd")?;
    Ok(File::from(fd))
}

/// A call any live daemon answers (an error reply counts: it is a reply).
pub fn ping(c: &mut Client) -> Res<()> {
    let a = lp::GetLogFilePositionArgs {
        path: b"/nonexistent/vh-bench-ping.log".to_vec(),
        flags: 0,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    match c.call(lp::proc_::DOMAIN_GET_LOG_FILE_POSITION, e.as_bytes()) {
        Ok(_) | Err(vh_common::connection::blocking::CallError::Remote(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// 4,100 bytes of 'x' with a newline every 80 bytes (continuing across chunks).
pub fn chunk() -> Vec<u8> {
    (0..CHUNK)
        .map(|i| if i % 80 == 79 { b'\n' } else { b'x' })
        .collect()
}

pub fn fresh_dir(dir: &Path) -> Res<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Flow {
    pub mib_s: f64,
    pub cpu_per_gib: f64,
    pub peak_rss_kib: u64,
    /// Seconds to open every log (OpenLogFile calls on one connection).
    pub open_secs: f64,
}

/// Samples the daemon's VmRSS every 20 ms until stopped; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    h: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let h = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(v) = st
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        p.fetch_max(v, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            stop,
            peak,
            h: Some(h),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            let _ = h.join();
        }
    }
}

/// Waits until the daemon has closed every log of this run (EOF seen, all data written).
fn wait_drained(d: &Daemon, baseline: usize, npipes: usize) -> Res<()> {
    let t0 = Instant::now();
    // Listing /proc/PID/fd costs the bench CPU per entry: poll a large table less often.
    let poll = if npipes > 1000 {
        Duration::from_millis(20)
    } else if npipes > 100 {
        Duration::from_millis(5)
    } else {
        Duration::from_micros(500)
    };
    while d.nfds()? > baseline {
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("daemon did not drain the pipes within 300 s".into());
        }
        thread::sleep(poll);
    }
    Ok(())
}

/// Bulk throughput: `npipes` logs, `per_pipe` bytes each in 4,100-byte writes, by
/// `writers` threads that each round-robin over their share of the pipes.
pub fn bulk(d: &Daemon, dir: &Path, npipes: usize, per_pipe: u64, writers: usize) -> Res<Flow> {
    fresh_dir(dir)?;
    let baseline = d.nfds()?;
    let mut c = connect(d)?;
    let mut groups: Vec<Vec<File>> = (0..writers.max(1)).map(|_| Vec::new()).collect();
    let t_open = Instant::now();
    for i in 0..npipes {
        let f = open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?;
        let n = groups.len();
        groups[i % n].push(f);
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    drop(c);
    let sampler = RssSampler::start(d.pid);
    let cpu0 = d.cpu()?;
    let t0 = Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(w, mut g)| {
            thread::spawn(move || -> std::io::Result<()> {
                let buf = chunk();
                let mut left: Vec<u64> = vec![per_pipe; g.len()];
                let mut active = g.len();
                while active > 0 {
                    active = 0;
                    for (j, (f, l)) in g.iter_mut().zip(left.iter_mut()).enumerate() {
                        if *l == 0 {
                            continue;
                        }
                        let n = (*l).min(CHUNK as u64) as usize;
                        f.write_all(&buf[..n])
                            .map_err(|e| on_pipe(e, w, j, writers.max(1)))?;
                        *l -= n as u64;
                        active += 1;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "writer panicked")??;
    }
    wait_drained(d, baseline, npipes)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = d.cpu()? - cpu0;
    let total = npipes as f64 * per_pipe as f64;
    Ok(Flow {
        mib_s: total / (1 << 20) as f64 / secs,
        cpu_per_gib: cpu / (total / (1u64 << 30) as f64),
        peak_rss_kib: sampler.finish(),
        open_secs,
    })
}

/// A writer's failure, naming the log (its pipe's index in the test's numbering).
fn on_pipe(e: std::io::Error, writer: usize, nth: usize, writers: usize) -> std::io::Error {
    std::io::Error::new(
        e.kind(),
        format!(
            "writing log pipe {} (vm{}.log): {e}",
            nth * writers + writer,
            nth * writers + writer
        ),
    )
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Many pipes, small writes: `lines` 100-byte lines spread at random over `npipes`
/// pipes by 4 writer threads, each pausing 0–500 µs after a random ~1/16 of its lines.
pub fn small(d: &Daemon, dir: &Path, npipes: usize, lines: usize) -> Res<Flow> {
    fresh_dir(dir)?;
    let baseline = d.nfds()?;
    let mut c = connect(d)?;
    let writers = 4;
    let mut groups: Vec<Vec<File>> = (0..writers).map(|_| Vec::new()).collect();
    let t_open = Instant::now();
    for i in 0..npipes {
        groups[i % writers].push(open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?);
    }
    let open_secs = t_open.elapsed().as_secs_f64();
    drop(c);
    let sampler = RssSampler::start(d.pid);
    let cpu0 = d.cpu()?;
    let t0 = Instant::now();
    let per = lines / writers;
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(w, mut g)| {
            thread::spawn(move || -> std::io::Result<()> {
                let mut line = [b'y'; 100];
                line[99] = b'\n';
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1));
                for _ in 0..per {
                    let r = rng.next();
                    let i = (r % g.len() as u64) as usize;
                    g[i].write_all(&line)
                        .map_err(|e| on_pipe(e, w, i, writers))?;
                    if (r >> 32) & 15 == 0 {
                        thread::sleep(Duration::from_micros((r >> 40) % 500));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "writer panicked")??;
    }
    wait_drained(d, baseline, npipes)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = d.cpu()? - cpu0;
    let total = (per * writers * 100) as f64;
    Ok(Flow {
        mib_s: total / (1 << 20) as f64 / secs,
        cpu_per_gib: cpu / (total / (1u64 << 30) as f64),
        peak_rss_kib: sampler.finish(),
        open_secs,
    })
}

/// The log's rotation as the daemons are configured (`max_size`, `max_backups`).
pub const ROTATE_AT: u64 = 2 << 20;
pub const BACKUPS: usize = 3;
/// The pipe size both daemons give a busy log pipe (ours) or that the reference asks for.
pub const PIPE_SIZE: i32 = 1 << 20;

/// How the reference copier moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// read(2) into a 64 KiB buffer, write(2) to the file (two copies, like `cat`).
    ReadWrite,
    /// splice(2) pipe → file (one copy, as ours does for a busy pipe).
    Splice,
}

impl CopyMode {
    fn arg(self) -> &'static str {
        match self {
            CopyMode::ReadWrite => "rw",
            CopyMode::Splice => "splice",
        }
    }
}

/// The pipe→file reference, like `cat` in the spec but under the daemons' conditions:
/// the same writer into the stdin pipe of a separate process (`vh-bench copy`), whose
/// pipe is raised to 1 MiB as ours raises a busy log pipe, and which rotates the file
/// exactly as a log with `max_size = 2 MiB`, `max_backups = 3` is rotated (the oldest
/// backup unlinked, the others renamed, a fresh file opened). The caller settles
/// (sync) before it, as before every daemon repetition. Its CPU is the copier's own.
pub fn reference(dir: &Path, bytes: u64, mode: CopyMode) -> Res<Flow> {
    fresh_dir(dir)?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("copy").arg(dir.join("ref.log")).arg(mode.arg());
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut wr = child.stdin.take().ok_or("no stdin pipe")?;
    // The writer side may raise it too (same pipe); the copier does it as well, so
    // that whichever runs first, the pipe is 1 MiB before most of the data.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    let buf = chunk();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        wr.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(wr);
    let out = child.wait_with_output()?;
    let secs = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let n: u64 = it.next().ok_or("copy: no output")?.parse()?;
    let cpu: f64 = it.next().ok_or("copy: no cpu")?.parse()?;
    if n != bytes {
        return Err(format!("copy: {n} bytes copied of {bytes}").into());
    }
    Ok(Flow {
        mib_s: n as f64 / (1 << 20) as f64 / secs,
        cpu_per_gib: cpu / (n as f64 / (1u64 << 30) as f64),
        ..Flow::default()
    })
}

/// A log file rotated like the daemons' (`path.0` .. `path.{BACKUPS-1}`).
struct Rotating {
    path: PathBuf,
    file: File,
    since: u64,
}

impl Rotating {
    fn open(path: &Path, append: bool) -> Res<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .mode(0o600)
            .open(path)?;
        Ok(Rotating {
            path: path.to_owned(),
            file,
            since: 0,
        })
    }
    fn backup(&self, i: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }
    /// Room left before the next rollover.
    fn room(&self) -> u64 {
        ROTATE_AT - self.since
    }
    fn wrote(&mut self, n: u64, append: bool) -> Res<()> {
        self.since += n;
        if self.since >= ROTATE_AT {
            // Same steps as the daemons' rollover: the oldest backup goes, the rest shift.
            let _ = fs::remove_file(self.backup(BACKUPS - 1));
            for i in (0..BACKUPS).rev() {
                let from = if i == 0 {
                    self.path.clone()
                } else {
                    self.backup(i - 1)
                };
                match fs::rename(&from, self.backup(i)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
            *self = Rotating::open(&self.path.clone(), append)?;
        }
        Ok(())
    }
}

/// `vh-bench copy PATH rw|splice`: stdin (raised to a 1 MiB pipe) → PATH rotated like a
/// log; prints bytes copied and this process's CPU seconds.
pub fn copy_main(path: &Path, mode: &str) -> Res<()> {
    let splice = match mode {
        "rw" => false,
        "splice" => true,
        _ => return Err("copy PATH rw|splice".into()),
    };
    // SAFETY: fcntl on our stdin.
    unsafe { libc::fcntl(0, libc::F_SETPIPE_SZ, PIPE_SIZE) };
    // splice(2) refuses an O_APPEND target; the file offset does the same job here.
    let mut out = Rotating::open(path, !splice)?;
    let mut n = 0u64;
    if splice {
        loop {
            let want = out.room().min(PIPE_SIZE as u64) as usize;
            // SAFETY: splice between two fds we hold, with null offsets.
            let k = unsafe {
                libc::splice(
                    0,
                    std::ptr::null_mut(),
                    out.file.as_raw_fd(),
                    std::ptr::null_mut(),
                    want,
                    libc::SPLICE_F_MOVE,
                )
            };
            if k < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if k == 0 {
                break;
            }
            n += k as u64;
            out.wrote(k as u64, false)?;
        }
    } else {
        let mut rd = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let want = (out.room() as usize).min(buf.len());
            let k = match rd.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            out.file.write_all(&buf[..k])?;
            n += k as u64;
            out.wrote(k as u64, true)?;
        }
    }
    println!("{n} {}", thread_cpu());
    Ok(())
}

/// The machine's limits for one log's bytes, MiB/s: one memory copy of data not in
/// the CPU caches (256 MiB, 1 MiB at a time), and the page cache's write rate
/// (64 KiB write(2)s from memory into a file in `dir`, rotated like a log, no pipe).
pub fn memcpy_rate() -> f64 {
    const TOTAL: usize = 256 << 20;
    let src = vec![1u8; TOTAL];
    let mut dst = vec![0u8; TOTAL];
    // Touch the destination so the copy measures bandwidth, not page faults.
    for p in dst.chunks_mut(4096) {
        p[0] = 2;
    }
    let t0 = Instant::now();
    for (d, s) in dst.chunks_mut(1 << 20).zip(src.chunks(1 << 20)) {
        d.copy_from_slice(s);
    }
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    TOTAL as f64 / (1 << 20) as f64 / secs
}

pub fn page_cache_rate(dir: &Path, bytes: u64) -> Res<f64> {
    fresh_dir(dir)?;
    let mut out = Rotating::open(&dir.join("pc.log"), true)?;
    let buf = vec![b'x'; 64 * 1024];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = (out.room().min(left) as usize).min(buf.len());
        out.file.write_all(&buf[..k])?;
        out.wrote(k as u64, true)?;
        left -= k as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(out);
    let _ = fs::remove_dir_all(dir);
    Ok(bytes as f64 / (1 << 20) as f64 / secs)
}

/// Guest write → bytes in the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The daemon's CPU while it ran, % of one core.
    pub cpu_pct: f64,
}

/// `busy` pipes: `busy - 1` of them get a 100-byte line every 20 ms each from 2 writer
/// threads; the last one (the probe) gets a 100-byte line, and the time until the file
/// has grown by it is measured with inotify (what `tail -f` waits on), `probes` times,
/// 2–6 ms apart.
pub fn latency(d: &Daemon, dir: &Path, busy: usize, probes: usize) -> Res<Latency> {
    fresh_dir(dir)?;
    let mut c = connect(d)?;
    let probe_path = dir.join("probe.log");
    let mut probe = open_log(&mut c, &probe_path, 0)?;
    let writers = 2;
    let mut groups: Vec<Vec<File>> = (0..writers).map(|_| Vec::new()).collect();
    for i in 1..busy {
        groups[i % writers].push(open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?);
    }
    drop(c);
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = groups
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(|mut g| {
            let stop = stop.clone();
            thread::spawn(move || -> std::io::Result<()> {
                let mut line = [b'b'; 100];
                line[99] = b'\n';
                let period = Duration::from_millis(20);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    for f in g.iter_mut() {
                        f.write_all(&line)?;
                    }
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                Ok(())
            })
        })
        .collect();
    // SAFETY: inotify_init1 has no preconditions; the fd is wrapped at once.
    let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if ino < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: ino was just returned by inotify_init1 and is owned by nothing else.
    let ino = unsafe { OwnedFd::from_raw_fd(ino) };
    let cpath = std::ffi::CString::new(probe_path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid fd and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(ino.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let file = File::open(&probe_path)?;
    thread::sleep(Duration::from_millis(300));
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ busy as u64);
    let mut line = [b'p'; 100];
    line[99] = b'\n';
    let mut lat = Vec::with_capacity(probes);
    let mut want = file.metadata()?.len();
    let mut evbuf = [0u8; 4096];
    let cpu0 = d.cpu()?;
    let t_run = Instant::now();
    for _ in 0..probes {
        want += 100;
        let t0 = Instant::now();
        probe.write_all(&line)?;
        while file.metadata()?.len() < want {
            let mut pfd = libc::pollfd {
                fd: ino.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 5000) };
            if r == 0 {
                return Err("probe line not in the file after 5 s".into());
            }
            if r > 0 {
                // SAFETY: reading into our own buffer.
                unsafe { libc::read(ino.as_raw_fd(), evbuf.as_mut_ptr().cast(), evbuf.len()) };
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        thread::sleep(Duration::from_micros(2000 + rng.next() % 4000));
    }
    let secs = t_run.elapsed().as_secs_f64();
    let cpu = d.cpu()? - cpu0;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "writer panicked")??;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    Ok(Latency {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        cpu_pct: 100.0 * cpu / secs,
    })
}

/// Opens `n` logs (one line written into each) and keeps their write ends.
pub fn hold_pipes(d: &Daemon, dir: &Path, n: usize) -> Res<Vec<File>> {
    fresh_dir(dir)?;
    let mut c = connect(d)?;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let mut f = open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?;
        f.write_all(b"hello from vh-bench\n")?;
        v.push(f);
    }
    // Let the daemon drain the lines.
    thread::sleep(Duration::from_millis(300));
    Ok(v)
}
