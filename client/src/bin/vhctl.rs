//! `vhctl`: run a process with its output in a virtlogd-managed log, or holding virtlockd
//! leases on its disks; show logs across rotations; list what our daemons hold.
//!
//! Exit codes: 0 ok, 1 usage or connection error, 2 a lease is busy, otherwise the
//! wrapped command's own code (128 + signal number when it was killed).

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;
use vh_client::inspect;
use vh_client::{
    lease_name_for_path, ClientError, LockManager, LogManager, LogPosition, Owner, Target,
};

const EXIT_OK: i32 = 0;
const EXIT_USAGE: i32 = 1;
const EXIT_BUSY: i32 = 2;

const HELP: &str = "\
vhctl: use virtlogd / virtlockd (ours or libvirt's) from scripts and non-libvirt VMMs

USAGE:
  vhctl log-run [TARGET] --path LOG [--name N] [--uuid U] [--driver D] [--truncate] -- CMD [ARGS...]
      Open LOG through virtlogd (OpenLogFile) and run CMD with its stdout and stderr
      going into the pipe virtlogd drains: the file is capped at max_size and rotated
      into LOG.0..LOG.N (max_backups) by the daemon. CMD's exit code is vhctl's.
      Fails if another writer already has LOG open (\"Device or resource busy\").
      --name/--uuid/--driver only label the log in the daemon (default: CMD's basename,
      the nil uuid, driver \"vhctl\"). --truncate empties LOG first.

  vhctl log-show [TARGET] --path LOG [--follow]
      Print LOG from the oldest backup still on disk (LOG.N ... LOG.0, LOG) through
      ReadLogFile. --follow keeps polling (GetLogFilePosition drains the writer's pipe,
      ReadLogFile reads on) and follows rotations by inode. As with libvirt 9.0, a NUL
      byte cuts a ReadLogFile reply short; vhctl steps over it.

  vhctl lease [TARGET] [--shared] [--lockspace DIR | --indirect DIR] --disk PATH [--disk PATH...]
              [--name N] [--uuid U] [--id N] -- CMD [ARGS...]
      Register with virtlockd (owner pid = this vhctl process), acquire a lease per
      disk, then run CMD under vhctl's supervision and release everything when it exits.
      Lease kinds, matching libvirt's lockd plugin:
        (default)        direct lease: fcntl lock on PATH itself in the default lockspace;
                         PATH must exist.
        --indirect DIR   libvirt's file_lockspace_dir: lease named sha256(PATH) in DIR
                         (auto-created). Give PATH exactly as the domain XML has it to
                         exclude libvirt guests using the same disk.
        --lockspace DIR  named leases: each --disk value is used verbatim as the lease
                         name (no '/') in lockspace DIR (auto-created).
      --shared takes shared leases (like <shareable/>). If a lease is busy, CMD is not
      started and vhctl exits 2 naming the disk. Killing CMD releases its leases; if
      vhctl itself dies, virtlockd releases them and CMD is killed with it (SIGKILL via
      PR_SET_PDEATHSIG), so CMD never runs without its leases.

  vhctl status [--system | --session] [--logd-admin SOCK] [--lockd-admin SOCK] [--logs | --locks]
      List the logs our virtlogd holds open and the resources our virtlockd holds, via
      the operator-only inspect program on their admin sockets (the daemon's own uid
      only). libvirt's C daemons do not have it.

  vhctl help | --help | -h

TARGET (which daemon; default: --system as root, --session otherwise):
  --system         /run/libvirt/<daemon>-sock (never spawns the daemon)
  --session        $XDG_RUNTIME_DIR/libvirt/<daemon>-sock; starts `<daemon> --timeout=120`
                   ($VIRTLOGD_PATH / $VIRTLOCKD_PATH, else /usr/sbin/...) if not running
  --socket PATH    this socket (never spawns)

EXIT CODES: 0 ok, 1 usage or connection error, 2 lease busy, else the command's code.
";

/// A usage or runtime failure with the exit code it maps to.
struct Fail(i32, String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        Fail(EXIT_USAGE, e.message())
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail(EXIT_USAGE, e.to_string())
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail(EXIT_USAGE, format!("{} (see `vhctl --help`)", msg.into()))
}

/// The arguments of one subcommand: flags before `--`, the command after it.
struct Args {
    rest: Vec<OsString>,
    command: Vec<OsString>,
}

impl Args {
    fn new(argv: Vec<OsString>) -> Args {
        let mut rest = Vec::new();
        let mut command = Vec::new();
        let mut it = argv.into_iter();
        for a in it.by_ref() {
            if a == "--" {
                command = it.by_ref().collect();
                break;
            }
            rest.push(a);
        }
        Args { rest, command }
    }

    /// Takes `--name` (a switch).
    fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        before != self.rest.len()
    }

    /// Takes every `--name V` / `--name=V`.
    fn values(&mut self, name: &str) -> Result<Vec<OsString>, Fail> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        let mut it = std::mem::take(&mut self.rest).into_iter();
        let prefix = format!("{name}=");
        while let Some(a) = it.next() {
            if a == name {
                match it.next() {
                    Some(v) => out.push(v),
                    None => return Err(usage(format!("{name} needs a value"))),
                }
            } else if let Some(v) = a.as_bytes().strip_prefix(prefix.as_bytes()) {
                out.push(OsString::from(std::ffi::OsStr::from_bytes(v)));
            } else {
                keep.push(a);
            }
        }
        self.rest = keep;
        Ok(out)
    }

    /// Takes at most one `--name V`.
    fn value(&mut self, name: &str) -> Result<Option<OsString>, Fail> {
        let mut v = self.values(name)?;
        if v.len() > 1 {
            return Err(usage(format!("{name} given more than once")));
        }
        Ok(v.pop())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, Fail> {
        self.value(name)?
            .map(|v| {
                v.into_string()
                    .map_err(|_| usage(format!("{name}: value is not valid UTF-8")))
            })
            .transpose()
    }

    fn target(&mut self) -> Result<Target, Fail> {
        let system = self.flag("--system");
        let session = self.flag("--session");
        let socket = self.value("--socket")?;
        match (system, session, socket) {
            (false, false, None) => Ok(Target::current()),
            (true, false, None) => Ok(Target::System),
            (false, true, None) => Ok(Target::Session),
            (false, false, Some(p)) => Ok(Target::Socket(PathBuf::from(p))),
            _ => Err(usage("--system, --session and --socket exclude each other")),
        }
    }

    fn finish(&self, wants_command: bool) -> Result<(), Fail> {
        if let Some(a) = self.rest.first() {
            return Err(usage(format!("unknown argument '{}'", a.to_string_lossy())));
        }
        if wants_command && self.command.is_empty() {
            return Err(usage("missing `-- CMD [ARGS...]`"));
        }
        if !wants_command && !self.command.is_empty() {
            return Err(usage("this command takes no `-- CMD`"));
        }
        Ok(())
    }
}

fn parse_uuid(s: Option<String>) -> Result<[u8; 16], Fail> {
    match s {
        None => Ok([0; 16]),
        Some(s) => uuid::Uuid::parse_str(&s)
            .map(|u| *u.as_bytes())
            .map_err(|e| usage(format!("--uuid '{s}': {e}"))),
    }
}

fn default_name(command: &[OsString]) -> String {
    command
        .first()
        .and_then(|c| Path::new(c).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vhctl".into())
}

// ---- running the child -------------------------------------------------------------

/// The supervised child's pid, for the signal forwarder (0: none).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; only reads it.
        unsafe { (*info).si_code }
    };
    // Terminal-generated signals (SI_KERNEL) already reached the child's process group;
    // forward only what was sent to vhctl itself (kill(), including virtlockd's).
    if code == libc::SI_KERNEL {
        return;
    }
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill() is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn install_forwarders() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::SigAction(forward_signal),
        SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only loads an atomic and calls kill().
        unsafe { sigaction(s, &act) }.map_err(io::Error::from)?;
    }
    Ok(())
}

fn exit_code(st: ExitStatus) -> i32 {
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(EXIT_USAGE)
}

/// Spawns `command`, forwards signals to it, waits; returns its exit code.
fn supervise(mut cmd: Command, what: &str) -> Result<i32, Fail> {
    install_forwarders()?;
    let mut child = cmd
        .spawn()
        .map_err(|e| Fail(EXIT_USAGE, format!("cannot run {what}: {e}")))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let st = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    Ok(exit_code(st?))
}

fn command_of(argv: &[OsString]) -> Result<Command, Fail> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| usage("missing `-- CMD [ARGS...]`"))?;
    let mut c = Command::new(prog);
    c.args(args);
    Ok(c)
}

// ---- log-run -------------------------------------------------------------------------

fn log_run(mut a: Args) -> Result<i32, Fail> {
    let target = a.target()?;
    let path = a
        .value("--path")?
        .ok_or_else(|| usage("--path LOG is required"))?;
    let name = a
        .string("--name")?
        .unwrap_or_else(|| default_name(&a.command));
    let uuid = parse_uuid(a.string("--uuid")?)?;
    let driver = a.string("--driver")?.unwrap_or_else(|| "vhctl".into());
    let truncate = a.flag("--truncate");
    a.finish(true)?;
    let mut cmd = command_of(&a.command)?;

    let mut lm = LogManager::connect(&target)?;
    let (pipe, _pos) = lm
        .open_log(&driver, uuid, &name, Path::new(&path), truncate)
        .map_err(|e| {
            Fail(
                EXIT_USAGE,
                format!("can't connect to virtlogd: {}", e.message()),
            )
        })?;
    // As libvirt does for QEMU: the connection is only needed for the open.
    drop(lm);
    let err: OwnedFd = pipe.try_clone()?;
    cmd.stdout(Stdio::from(pipe)).stderr(Stdio::from(err));
    // The Command owns our copies of the write end and drops them after spawning, so the
    // child is the only writer and virtlogd sees EOF when it (and its children) exit.
    supervise(cmd, &a.command[0].to_string_lossy())
}

// ---- log-show ------------------------------------------------------------------------

struct LogPart {
    inode: u64,
    size: u64,
}

/// The files of a rotating log still on disk, oldest first: LOG.31 .. LOG.0, LOG.
fn log_chain(path: &Path) -> Vec<LogPart> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = (0..32)
        .rev()
        .map(|i| {
            let mut s = path.as_os_str().to_owned();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        })
        .collect();
    names.push(path.to_path_buf());
    for n in names {
        if let Ok(m) = std::fs::metadata(&n) {
            if m.is_file() {
                out.push(LogPart {
                    inode: m.ino(),
                    size: m.size(),
                });
            }
        }
    }
    out
}

fn log_show(mut a: Args) -> Result<i32, Fail> {
    let target = a.target()?;
    let path = PathBuf::from(
        a.value("--path")?
            .ok_or_else(|| usage("--path LOG is required"))?,
    );
    let follow = a.flag("--follow") | a.flag("-f");
    a.finish(false)?;
    let mut lm = LogManager::connect(&target)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut cur: Option<LogPosition> = None;
    loop {
        // Drains the pipe of an open log into the file (errors: the log is not open).
        let _ = lm.position(&path);
        let files = log_chain(&path);
        if files.is_empty() {
            if !follow {
                return Err(Fail(EXIT_USAGE, format!("{}: no such log", path.display())));
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let (i, off) = match cur {
            None => (0, 0),
            Some(p) => match files.iter().position(|f| f.inode == p.inode) {
                Some(i) => (i, p.offset),
                None => {
                    eprintln!("vhctl: the log rotated past the reader; some lines were lost");
                    (0, 0)
                }
            },
        };
        let f = &files[i];
        if off < f.size {
            let want = (f.size - off).min(vh_client::log::DEFAULT_READ_MAX);
            let pos = LogPosition {
                inode: f.inode,
                offset: off,
            };
            let data = lm.read(&path, pos, want)?;
            let adv = if data.is_empty() {
                // A NUL byte ends libvirt's reply string: step over it.
                write_out(&mut out, &[0])?;
                1
            } else {
                write_out(&mut out, &data)?;
                data.len() as u64
            };
            cur = Some(LogPosition {
                inode: f.inode,
                offset: off + adv,
            });
            continue;
        }
        if i + 1 < files.len() {
            cur = Some(LogPosition {
                inode: files[i + 1].inode,
                offset: 0,
            });
            continue;
        }
        cur = Some(LogPosition {
            inode: f.inode,
            offset: off,
        });
        if !follow {
            return Ok(EXIT_OK);
        }
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_out(out: &mut impl Write, data: &[u8]) -> Result<(), Fail> {
    match out.write_all(data) {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): a normal end.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(EXIT_OK),
        Err(e) => Err(e.into()),
    }
}

// ---- lease ---------------------------------------------------------------------------

enum LeaseKind {
    Direct,
    Indirect(String),
    Named(String),
}

struct Lease {
    disk: String,
    lockspace: String,
    name: String,
}

fn lease(mut a: Args) -> Result<i32, Fail> {
    let target = a.target()?;
    let shared = a.flag("--shared");
    let lockspace = a.string("--lockspace")?;
    let indirect = a.string("--indirect")?;
    let kind = match (lockspace, indirect) {
        (None, None) => LeaseKind::Direct,
        (None, Some(d)) => LeaseKind::Indirect(d),
        (Some(d), None) => LeaseKind::Named(d),
        _ => return Err(usage("--lockspace and --indirect exclude each other")),
    };
    let disks = a.values("--disk")?;
    if disks.is_empty() {
        return Err(usage("at least one --disk PATH is required"));
    }
    let name = a
        .string("--name")?
        .unwrap_or_else(|| default_name(&a.command));
    let uuid = parse_uuid(a.string("--uuid")?)?;
    let id = match a.string("--id")? {
        None => 1,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if n != 0 => n,
            _ => return Err(usage(format!("--id '{s}': must be a non-zero number"))),
        },
    };
    a.finish(true)?;
    let mut leases = Vec::with_capacity(disks.len());
    for d in disks {
        let disk = d
            .into_string()
            .map_err(|_| usage("--disk: path is not valid UTF-8 (the lock protocol needs it)"))?;
        let (lockspace, name) = match &kind {
            LeaseKind::Direct => (String::new(), disk.clone()),
            LeaseKind::Indirect(dir) => (dir.clone(), lease_name_for_path(&disk)),
            LeaseKind::Named(dir) => {
                if disk.is_empty() || disk.contains('/') || disk == "." || disk == ".." {
                    return Err(usage(format!(
                        "--disk '{disk}': with --lockspace, a lease name without '/'"
                    )));
                }
                (dir.clone(), disk.clone())
            }
        };
        leases.push(Lease {
            disk,
            lockspace,
            name,
        });
    }
    let autocreate = !matches!(kind, LeaseKind::Direct);
    let mut cmd = command_of(&a.command)?;

    // Owner = this process, on this process's own connection (peer pid == owner pid):
    // if vhctl dies, virtlockd releases the leases (and PDEATHSIG takes CMD down too).
    let mut lm = LockManager::connect(&target)?;
    lm.register(&Owner {
        uuid,
        name,
        id,
        pid: std::process::id(),
    })?;
    match &kind {
        LeaseKind::Indirect(dir) | LeaseKind::Named(dir) => lm.create_lockspace(dir)?,
        LeaseKind::Direct => {}
    }
    let mut held: Vec<&Lease> = Vec::new();
    for l in &leases {
        if let Err(e) = lm.acquire(&l.lockspace, &l.name, shared, autocreate) {
            release_all(&mut lm, &held);
            let code = if e.is_busy() { EXIT_BUSY } else { EXIT_USAGE };
            let what = if e.is_busy() {
                format!("disk '{}' is busy, not starting the command", l.disk)
            } else {
                format!("cannot lock disk '{}'", l.disk)
            };
            return Err(Fail(code, format!("{what}: {}", e.message())));
        }
        held.push(l);
    }

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the child between fork and exec; prctl, getppid and _exit are
    // async-signal-safe, nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // vhctl died before the prctl took effect: its leases are gone.
            if libc::getppid() != parent {
                libc::_exit(EXIT_USAGE);
            }
            Ok(())
        });
    }
    let code = match supervise(cmd, &a.command[0].to_string_lossy()) {
        Ok(c) => c,
        Err(e) => {
            release_all(&mut lm, &held);
            return Err(e);
        }
    };
    release_all(&mut lm, &held);
    Ok(code)
}

/// Releases in reverse order; failures are reported, not fatal (if the connection is
/// gone, the daemon released everything already).
fn release_all(lm: &mut LockManager, held: &[&Lease]) {
    for l in held.iter().rev() {
        if let Err(e) = lm.release(&l.lockspace, &l.name) {
            eprintln!(
                "vhctl: cannot release lease on '{}': {}",
                l.disk,
                e.message()
            );
        }
    }
}

// ---- status --------------------------------------------------------------------------

fn status(mut a: Args) -> Result<i32, Fail> {
    let system = a.flag("--system");
    let session = a.flag("--session");
    let base = match (system, session) {
        (true, true) => return Err(usage("--system and --session exclude each other")),
        (true, false) => Target::System,
        (false, true) => Target::Session,
        (false, false) => Target::current(),
    };
    let logd = a
        .value("--logd-admin")?
        .map_or(base.clone(), |p| Target::Socket(p.into()));
    let lockd = a
        .value("--lockd-admin")?
        .map_or(base, |p| Target::Socket(p.into()));
    let only_logs = a.flag("--logs");
    let only_locks = a.flag("--locks");
    a.finish(false)?;
    let mut failed = false;
    let mut report = |daemon: &str, e: ClientError| {
        if e.is_not_running() {
            println!("{daemon}: not running");
        } else if e.is_unsupported() {
            eprintln!(
                "vhctl: {daemon} does not serve the inspect program (libvirt's C daemon?): {}",
                e.message()
            );
            failed = true;
        } else {
            eprintln!("vhctl: {daemon}: {}", e.message());
            failed = true;
        }
    };
    if !only_locks {
        match inspect::list_logs(&logd) {
            Ok(list) => {
                println!("virtlogd: {} open log(s)", list.len());
                for l in list {
                    println!(
                        "  {}\tdriver={} domain={} uuid={} inode={} offset={}",
                        String::from_utf8_lossy(&l.path),
                        l.driver,
                        l.domname,
                        uuid::Uuid::from_bytes(l.domuuid),
                        l.inode,
                        l.offset
                    );
                }
            }
            Err(e) => report("virtlogd", e),
        }
    }
    if !only_logs {
        match inspect::list_locks(&lockd) {
            Ok(list) => {
                println!("virtlockd: {} held resource(s)", list.len());
                for l in list {
                    let owners: Vec<String> = l.owners.iter().map(u32::to_string).collect();
                    let ls = if l.lockspace.is_empty() {
                        "(default)".to_string()
                    } else {
                        l.lockspace
                    };
                    println!(
                        "  {ls}\t{}\t{}\towners={} path={}",
                        l.name,
                        if l.shared { "shared" } else { "exclusive" },
                        owners.join(","),
                        l.path
                    );
                }
            }
            Err(e) => report("virtlockd", e),
        }
    }
    Ok(if failed { EXIT_USAGE } else { EXIT_OK })
}

fn main() {
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if argv.is_empty() {
        eprint!("{HELP}");
        std::process::exit(EXIT_USAGE);
    }
    let sub = argv.remove(0);
    let args = Args::new(argv);
    let wants_help = args.rest.iter().any(|a| a == "--help" || a == "-h");
    let res = match sub.to_str() {
        Some("help" | "--help" | "-h") => {
            print!("{HELP}");
            Ok(EXIT_OK)
        }
        Some(_) if wants_help => {
            print!("{HELP}");
            Ok(EXIT_OK)
        }
        Some("log-run") => log_run(args),
        Some("log-show") => log_show(args),
        Some("lease") => lease(args),
        Some("status") => status(args),
        _ => Err(usage(format!(
            "unknown command '{}'",
            sub.to_string_lossy()
        ))),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(Fail(code, msg)) => {
            eprintln!("vhctl: {msg}");
            std::process::exit(code);
        }
    }
}
