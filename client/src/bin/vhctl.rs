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
use vh_proto::manual::{self, Block, Page, Section};
use vh_proto::paths::DaemonKind;

const EXIT_OK: i32 = 0;
const EXIT_USAGE: i32 = 1;
const EXIT_BUSY: i32 = 2;

/// vhctl's manual: `--help` and vhctl(1) are both rendered from it.
fn page() -> Page {
    let item = |t: &str, d: &str| Block::Item(t.to_string(), d.to_string());
    let commands = vec![
        item(
            "log-run [TARGET] --path LOG [--name N] [--uuid U] [--driver D] [--truncate] -- CMD [ARGS...]",
            "Open LOG through virtlogd (OpenLogFile) and run CMD with its stdout and stderr \
             going into the pipe virtlogd drains: the file is capped at max_size and rotated \
             into LOG.0..LOG.N (max_backups) by the daemon. CMD's exit code is vhctl's. \
             Fails if another writer already has LOG open (\"Device or resource busy\"). \
             --name/--uuid/--driver only label the log in the daemon (default: CMD's \
             basename, the nil uuid, driver \"vhctl\"). --truncate empties LOG first.",
        ),
        item(
            "log-show [TARGET] --path LOG [--follow [--logd-admin SOCK]]",
            "Print LOG from the oldest backup still on disk (LOG.N ... LOG.0, LOG) through \
             ReadLogFile. --follow then prints each byte as virtlogd writes it, across any \
             number of rotations, without polling: our virtlogd pushes it over its admin \
             socket (the daemon's uid only; libvirt's C daemon cannot). If this output is \
             read too slowly, the daemon drops what does not fit and vhctl says on stderr \
             how many bytes are not shown; the log itself never waits. When the log closes \
             or the daemon re-executes, vhctl reads what it missed and waits for the log to \
             reopen. As with libvirt 9.0, a NUL byte cuts a ReadLogFile reply short; vhctl \
             steps over it.",
        ),
        item(
            "lease [TARGET] [--shared] [--lockspace DIR | --indirect DIR] --disk PATH [--disk PATH...] [--name N] [--uuid U] [--id N] -- CMD [ARGS...]",
            "Register with virtlockd (owner pid = this vhctl process), acquire a lease per \
             disk, then run CMD under vhctl's supervision and release everything when it \
             exits. Lease kinds, matching libvirt's lockd plugin:",
        ),
        Block::Pre(
            "(default)        direct lease: fcntl lock on PATH itself in the default\n\
             \x20                lockspace; PATH must exist.\n\
             --indirect DIR   libvirt's file_lockspace_dir: lease named sha256(PATH) in\n\
             \x20                DIR (auto-created). Give PATH exactly as the domain XML\n\
             \x20                has it to exclude libvirt guests using the same disk.\n\
             --lockspace DIR  named leases: each --disk value is used verbatim as the\n\
             \x20                lease name (no '/') in lockspace DIR (auto-created)."
                .to_string(),
        ),
        Block::Para(
            "--shared takes shared leases (like <shareable/>). If a lease is busy, CMD is \
             not started and vhctl exits 2 naming the disk. Killing CMD releases its leases; \
             if vhctl itself dies, virtlockd releases them and CMD is killed with it \
             (SIGKILL via PR_SET_PDEATHSIG), so CMD never runs without its leases."
                .to_string(),
        ),
        item(
            "status [--system | --session] [--logd-admin SOCK] [--lockd-admin SOCK] [--logs | --locks]",
            "List the logs our virtlogd holds open and the resources our virtlockd holds, \
             via the operator-only inspect program on their admin sockets (the daemon's own \
             uid only). libvirt's C daemons do not have it.",
        ),
        item(
            "holders DIR [--stale SECS]",
            "Who holds the leases of a shared lockspace DIR, across hosts: the heartbeat each \
             host's virtlockd writes there when lease renewal is on (.virtlockd-renew.<host>), \
             flagged STALE when not renewed for SECS (default 30) while it lists leases; then \
             every lease file with its lock as this host sees it (F_GETLK) and the holder \
             record our virtlockd writes into exclusive lease files. Hosts without renewal \
             (libvirt's C daemon) show up only through their locks.",
        ),
        item(
            "metrics [--system | --session] [--logd-admin SOCK] [--lockd-admin SOCK]",
            "Print both daemons' figures in the Prometheus text format (for node_exporter's \
             textfile collector): virtlogd_up, virtlogd_logs_open, and per log path \
             virtlogd_log_written_bytes_total, virtlogd_log_dropped_bytes_total and \
             virtlogd_log_rotations_total, virtlogd_log_followers; virtlockd_up, virtlockd_leases_held{lockspace} \
             (the default lockspace is \"\"), virtlockd_owners, \
             virtlockd_lease_losses_total. Counters survive a re-exec.",
        ),
        item(
            "man [vhctl | virtlogd | virtlockd]",
            "Print the man page (roff) of vhctl(1), virtlogd(8) or virtlockd(8), rendered \
             from the same source as the --help texts.",
        ),
        item("help | --help | -h", "This text."),
    ];
    let target = vec![
        Block::Para("Which daemon; default: --system as root, --session otherwise.".into()),
        item(
            "--system",
            "/run/libvirt/<daemon>-sock (never starts the daemon).",
        ),
        item(
            "--session",
            "$XDG_RUNTIME_DIR/libvirt/<daemon>-sock; starts `<daemon> --timeout=120` if it \
             is not running, and says which binary: $VIRTLOGD_PATH / $VIRTLOCKD_PATH, else \
             ours beside vhctl, else /usr/sbin/<daemon> (which may be libvirt's).",
        ),
        item("--socket PATH", "This socket (never starts the daemon)."),
        Block::Para(
            "Relative LOG and PATH arguments are taken from vhctl's working directory.".into(),
        ),
    ];
    let exit = vec![
        item("0", "Success."),
        item(
            "1",
            "Usage or connection error, or an error from the daemon.",
        ),
        item("2", "A lease is busy (lease); the command was not started."),
        item(
            "other",
            "log-run and lease: the command's own exit code (128 + the signal number if \
             it was killed).",
        ),
    ];
    Page {
        name: "vhctl".into(),
        section: 1,
        summary: "use virtlogd / virtlockd (ours or libvirt's) from scripts and non-libvirt VMMs"
            .into(),
        synopsis: vec![
            "vhctl log-run | log-show | lease | status | holders | metrics | man | help [OPTIONS]"
                .into(),
        ],
        sections: vec![
            Section {
                title: "Commands".into(),
                blocks: commands,
            },
            Section {
                title: "Target".into(),
                blocks: target,
            },
            Section {
                title: "Exit codes".into(),
                blocks: exit,
            },
            Section {
                title: "See also".into(),
                blocks: vec![Block::Para("virtlogd(8), virtlockd(8)".into())],
            },
        ],
    }
}

/// `vhctl man PAGE`: the roff source of a man page.
fn man(mut a: Args) -> Result<i32, Fail> {
    let which = a.rest.pop();
    a.finish(false)?;
    let page = match which.as_ref().and_then(|w| w.to_str()) {
        None | Some("vhctl") => page(),
        Some("virtlogd") => manual::daemon_page(DaemonKind::Logd),
        Some("virtlockd") => manual::daemon_page(DaemonKind::Lockd),
        Some(w) => return Err(usage(format!("no man page '{w}'"))),
    };
    write_out(&mut io::stdout().lock(), page.roff().as_bytes())?;
    Ok(EXIT_OK)
}

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

/// A path as the user meant it: relative to vhctl's working directory, not to the
/// daemon's (which is `/`).
fn absolute(p: OsString) -> Result<PathBuf, Fail> {
    std::path::absolute(PathBuf::from(&p))
        .map_err(|e| usage(format!("cannot resolve '{}': {e}", p.to_string_lossy())))
}

/// In session mode, says which binary is about to be started when the daemon is not
/// running (the library spawns it on the first connect).
fn announce_spawn(kind: DaemonKind, target: &Target) {
    if *target != Target::Session || nix::unistd::geteuid().is_root() {
        return;
    }
    let Ok(sock) = target.socket(kind) else {
        return;
    };
    if std::os::unix::net::UnixStream::connect(&sock).is_err() {
        eprintln!(
            "vhctl: {} is not running; starting {}",
            kind.name(),
            vh_client::connect::daemon_binary(kind).display()
        );
    }
}

/// Session daemons are started from `$VIRTLOGD_PATH` / `$VIRTLOCKD_PATH`, else, unlike
/// libvirt's clients, from ours beside vhctl when it is there: falling back to
/// /usr/sbin would start libvirt's C daemon next to our vhctl.
fn prefer_our_daemons() {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    else {
        return;
    };
    for (var, name) in [
        ("VIRTLOGD_PATH", "virtlogd"),
        ("VIRTLOCKD_PATH", "virtlockd"),
    ] {
        let ours = dir.join(name);
        if std::env::var_os(var).unwrap_or_default().is_empty() && ours.is_file() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var(var, &ours) };
        }
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
    let path = absolute(
        a.value("--path")?
            .ok_or_else(|| usage("--path LOG is required"))?,
    )?;
    let name = a
        .string("--name")?
        .unwrap_or_else(|| default_name(&a.command));
    let uuid = parse_uuid(a.string("--uuid")?)?;
    let driver = a.string("--driver")?.unwrap_or_else(|| "vhctl".into());
    let truncate = a.flag("--truncate");
    a.finish(true)?;
    let mut cmd = command_of(&a.command)?;

    announce_spawn(DaemonKind::Logd, &target);
    let mut lm = LogManager::connect(&target)?;
    let (pipe, _pos) = lm
        .open_log(&driver, uuid, &name, &path, truncate)
        .map_err(|e| {
            Fail(
                EXIT_USAGE,
                format!(
                    "virtlogd cannot open the log {}: {}",
                    path.display(),
                    e.message()
                ),
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
    let admin = a.value("--logd-admin")?;
    let path = absolute(
        a.value("--path")?
            .ok_or_else(|| usage("--path LOG is required"))?,
    )?;
    let follow = a.flag("--follow") | a.flag("-f");
    a.finish(false)?;
    announce_spawn(DaemonKind::Logd, &target);
    let mut lm = LogManager::connect(&target)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    if !follow {
        // Drains the pipe of an open log into the file (errors: the log is not open).
        let _ = lm.position(&path);
        show_range(&mut lm, &path, None, None, &mut out)?;
        return Ok(EXIT_OK);
    }
    let admin = match admin {
        Some(p) => Target::Socket(p.into()),
        None => admin_of(&target),
    };
    follow_log(&mut lm, &admin, &path, &mut out)
}

/// The admin socket beside a main socket given by path (`virtlogd-sock` →
/// `virtlogd-admin-sock`), else the target's own.
fn admin_of(target: &Target) -> Target {
    match target {
        Target::Socket(p) => {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            match name.as_deref().and_then(|n| n.strip_suffix("-sock")) {
                Some(stem) if !stem.ends_with("-admin") => {
                    Target::Socket(p.with_file_name(format!("{stem}-admin-sock")))
                }
                _ => target.clone(),
            }
        }
        t => t.clone(),
    }
}

/// `--follow`: the daemon pushes each byte as it is written (FOLLOW_LOG); nothing is
/// polled while the log is open. What was written before the stream starts, or while
/// it was down (the log closed, the daemon re-executed), is read with ReadLogFile from
/// where the output stopped, so the output has no gap and no duplicate.
fn follow_log(
    lm: &mut LogManager,
    admin: &Target,
    path: &Path,
    out: &mut impl Write,
) -> Result<i32, Fail> {
    let mut pos: Option<LogPosition> = None;
    let mut waiting = false;
    // Retry delay while the log is not open: short at first, since a re-exec makes
    // it look closed for a moment and whatever is written meanwhile must be read
    // back from files that keep rotating.
    let mut retry = Duration::from_millis(5);
    loop {
        let (inode, offset, stream) = match inspect::follow_log(admin, path) {
            Ok(s) => s,
            Err(e) if is_not_open(&e) => {
                // Nothing writes the log: show what is there, then wait for a writer
                // (the one poll left, backing off to twice a second, only while the log
                // is not open).
                let _ = lm.position(path);
                if log_chain(path).is_empty() && pos.is_none() && !waiting {
                    eprintln!("vhctl: {}: no such log yet; waiting", path.display());
                } else {
                    pos = Some(show_range(lm, path, pos, None, out)?);
                }
                waiting = true;
                let _ = out.flush();
                std::thread::sleep(retry);
                retry = (retry * 2).min(Duration::from_millis(500));
                continue;
            }
            // libvirt's C daemon, or an admin socket we may not use (another uid):
            // the old way, polling the main socket.
            Err(e) if e.is_unsupported() || is_denied(&e) => {
                eprintln!(
                    "vhctl: cannot stream this log ({}); polling it instead",
                    e.message()
                );
                return poll_log(lm, path, pos, out);
            }
            Err(e) => return Err(e.into()),
        };
        waiting = false;
        retry = Duration::from_millis(5);
        let start = LogPosition { inode, offset };
        show_range(lm, path, pos, Some(start), out)?;
        let mut cur = start;
        let _ = out.flush();
        loop {
            match inspect::next_record(&stream)? {
                inspect::FollowRecord::Data(d) => {
                    write_out(out, &d)?;
                    cur.offset += d.len() as u64;
                    let _ = out.flush();
                }
                inspect::FollowRecord::Missed(n) => {
                    eprintln!(
                        "vhctl: {n} bytes of {} were written faster than this output was read \
                         and are not shown",
                        path.display()
                    );
                    cur.offset += n;
                }
                inspect::FollowRecord::Rotated(inode) => {
                    cur = LogPosition { inode, offset: 0 };
                }
                inspect::FollowRecord::End => break,
            }
        }
        pos = Some(cur);
    }
}

fn is_denied(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if io.raw_os_error() == Some(libc::EACCES))
}

/// `--follow` without FOLLOW_LOG: GetLogFilePosition (which drains the writer's pipe)
/// and ReadLogFile from where the output stopped, five times a second.
fn poll_log(
    lm: &mut LogManager,
    path: &Path,
    mut pos: Option<LogPosition>,
    out: &mut impl Write,
) -> Result<i32, Fail> {
    loop {
        let _ = lm.position(path);
        if !log_chain(path).is_empty() {
            pos = Some(show_range(lm, path, pos, None, out)?);
        }
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_not_open(e: &ClientError) -> bool {
    matches!(e, ClientError::Remote(r) if r.message().contains("No open log file"))
}

/// Prints the log from `from` (the oldest file still on disk if `None`) up to `to` (the
/// end of the newest file if `None`), across rotations by inode. Returns where it
/// stopped.
fn show_range(
    lm: &mut LogManager,
    path: &Path,
    from: Option<LogPosition>,
    to: Option<LogPosition>,
    out: &mut impl Write,
) -> Result<LogPosition, Fail> {
    let mut cur = from;
    loop {
        let files = log_chain(path);
        if files.is_empty() {
            return match (to, cur) {
                (Some(t), _) => Ok(t),
                (None, Some(c)) => Ok(c),
                _ => Err(Fail(EXIT_USAGE, format!("{}: no such log", path.display()))),
            };
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
        let stop = match to {
            Some(t) => match files.iter().position(|f| f.inode == t.inode) {
                Some(s) => Some(s),
                None => {
                    eprintln!(
                        "vhctl: the log rotated before its history could be read; some lines \
                         were lost"
                    );
                    return Ok(t);
                }
            },
            None => None,
        };
        let f = &files[i];
        let limit = match (to, stop) {
            (Some(t), Some(s)) if s == i => t.offset,
            (Some(t), Some(s)) if s < i => return Ok(t),
            _ => f.size,
        };
        if off < limit {
            let want = (limit - off).min(vh_client::log::DEFAULT_READ_MAX);
            let pos = LogPosition {
                inode: f.inode,
                offset: off,
            };
            let data = lm.read(path, pos, want)?;
            let adv = if data.is_empty() {
                // A NUL byte ends libvirt's reply string: step over it.
                write_out(out, &[0])?;
                1
            } else {
                write_out(out, &data)?;
                data.len() as u64
            };
            cur = Some(LogPosition {
                inode: f.inode,
                offset: off + adv,
            });
            continue;
        }
        if let (Some(t), Some(s)) = (to, stop) {
            if s == i {
                return Ok(t);
            }
        }
        if i + 1 < files.len() {
            cur = Some(LogPosition {
                inode: files[i + 1].inode,
                offset: 0,
            });
            continue;
        }
        return Ok(LogPosition {
            inode: f.inode,
            offset: off,
        });
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
    announce_spawn(DaemonKind::Lockd, &target);
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

/// `[--system | --session] [--logd-admin SOCK] [--lockd-admin SOCK]`: where the two
/// admin sockets are.
fn admin_targets(a: &mut Args) -> Result<(Target, Target), Fail> {
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
    Ok((logd, lockd))
}

fn status(mut a: Args) -> Result<i32, Fail> {
    let (logd, lockd) = admin_targets(&mut a)?;
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
                println!("  {}", store_line(DaemonKind::Logd, &logd));
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
                println!("  {}", store_line(DaemonKind::Lockd, &lockd));
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

/// `fd store: ...` for `vhctl status` (a daemon of ours older than FD_STORE says so).
fn store_line(kind: DaemonKind, target: &Target) -> String {
    match inspect::fd_store(kind, target) {
        Ok(i) if i.enabled => format!(
            "fd store: on, {} fd(s) held there ({} snapshots written)",
            i.stored, i.snapshots
        ),
        Ok(_) => "fd store: off".to_string(),
        Err(e) if e.is_unsupported() => "fd store: unknown (daemon predates it)".to_string(),
        Err(e) => format!("fd store: cannot ask: {}", e.message()),
    }
}

/// The lock on byte 0 of `path` as another process sees it.
fn lock_state(path: &Path) -> String {
    use std::os::fd::AsRawFd;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("cannot open: {e}"),
    };
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    match nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut fl)) {
        Err(e) => format!("F_GETLK failed: {e}"),
        Ok(_) => match i32::from(fl.l_type) {
            libc::F_UNLCK => "unlocked".into(),
            // An OFD lock (our virtlockd's leases) belongs to an open file, not a process:
            // the kernel reports it with pid -1.
            libc::F_RDLCK if fl.l_pid == -1 => "read-locked (OFD lock)".into(),
            libc::F_RDLCK => format!("read-locked (pid {})", fl.l_pid),
            _ if fl.l_pid == -1 => "write-locked (OFD lock)".into(),
            _ => format!("write-locked (pid {})", fl.l_pid),
        },
    }
}

/// `key=value` lines of a heartbeat or holder record.
fn fields(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect()
}

fn holders(mut a: Args) -> Result<i32, Fail> {
    let stale: u64 = match a.string("--stale")? {
        None => 30,
        Some(v) => v
            .parse()
            .map_err(|_| usage(format!("--stale: '{v}' is not a number of seconds")))?,
    };
    let dir = match a.rest.len() {
        1 => PathBuf::from(a.rest.remove(0)),
        _ => return Err(usage("holders needs one lockspace directory")),
    };
    a.finish(false)?;
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Fail(EXIT_USAGE, format!("{}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!("lockspace {}", dir.display());
    let mut renewing: Vec<(String, String)> = Vec::new();
    for n in names.iter().filter(|n| n.starts_with(".virtlockd-renew.")) {
        let text = std::fs::read_to_string(dir.join(n)).unwrap_or_default();
        let f = fields(&text);
        let get = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        let host = get("host").unwrap_or("?");
        let renewed: u64 = get("renewed").and_then(|v| v.parse().ok()).unwrap_or(0);
        let leases: Vec<&str> = f
            .iter()
            .filter(|(k, _)| *k == "lease")
            .map(|(_, v)| *v)
            .collect();
        let age = now.saturating_sub(renewed);
        let flag = if !leases.is_empty() && age > stale {
            format!("STALE: not renewed for {age}s, its leases may be lost or taken")
        } else {
            format!("renewed {age}s ago")
        };
        println!(
            "host {host} (virtlockd pid {}): {flag}, {} lease(s)",
            get("daemon_pid").unwrap_or("?"),
            leases.len()
        );
        for l in leases {
            println!("  {l}");
            let name = l.split(' ').next().unwrap_or_default();
            renewing.push((name.to_string(), host.to_string()));
        }
    }
    println!("lease files (locks as seen from this host):");
    for n in names.iter().filter(|n| !n.starts_with('.')) {
        let path = dir.join(n);
        let hosts: Vec<&str> = renewing
            .iter()
            .filter(|(l, _)| l == n)
            .map(|(_, h)| h.as_str())
            .collect();
        let by = if hosts.is_empty() {
            "no renewing host lists it".to_string()
        } else {
            format!("listed by {}", hosts.join(","))
        };
        let record = std::fs::read_to_string(&path).unwrap_or_default();
        let rec: Vec<String> = fields(&record)
            .iter()
            .filter(|(k, _)| matches!(*k, "host" | "since" | "owner_pid"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  {n}\t{}\t{by}\t{}", lock_state(&path), rec.join(" "));
    }
    Ok(EXIT_OK)
}

fn main() {
    prefer_our_daemons();
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if argv.is_empty() {
        eprint!("{}", page().help());
        std::process::exit(EXIT_USAGE);
    }
    let sub = argv.remove(0);
    let args = Args::new(argv);
    let wants_help = args.rest.iter().any(|a| a == "--help" || a == "-h");
    let res = match sub.to_str() {
        Some("help" | "--help" | "-h") => {
            print!("{}", page().help());
            Ok(EXIT_OK)
        }
        Some(_) if wants_help => {
            print!("{}", page().help());
            Ok(EXIT_OK)
        }
        Some("log-run") => log_run(args),
        Some("log-show") => log_show(args),
        Some("lease") => lease(args),
        Some("status") => status(args),
        Some("holders") => holders(args),
        Some("metrics") => metrics(args),
        Some("man") => man(args),
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

// ---- metrics -------------------------------------------------------------------------

/// A label value in the Prometheus text format: backslash, double quote and line feed
/// are escaped.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: HELP, TYPE and its samples (`labels` already rendered).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn metrics(mut a: Args) -> Result<i32, Fail> {
    let (logd, lockd) = admin_targets(&mut a)?;
    a.finish(false)?;
    let mut text = String::new();
    let mut failed = false;
    let mut report = |daemon: &str, e: ClientError| {
        // A daemon that is not running is a figure (its `_up` is 0), not a failure.
        if !e.is_not_running() {
            eprintln!("vhctl: {daemon}: {}", e.message());
            failed = true;
        }
    };
    let logs = inspect::log_metrics(&logd)
        .map_err(|e| report("virtlogd", e))
        .ok();
    let locks = inspect::lock_metrics(&lockd)
        .map_err(|e| report("virtlockd", e))
        .ok();
    family(
        &mut text,
        "virtlogd_up",
        "gauge",
        "Whether virtlogd answered (1) or not (0).",
        &[(String::new(), u64::from(logs.is_some()))],
    );
    if let Some(logs) = logs {
        let per = |f: fn(&inspect::LogMetric) -> u64| -> Vec<(String, u64)> {
            logs.iter()
                .map(|m| {
                    let p = String::from_utf8_lossy(&m.path);
                    (format!("{{path=\"{}\"}}", label_value(&p)), f(m))
                })
                .collect()
        };
        family(
            &mut text,
            "virtlogd_logs_open",
            "gauge",
            "Log files virtlogd holds open (one per guest log pipe).",
            &[(String::new(), logs.len() as u64)],
        );
        family(
            &mut text,
            "virtlogd_log_written_bytes_total",
            "counter",
            "Bytes written into the log's files, rotated ones included.",
            &per(|m| m.counters.written),
        );
        family(
            &mut text,
            "virtlogd_log_dropped_bytes_total",
            "counter",
            "Bytes of output dropped because the log could not be written (full disk, I/O error).",
            &per(|m| m.counters.dropped),
        );
        family(
            &mut text,
            "virtlogd_log_rotations_total",
            "counter",
            "Rollovers of the log (LOG to LOG.0 and a new LOG).",
            &per(|m| m.counters.rotations),
        );
        family(
            &mut text,
            "virtlogd_log_followers",
            "gauge",
            "Streams following the log (vhctl log-show --follow).",
            &per(|m| u64::from(m.followers)),
        );
    }
    family(
        &mut text,
        "virtlockd_up",
        "gauge",
        "Whether virtlockd answered (1) or not (0).",
        &[(String::new(), u64::from(locks.is_some()))],
    );
    if let Some(m) = locks {
        let leases: Vec<(String, u64)> = m
            .leases
            .iter()
            .map(|(ls, n)| (format!("{{lockspace=\"{}\"}}", label_value(ls)), *n))
            .collect();
        family(
            &mut text,
            "virtlockd_leases_held",
            "gauge",
            "Leases held, per lockspace (the default lockspace is \"\"); a shared lease counts once per owner.",
            &leases,
        );
        family(
            &mut text,
            "virtlockd_owners",
            "gauge",
            "Distinct owner processes (QEMUs) holding at least one lease.",
            &[(String::new(), m.owners)],
        );
        family(
            &mut text,
            "virtlockd_lease_losses_total",
            "counter",
            "Leases released because their owner's connection closed while holding them (the owner is then killed).",
            &[(String::new(), m.lease_losses)],
        );
    }
    write_out(&mut io::stdout().lock(), text.as_bytes())?;
    Ok(if failed { EXIT_USAGE } else { EXIT_OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("/a/b.log"), "/a/b.log");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn admin_socket_beside_a_main_socket() {
        let t = Target::Socket(PathBuf::from("/run/libvirt/virtlogd-sock"));
        assert_eq!(
            admin_of(&t),
            Target::Socket(PathBuf::from("/run/libvirt/virtlogd-admin-sock"))
        );
        let a = Target::Socket(PathBuf::from("/x/virtlogd-admin-sock"));
        assert_eq!(admin_of(&a), a);
    }
}
