//! Lease renewal and fencing (virtlockd.conf `lease_renew_interval`, `lease_renew_timeout`,
//! `lease_loss_action`; not in libvirt 9.0).
//!
//! A lease on shared storage is only as good as the storage's lock recovery: when a host
//! loses its link, the file server drops that host's locks after its own timeout
//! (GlusterFS `network.ping-timeout`, the NFSv4 lease time) and another host may take the
//! lease, while the first host's owner (QEMU) keeps running and writing. So every
//! `lease_renew_interval` seconds, for each directory lockspace where this daemon holds
//! leases, we prove that the storage still answers and that our locks are still ours; when
//! that has not succeeded for `lease_renew_timeout` seconds, or a lock is found lost, every
//! owner process holding a lease there is SIGKILLed (`lease_loss_action = "kill"`) or the
//! loss is only logged (`"none"`). Every loss is logged and counted ([`stats`]), and so is
//! a release that finds its lease lost: it leaves the file to its new holder.
//!
//! # How a lock is proven ours
//!
//! Each renewal first writes and syncs this host's heartbeat file in the lockspace,
//! `.virtlockd-renew.<hostname>` (host, daemon pid, time, the leases held and their
//! owners): a round trip to the storage on every file system, and what operators (and
//! other hosts) read to see who holds what and whether that host still renews.
//!
//! From *another lock owner*, the lease's path must still name the file we hold (same
//! device and inode: a lease file replaced behind our back is lost), and `F_GETLK` for a
//! write lock on byte 0 must report a conflicting write lock that is ours (exclusive
//! leases) or a read lock (shared leases; whose is not provable). Which holder counts as
//! ours depends on the lock's kind ([`crate::lease_lock`]):
//! * a POSIX lock (an exclusive lease inherited from libvirt's C daemon) is reported with
//!   this daemon's pid;
//! * an OFD lock is reported with pid -1 by a kernel-local lock table (local file systems,
//!   and the NFS client, which answers from its copy of our own locks), and with the pid
//!   of the process that set it by a FUSE lock server (GlusterFS: the kernel sends the
//!   setter's pid with every lock request, OFD or not), so -1 or our pid. -1 cannot be
//!   anyone else's lock on the same inode: where it is reported, the lock table is this
//!   kernel's, which refuses every conflicting lock while our lease holds it; another
//!   host's lock comes from the server with that host's pid.
//!
//! `F_GETLK` is answered by the lock server (a round trip on GlusterFS and NFS), so it
//! also proves that the storage answers. A re-assert (`F_SETLK`/`F_OFD_SETLK` on the held
//! fd) would not do: on a local file system it trivially succeeds, on a network one it
//! could silently *re-acquire* a lock that was lost, and the held fd lives in the daemon's
//! fd table, not the probe's (see below): getting at it from here races with a release
//! that closes it and a new lease that reuses its number, and re-asserting the wrong type
//! on the wrong file would convert a lease.
//!
//! POSIX locks belong to the fd table (`files_struct`), and closing any fd of a locked file
//! drops all of the table's locks on it (see `lockspace`; OFD leases are immune, POSIX
//! leases inherited from C are not). Each lockspace's probe therefore
//! runs on its own thread that first gives itself a private fd table
//! (`close_range(CLOSE_RANGE_UNSHARE)`, closing its copies of everything): to the kernel and
//! the lock server it is a different lock owner, so it sees the daemon's locks as foreign,
//! and it may open and close lease files freely without touching them. That thread must
//! never log (the log fd is not in its table); it only reports over a channel.
//!
//! A probe that hangs on a stuck mount only stalls its own thread: the supervisor thread
//! (one per daemon, never blocked on storage, never waiting for the lockspace table: it
//! uses the last snapshot when the table is busy) keeps timing every lockspace and fences
//! on time, whatever the RPC thread is doing.
//!
//! The first successful probe of an exclusive lease writes a holder record into the lease
//! file (host, daemon pid, owner name, uuid and pid, since when). libvirt's C daemon
//! ignores lease file contents, and nothing here reads them: lock semantics are unchanged.

use crate::config::{LeaseConfig, LeaseLossAction};
use crate::lease_lock::LockKind;
use crate::lockspace::{FileId, LockSpaces};
use crate::table::LockTable;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{error, info, warn};

/// Counters since start (or re-exec).
#[derive(Debug, Default)]
pub struct Stats {
    /// Probes of a lockspace that proved all its leases.
    pub renewals: AtomicU64,
    /// Probes that failed (storage errors).
    pub failures: AtomicU64,
    /// Losses: a lockspace past `lease_renew_timeout`, or a lock found lost.
    pub losses: AtomicU64,
    /// Owner processes sent SIGKILL.
    pub kills: AtomicU64,
    /// Releases that found their lease lost (another holder) and left its file alone;
    /// each is a loss too.
    pub lost_at_release: AtomicU64,
}

static STATS: Stats = Stats {
    renewals: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    losses: AtomicU64::new(0),
    kills: AtomicU64::new(0),
    lost_at_release: AtomicU64::new(0),
};

/// The renewal counters.
pub fn stats() -> &'static Stats {
    &STATS
}

/// Counts a lease that its release found lost (see `lockspace`: its file is not deleted),
/// whether or not renewal is on or had already declared it. Returns the losses so far.
pub fn note_lost_at_release() -> u64 {
    STATS.lost_at_release.fetch_add(1, Ordering::Relaxed);
    STATS.losses.fetch_add(1, Ordering::Relaxed) + 1
}

/// Who registered as an owner pid: for the holder record only.
type OwnerBook = HashMap<u32, (String, [u8; 16])>;
static OWNERS: Mutex<Option<OwnerBook>> = Mutex::new(None);
const OWNERS_MAX: usize = 4096;

/// Remember the name and uuid an owner pid registered with (called at REGISTER).
pub fn note_owner(pid: u32, name: &str, uuid: [u8; 16]) {
    let Ok(mut g) = OWNERS.lock() else { return };
    let m = g.get_or_insert_with(HashMap::new);
    if m.len() >= OWNERS_MAX {
        // Forget owners whose process is gone.
        m.retain(|&p, _| PathBuf::from(format!("/proc/{p}")).exists());
    }
    if m.len() < OWNERS_MAX {
        m.insert(pid, (name.to_string(), uuid));
    }
}

fn owner_of(pid: u32) -> Option<(String, [u8; 16])> {
    OWNERS.lock().ok()?.as_ref()?.get(&pid).cloned()
}

/// One held lease, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub path: PathBuf,
    pub shared: bool,
    pub owners: Vec<u32>,
    /// OFD, or POSIX for an exclusive lease inherited from libvirt's C daemon.
    pub kind: LockKind,
    /// The held file, if known: the path must still name it.
    pub file_id: Option<FileId>,
}

/// Leases per directory lockspace (only lockspaces holding some).
pub type Snapshot = HashMap<String, Vec<Lease>>;

/// The held leases of every directory lockspace; memory only, no I/O.
pub fn snapshot(spaces: &LockSpaces) -> Snapshot {
    spaces
        .directories()
        .filter_map(|(key, ls)| {
            let leases: Vec<Lease> = ls
                .resources()
                .filter(|r| r.lock_held())
                .map(|r| Lease {
                    name: r.name().to_string(),
                    path: r.path().to_path_buf(),
                    shared: r.is_shared(),
                    owners: r.owners().to_vec(),
                    kind: r.lock_kind(),
                    file_id: r.file_id(),
                })
                .collect();
            (!leases.is_empty()).then(|| (key.to_string(), leases))
        })
        .collect()
}

/// What a probe found for one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still ours; with a warning if the holder record could not be written.
    Held(Option<String>),
    /// Not ours any more.
    Lost(String),
    /// The storage did not answer properly.
    Failed(String),
}

struct Job {
    leases: Vec<Lease>,
    /// Holder records to write, by index into `leases`.
    records: Vec<(usize, String)>,
    /// The lockspace's heartbeat file for this host, and what to write there.
    heartbeat: Option<(PathBuf, String)>,
}

/// What a probe thread reports for a job.
struct Report {
    /// `Err((storage_failed, message))`: the heartbeat could not be written; only a
    /// failure that is not a permission or read-only refusal counts against the storage.
    heartbeat: Result<(), (bool, String)>,
    verdicts: Vec<Verdict>,
}

/// Give the calling thread a private fd table holding only fds 0-2 (see module docs).
fn private_fd_table() -> io::Result<()> {
    // SAFETY: close_range only affects this thread's (now private) fd table; no Rust
    // object in this thread owns an fd at this point.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_UNSHARE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Probe one lease from a foreign lock owner: the path still names the held file, and
/// `F_GETLK` for a write lock on byte 0 reports our lock (module docs).
pub fn probe(lease: &Lease, me: i32) -> Verdict {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&lease.path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Verdict::Lost("the lease file is gone".into())
        }
        Err(e) => return Verdict::Failed(format!("cannot open {}: {e}", lease.path.display())),
    };
    if let Some(held) = lease.file_id {
        match FileId::of_file(&file) {
            Ok(id) if id == held => {}
            Ok(_) => return Verdict::Lost("the lease file was replaced".into()),
            Err(e) => return Verdict::Failed(format!("cannot stat {}: {e}", lease.path.display())),
        }
    }
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    if let Err(e) = fcntl(file.as_raw_fd(), FcntlArg::F_GETLK(&mut fl)) {
        return Verdict::Failed(format!("F_GETLK on {}: {e}", lease.path.display()));
    }
    let ours = fl.l_pid == me || (lease.kind == LockKind::Ofd && fl.l_pid == -1);
    match (i32::from(fl.l_type), lease.shared) {
        (libc::F_UNLCK, _) => Verdict::Lost("nobody holds its lock".into()),
        (libc::F_WRLCK, false) if ours => Verdict::Held(None),
        (libc::F_WRLCK, _) => Verdict::Lost(format!("write-locked by pid {}", fl.l_pid)),
        (libc::F_RDLCK, true) => Verdict::Held(None),
        (_, _) => Verdict::Lost(format!("read-locked by pid {}", fl.l_pid)),
    }
}

fn write_record(lease: &Lease, record: &str) -> Result<(), String> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&lease.path)
        .map_err(|e| e.to_string())?;
    f.write_all_at(record.as_bytes(), 0)
        .and_then(|()| f.set_len(record.len() as u64))
        .and_then(|()| f.sync_data())
        .map_err(|e| e.to_string())
}

/// Write (and sync to the server) this host's heartbeat file in a lockspace: a round trip
/// to the storage on every file system, even where `F_GETLK` is answered from a local
/// copy of our own locks (NFS), and for operators, who holds what and when we last renewed.
fn write_heartbeat(path: &Path, text: &str) -> Result<(), (bool, String)> {
    let r = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .and_then(|f| {
            f.write_all_at(text.as_bytes(), 0)?;
            f.set_len(text.len() as u64)?;
            f.sync_data()
        });
    r.map_err(|e| {
        let refused = matches!(
            e.kind(),
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
        );
        (!refused, format!("heartbeat {}: {e}", path.display()))
    })
}

fn probe_thread(jobs: mpsc::Receiver<Job>, results: mpsc::Sender<Report>) {
    // Nothing in here may log: see the module docs.
    let private = private_fd_table();
    let me = std::process::id() as i32;
    for job in jobs {
        let heartbeat = match (&private, &job.heartbeat) {
            (Ok(()), Some((path, text))) => write_heartbeat(path, text),
            _ => Ok(()),
        };
        let verdicts = match &private {
            Err(e) => job
                .leases
                .iter()
                .map(|_| Verdict::Failed(format!("no private fd table for probing: {e}")))
                .collect(),
            Ok(()) => job
                .leases
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let v = probe(l, me);
                    let rec = job.records.iter().find(|(j, _)| *j == i);
                    match (v, rec) {
                        (Verdict::Held(None), Some((_, text))) => {
                            Verdict::Held(write_record(l, text).err())
                        }
                        (v, _) => v,
                    }
                })
                .collect(),
        };
        if results
            .send(Report {
                heartbeat,
                verdicts,
            })
            .is_err()
        {
            return;
        }
    }
}

struct Prober {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Report>,
}

impl Prober {
    fn spawn() -> io::Result<Prober> {
        let (jtx, jrx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel();
        std::thread::Builder::new()
            .name("lease-probe".into())
            .spawn(move || probe_thread(jrx, rtx))?;
        Ok(Prober {
            jobs: jtx,
            results: rrx,
        })
    }
}

/// Renewal state of one lockspace.
struct Space {
    prober: Option<Prober>,
    last_ok: Instant,
    next_due: Instant,
    in_flight: Option<(Instant, Vec<Lease>)>,
    /// Leases found lost once, awaiting confirmation by an immediate second probe.
    suspect: HashSet<String>,
    /// Owners already acted on during this outage.
    fenced: HashSet<u32>,
    /// Since when each lease has been held by its current owners (for the record).
    since: HashMap<String, (Vec<u32>, u64)>,
    /// Leases whose record was written for these owners.
    recorded: HashMap<String, Vec<u32>>,
    /// Whether the current outage was already reported.
    outage: bool,
    /// Leases already declared lost (each loss is counted once).
    declared: HashSet<String>,
    /// Whether the last look found leases here (a final heartbeat is due when they go).
    had_leases: bool,
    /// Whether a refused heartbeat was reported.
    heartbeat_warned: bool,
}

impl Space {
    fn new(now: Instant) -> Space {
        Space {
            prober: None,
            last_ok: now,
            next_due: now,
            in_flight: None,
            suspect: HashSet::new(),
            fenced: HashSet::new(),
            since: HashMap::new(),
            recorded: HashMap::new(),
            outage: false,
            declared: HashSet::new(),
            had_leases: false,
            heartbeat_warned: false,
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn record_text(lease: &Lease, since: u64, host: &str) -> String {
    let mut s = format!(
        "# virtlockd lease holder (informational; the lock is fcntl byte 0)\nhost={host}\n\
         daemon_pid={}\nsince={since}\n",
        std::process::id()
    );
    for &pid in &lease.owners {
        let (name, uuid) = owner_of(pid).unwrap_or_default();
        s.push_str(&format!(
            "owner_pid={pid} owner_name={name:?} owner_uuid={}\n",
            uuid::Uuid::from_bytes(uuid)
        ));
    }
    s
}

/// This host's heartbeat file in lockspace `dir`.
fn heartbeat_path(dir: &str, host: &str) -> PathBuf {
    let host: String = host
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new(dir).join(format!(".virtlockd-renew.{host}"))
}

fn heartbeat_text(leases: &[Lease], host: &str) -> String {
    let mut s = format!(
        "# virtlockd lease renewal heartbeat (informational)\nhost={host}\ndaemon_pid={}\n\
         renewed={}\nleases={}\n",
        std::process::id(),
        unix_now(),
        leases.len()
    );
    for l in leases {
        let owners: Vec<String> = l.owners.iter().map(u32::to_string).collect();
        s.push_str(&format!(
            "lease={} {} owners={}\n",
            l.name,
            if l.shared { "shared" } else { "exclusive" },
            owners.join(",")
        ));
    }
    s
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The supervisor: times every lockspace, hands out probes, and fences.
struct Supervisor {
    daemon: Arc<LockTable>,
    cfg: LeaseConfig,
    interval: Duration,
    timeout: Duration,
    spaces: HashMap<String, Space>,
    snap: Snapshot,
    host: String,
}

impl Supervisor {
    fn act(&self, space: &mut Space, dir: &str, owners: &[u32], why: &str) {
        let me = std::process::id();
        for &pid in owners {
            if pid <= 1 || pid == me || !space.fenced.insert(pid) {
                continue;
            }
            match self.cfg.loss_action {
                LeaseLossAction::None => {
                    error!(
                        lockspace = dir,
                        pid, "lease lost ({why}); lease_loss_action=none: owner left running"
                    )
                }
                LeaseLossAction::Kill => match kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                    Ok(()) => {
                        let n = STATS.kills.fetch_add(1, Ordering::Relaxed) + 1;
                        error!(
                            lockspace = dir,
                            pid,
                            kills = n,
                            "lease lost ({why}): owner killed"
                        );
                    }
                    Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => error!(
                        lockspace = dir,
                        pid, "lease lost ({why}): cannot kill owner: {e}"
                    ),
                },
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let fresh = match self.daemon.try_spaces() {
            Some(s) => {
                self.snap = snapshot(&s);
                true
            }
            None => false,
        };
        // Lockspaces without leases have nothing to prove.
        for (dir, sp) in self.spaces.iter_mut() {
            if !self.snap.contains_key(dir) {
                sp.last_ok = now;
                sp.fenced.clear();
                sp.suspect.clear();
                sp.since.clear();
                sp.recorded.clear();
                sp.declared.clear();
                sp.outage = false;
                if let (Some(p), Some(_)) = (&sp.prober, &sp.in_flight) {
                    if !matches!(p.results.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                        sp.in_flight = None;
                    }
                }
                // Tell the other hosts we hold nothing here any more.
                if sp.had_leases && sp.in_flight.is_none() {
                    if let Some(p) = &sp.prober {
                        let job = Job {
                            leases: Vec::new(),
                            records: Vec::new(),
                            heartbeat: Some((
                                heartbeat_path(dir, &self.host),
                                heartbeat_text(&[], &self.host),
                            )),
                        };
                        if p.jobs.send(job).is_ok() {
                            sp.in_flight = Some((now, Vec::new()));
                        }
                    }
                    sp.had_leases = false;
                }
            }
        }
        let dirs: Vec<String> = self.snap.keys().cloned().collect();
        for dir in dirs {
            let mut sp = self.spaces.remove(&dir).unwrap_or_else(|| Space::new(now));
            self.renew(&dir, &mut sp, now, fresh);
            self.spaces.insert(dir, sp);
        }
    }

    fn renew(&mut self, dir: &str, sp: &mut Space, now: Instant, fresh: bool) {
        let leases = self.snap.get(dir).cloned().unwrap_or_default();
        for l in &leases {
            let e = sp
                .since
                .entry(l.name.clone())
                .or_insert((l.owners.clone(), unix_now()));
            if e.0 != l.owners {
                *e = (l.owners.clone(), unix_now());
            }
        }
        sp.since.retain(|n, _| leases.iter().any(|l| &l.name == n));
        sp.recorded
            .retain(|n, _| leases.iter().any(|l| &l.name == n));
        sp.declared.retain(|n| leases.iter().any(|l| &l.name == n));
        sp.had_leases = true;

        // Collect a finished probe.
        if let (Some(p), Some((sent, sent_leases))) = (&sp.prober, &sp.in_flight) {
            match p.results.try_recv() {
                Ok(report) => {
                    let (sent, sent_leases) = (*sent, sent_leases.clone());
                    sp.in_flight = None;
                    self.judge(dir, sp, sent, &sent_leases, &report, &leases, fresh, now);
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    sp.prober = None;
                    sp.in_flight = None;
                }
            }
        }

        // Start the next probe.
        if sp.in_flight.is_none() && now >= sp.next_due {
            if sp.prober.is_none() {
                match Prober::spawn() {
                    Ok(p) => sp.prober = Some(p),
                    Err(e) => error!(lockspace = dir, "cannot start a lease probe thread: {e}"),
                }
            }
            if let Some(p) = &sp.prober {
                let records = leases
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.shared && sp.recorded.get(&l.name) != Some(&l.owners))
                    .map(|(i, l)| {
                        let since = sp.since.get(&l.name).map(|s| s.1).unwrap_or(0);
                        (i, record_text(l, since, &self.host))
                    })
                    .collect();
                let job = Job {
                    leases: leases.clone(),
                    records,
                    heartbeat: Some((
                        heartbeat_path(dir, &self.host),
                        heartbeat_text(&leases, &self.host),
                    )),
                };
                if p.jobs.send(job).is_ok() {
                    tracing::debug!(lockspace = dir, leases = leases.len(), "renewal probe sent");
                    sp.in_flight = Some((now, leases.clone()));
                    for l in leases.iter().filter(|l| !l.shared) {
                        sp.recorded.insert(l.name.clone(), l.owners.clone());
                    }
                } else {
                    sp.prober = None;
                }
            }
            sp.next_due = now + self.interval;
        }

        // The deadline.
        if now.duration_since(sp.last_ok) > self.timeout {
            if !sp.outage {
                sp.outage = true;
                let n = STATS.losses.fetch_add(1, Ordering::Relaxed) + 1;
                error!(
                    lockspace = dir,
                    losses = n,
                    "no lease renewal for {:?} (lease_renew_timeout {:?}): all {} lease(s) there count as lost",
                    now.duration_since(sp.last_ok),
                    self.timeout,
                    leases.len()
                );
            }
            let owners: Vec<u32> = leases.iter().flat_map(|l| l.owners.clone()).collect();
            self.act(sp, dir, &owners, "renewal timed out");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        dir: &str,
        sp: &mut Space,
        sent: Instant,
        sent_leases: &[Lease],
        report: &Report,
        current: &[Lease],
        fresh: bool,
        now: Instant,
    ) {
        let verdicts = &report.verdicts;
        tracing::debug!(lockspace = dir, heartbeat = ?report.heartbeat, ?verdicts, "renewal probe result");
        let mut failed: Vec<&String> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Failed(e) => Some(e),
                _ => None,
            })
            .collect();
        match &report.heartbeat {
            Ok(()) => {}
            Err((true, e)) => failed.insert(0, e),
            Err((false, e)) => {
                if !sp.heartbeat_warned {
                    sp.heartbeat_warned = true;
                    warn!(lockspace = dir, "{e} (renewal relies on F_GETLK alone)");
                }
            }
        }
        let all_held = verdicts.iter().all(|v| matches!(v, Verdict::Held(_)));
        if failed.is_empty() {
            // The storage answers.
            if sp.outage {
                info!(lockspace = dir, "lease renewal succeeds again");
            }
            sp.last_ok = sp.last_ok.max(sent);
            sp.outage = false;
            if all_held {
                sp.fenced.clear();
            }
            STATS.renewals.fetch_add(1, Ordering::Relaxed);
        } else {
            let n = STATS.failures.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(
                lockspace = dir,
                failures = n,
                "lease renewal failed: {}",
                failed[0]
            );
        }
        for (l, v) in sent_leases.iter().zip(verdicts) {
            match v {
                Verdict::Held(warning) => {
                    sp.suspect.remove(&l.name);
                    if let Some(w) = warning {
                        sp.recorded.remove(&l.name);
                        warn!(lockspace = dir, lease = %l.name, "cannot write the holder record: {w}");
                    }
                }
                Verdict::Failed(_) => {
                    sp.recorded.remove(&l.name);
                }
                Verdict::Lost(why) => {
                    // Only a lease still held, by the same owners, in a fresh view of the
                    // table, and found lost twice in a row, counts: a lease released
                    // between snapshot and probe is not a loss.
                    let still = fresh && current.iter().any(|c| c == l);
                    if !still {
                        sp.suspect.remove(&l.name);
                    } else if sp.suspect.remove(&l.name) {
                        if sp.declared.insert(l.name.clone()) {
                            let n = STATS.losses.fetch_add(1, Ordering::Relaxed) + 1;
                            error!(lockspace = dir, lease = %l.name, losses = n, "lease lost: {why}");
                        }
                        self.act(sp, dir, &l.owners, why);
                    } else {
                        sp.suspect.insert(l.name.clone());
                        sp.next_due = now;
                    }
                }
            }
        }
    }
}

/// Start renewal for `daemon`'s lockspaces, if `cfg` turns it on.
pub fn start(daemon: Arc<LockTable>, cfg: LeaseConfig) {
    if cfg.renew_interval == 0 {
        return;
    }
    let interval = Duration::from_secs(cfg.renew_interval);
    let timeout = Duration::from_secs(cfg.renew_timeout);
    let tick = (interval / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
    info!(
        "lease renewal every {interval:?}, timeout {timeout:?}, on loss: {:?}",
        cfg.loss_action
    );
    let mut sup = Supervisor {
        daemon,
        cfg,
        interval,
        timeout,
        spaces: HashMap::new(),
        snap: Snapshot::new(),
        host: host_name(),
    };
    let spawned = std::thread::Builder::new()
        .name("lease-renewal".into())
        .spawn(move || loop {
            sup.tick();
            std::thread::sleep(tick);
        });
    if let Err(e) = spawned {
        error!("cannot start lease renewal: {e}; leases are NOT protected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A POSIX lock on the lease's byte, as libvirt 9.0 takes it.
    fn lock(fd: i32, ty: i32) -> nix::Result<()> {
        fcntl(fd, FcntlArg::F_SETLK(&crate::lease_lock::byte0(ty))).map(|_| ())
    }

    /// A lease file at `path`, opened as the daemon opens one.
    fn open_lease(path: &std::path::Path) -> std::fs::File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    /// The probe thread sees our own (POSIX) locks as foreign, and its opens/closes leave
    /// them alone.
    #[test]
    fn probe_from_private_fd_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let held = open_lease(&path);
        lock(held.as_raw_fd(), libc::F_WRLCK).unwrap();
        let lease = Lease {
            name: "lease".into(),
            path: path.clone(),
            shared: false,
            owners: vec![4242],
            kind: LockKind::Posix,
            file_id: Some(FileId::of_file(&held).unwrap()),
        };
        let p = Prober::spawn().unwrap();
        let mut rec = record_text(&lease, 7, "h");
        for _ in 0..2 {
            p.jobs
                .send(Job {
                    leases: vec![lease.clone()],
                    records: vec![(0, rec.clone())],
                    heartbeat: Some((dir.path().join("hb"), "hb\n".into())),
                })
                .unwrap();
            let r = p.results.recv().unwrap();
            assert_eq!(r.verdicts, vec![Verdict::Held(None)]);
            assert_eq!(r.heartbeat, Ok(()));
            rec.push('\n');
        }
        // Still locked: another lock owner (an OFD lock) cannot take it. The fd stays open
        // until the end: closing it would drop our POSIX lock.
        let other = OpenOptions::new().write(true).open(&path).unwrap();
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        };
        assert!(
            fcntl(other.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)).is_err(),
            "the lock survived the probes"
        );
        // A shared lease is not ours when write-locked... by us (as exclusive).
        let shared = Lease {
            shared: true,
            ..lease.clone()
        };
        p.jobs
            .send(Job {
                leases: vec![shared],
                records: vec![],
                heartbeat: None,
            })
            .unwrap();
        assert!(matches!(
            p.results.recv().unwrap().verdicts[0],
            Verdict::Lost(_)
        ));
        // Released: lost. Gone: lost.
        drop(held);
        drop(other);
        // (Read only now: closing any fd of the file would have dropped the lock.)
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("owner_pid=4242"));
        p.jobs
            .send(Job {
                leases: vec![lease.clone()],
                records: vec![],
                heartbeat: None,
            })
            .unwrap();
        assert!(matches!(
            p.results.recv().unwrap().verdicts[0],
            Verdict::Lost(_)
        ));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            probe(&lease, std::process::id() as i32),
            Verdict::Lost("the lease file is gone".into())
        );
    }

    fn probe_once(p: &Prober, lease: &Lease) -> Verdict {
        p.jobs
            .send(Job {
                leases: vec![lease.clone()],
                records: vec![],
                heartbeat: None,
            })
            .unwrap();
        p.results.recv().unwrap().verdicts.remove(0)
    }

    /// An OFD lease (`F_GETLK` reports pid -1 for it) is proven ours; a lock on a file that
    /// replaced the lease file, or none, is not; a shared lease write-locked is not either.
    #[test]
    fn ofd_leases_are_proven_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let held = open_lease(&path);
        crate::lease_lock::lock(held.as_raw_fd(), false).unwrap();
        let lease = Lease {
            name: "lease".into(),
            path: path.clone(),
            shared: false,
            owners: vec![4242],
            kind: LockKind::Ofd,
            file_id: Some(FileId::of_file(&held).unwrap()),
        };
        let p = Prober::spawn().unwrap();
        assert_eq!(probe_once(&p, &lease), Verdict::Held(None));
        // An OFD lock is not ours as a POSIX lease (whose holder must be our pid).
        let posix = Lease {
            kind: LockKind::Posix,
            ..lease.clone()
        };
        assert!(matches!(probe_once(&p, &posix), Verdict::Lost(_)));
        let shared = Lease {
            shared: true,
            ..lease.clone()
        };
        assert!(matches!(probe_once(&p, &shared), Verdict::Lost(_)));
        // Shared: read-locked is ours to the extent provable.
        crate::lease_lock::lock(held.as_raw_fd(), true).unwrap();
        assert_eq!(probe_once(&p, &shared), Verdict::Held(None));
        crate::lease_lock::lock(held.as_raw_fd(), false).unwrap();
        // The path names another file, OFD-locked by someone (pid -1 too): lost.
        std::fs::remove_file(&path).unwrap();
        let other = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        crate::lease_lock::lock(other.as_raw_fd(), false).unwrap();
        assert_eq!(
            probe_once(&p, &lease),
            Verdict::Lost("the lease file was replaced".into())
        );
        // Unlocked explicitly: a child forked by another test may hold a copy of the fd.
        crate::lease_lock::unlock(other.as_raw_fd(), LockKind::Ofd).unwrap();
        drop(other);
        // Nobody holds it (the file at the path now, freed with `other`): lost.
        crate::lease_lock::unlock(held.as_raw_fd(), LockKind::Ofd).unwrap();
        let renamed = Lease {
            file_id: Some(FileId::of_file(&std::fs::File::open(&path).unwrap()).unwrap()),
            ..lease.clone()
        };
        assert_eq!(
            probe_once(&p, &renamed),
            Verdict::Lost("nobody holds its lock".into())
        );
    }
}
