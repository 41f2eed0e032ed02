//! virtlogd load: pipes from OpenLogFile fed by writer threads.

use crate::daemon::{thread_cpu, Daemon, Res};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
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
    let poll = if npipes > 100 {
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
    for i in 0..npipes {
        let f = open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?;
        let n = groups.len();
        groups[i % n].push(f);
    }
    drop(c);
    let sampler = RssSampler::start(d.pid);
    let cpu0 = d.cpu()?;
    let t0 = Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|mut g| {
            thread::spawn(move || -> std::io::Result<()> {
                let buf = chunk();
                let mut left: Vec<u64> = vec![per_pipe; g.len()];
                let mut active = g.len();
                while active > 0 {
                    active = 0;
                    for (f, l) in g.iter_mut().zip(left.iter_mut()) {
                        if *l == 0 {
                            continue;
                        }
                        let n = (*l).min(CHUNK as u64) as usize;
                        f.write_all(&buf[..n])?;
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
    })
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
    for i in 0..npipes {
        groups[i % writers].push(open_log(&mut c, &dir.join(format!("vm{i}.log")), i)?);
    }
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
                    g[i].write_all(&line)?;
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
    })
}

/// The pipe→file reference, like `cat` in the spec: the same writer into the stdin pipe
/// of a separate process (`vh-bench copy`) that copies with 64 KiB read/write into an
/// `O_APPEND` file on the same disk and reports its own CPU time.
///
/// With `rotate_at`, the file is truncated whenever it reaches that size, so, like a
/// rotating log, it never holds more than that (the page cache never fills with dirty
/// pages that must reach the disk).
pub fn reference(dir: &Path, bytes: u64, rotate_at: Option<u64>) -> Res<Flow> {
    fresh_dir(dir)?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("copy").arg(dir.join("ref.log"));
    if let Some(r) = rotate_at {
        cmd.arg(r.to_string());
    }
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut wr = child.stdin.take().ok_or("no stdin pipe")?;
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
    Ok(Flow {
        mib_s: n as f64 / (1 << 20) as f64 / secs,
        cpu_per_gib: cpu / (n as f64 / (1u64 << 30) as f64),
        peak_rss_kib: 0,
    })
}

/// `vh-bench copy PATH [ROTATE_AT]`: stdin → PATH (O_APPEND), 64 KiB read/write; prints
/// bytes copied and this process's CPU seconds.
pub fn copy_main(path: &Path, rotate_at: Option<u64>) -> Res<()> {
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mut rd = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut since) = (0u64, 0u64);
    loop {
        let k = match rd.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..k])?;
        n += k as u64;
        if let Some(r) = rotate_at {
            since += k as u64;
            if since >= r {
                out.set_len(0)?;
                since = 0;
            }
        }
    }
    println!("{n} {}", thread_cpu());
    Ok(())
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
