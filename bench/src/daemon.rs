//! Spawning a daemon (ours or libvirt's C one) in system mode inside a private mount
//! namespace, and reading its counters from /proc. Finding the binaries, the namespace
//! and the stop are the test kit's (`vh-testkit`), as for the tests.

use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Logd,
    Lockd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        self.service().name()
    }

    fn service(self) -> vh_testkit::Service {
        match self {
            Kind::Logd => vh_testkit::Service::Virtlogd,
            Kind::Lockd => vh_testkit::Service::Virtlockd,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    C,
    Ours,
}

impl Impl {
    pub fn label(self) -> &'static str {
        match self {
            Impl::C => "C 9.0",
            Impl::Ours => "ours",
        }
    }
}

/// Where the binaries live: ours in `ours_dir` (the kit's [`vh_testkit::bin_dir`]),
/// the C ones where the kit finds them.
#[derive(Debug, Clone)]
pub struct Bins {
    pub ours_dir: PathBuf,
}

impl Bins {
    pub fn path(&self, kind: Kind, imp: Impl) -> PathBuf {
        match imp {
            Impl::C => vh_testkit::locate(vh_testkit::DaemonKind::C, kind.service()),
            Impl::Ours => self.ours_dir.join(kind.name()),
        }
    }
}

/// Starts a daemon `launch` describes with `-f conf`, its stdout and stderr into `log`.
pub fn launch(launch: vh_testkit::Launch, conf: &Path, log: fs::File) -> io::Result<Child> {
    launch
        .command()
        .arg("-f")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// A running daemon; stopped on drop by the kit's one policy ([`vh_testkit::stop`]).
pub struct Daemon {
    child: Child,
    pub pid: i32,
    pub kind: Kind,
    pub imp: Impl,
    /// Time from spawn until the first successful connect().
    pub startup: Duration,
}

fn conf_text(kind: Kind) -> String {
    let mut s = String::from(
        "log_level = 3\nlog_outputs = \"3:stderr\"\nmax_clients = 10000\nmax_anonymous_clients = 10000\n",
    );
    if kind == Kind::Logd {
        s.push_str("max_size = 2097152\nmax_backups = 3\n");
    }
    s
}

impl Daemon {
    pub fn spawn(bins: &Bins, kind: Kind, imp: Impl, work: &Path) -> Res<Daemon> {
        let bin = bins.path(kind, imp);
        if !bin.exists() {
            return Err(format!(
                "{} not found (build with cargo build --release)",
                bin.display()
            )
            .into());
        }
        let conf = work.join(format!("{}-{}.conf", kind.name(), tag(imp)));
        fs::write(&conf, conf_text(kind))?;
        let errlog = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join(format!("{}-{}.stderr", kind.name(), tag(imp))))?;
        let t0 = Instant::now();
        let child = launch(vh_testkit::Launch::new(&bin), &conf, errlog)?;
        let pid = child.id() as i32;
        let mut d = Daemon {
            child,
            pid,
            kind,
            imp,
            startup: Duration::ZERO,
        };
        let sock = d.socket();
        loop {
            if UnixStream::connect(&sock).is_ok() {
                d.startup = t0.elapsed();
                break;
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(format!(
                    "{} ({}) exited during start-up: {st}",
                    kind.name(),
                    imp.label()
                )
                .into());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(
                    format!("{} ({}) not ready after 20 s", kind.name(), imp.label()).into(),
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(d)
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/libvirt/{}-sock",
            self.pid,
            self.kind.name()
        ))
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// utime + stime of all threads, in seconds.
    pub fn cpu(&self) -> Res<f64> {
        let f = stat_fields(self.pid)?;
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Ok(ticks / if hz > 0 { hz as f64 } else { 100.0 })
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> Res<u64> {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        for l in s.lines() {
            if let Some(v) = l.strip_prefix("VmRSS:") {
                return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
            }
        }
        Err("no VmRSS".into())
    }

    pub fn nfds(&self) -> Res<usize> {
        Ok(fs::read_dir(format!("/proc/{}/fd", self.pid))?.count())
    }

    /// Open pipe fds (the logs' read ends, for virtlogd).
    pub fn npipes(&self) -> Res<usize> {
        let mut n = 0;
        for e in fs::read_dir(format!("/proc/{}/fd", self.pid))? {
            if fs::read_link(e?.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Changes on every exec (ASLR'd auxv entries), never otherwise.
    pub fn exec_fingerprint(&self) -> io::Result<Vec<u8>> {
        fs::read(format!("/proc/{}/auxv", self.pid))
    }

    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

pub fn tag(imp: Impl) -> &'static str {
    match imp {
        Impl::C => "c",
        Impl::Ours => "ours",
    }
}

/// The fields of /proc/PID/stat after the command name; index 0 is field 3 (state).
fn stat_fields(pid: i32) -> Res<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(')').map(|(_, r)| r).ok_or("bad stat")?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        vh_testkit::stop(&mut self.child);
    }
}

/// CPU seconds (user + system) of the calling thread.
pub fn thread_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (inherited by the daemons).
pub fn raise_nofile() -> u64 {
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}
