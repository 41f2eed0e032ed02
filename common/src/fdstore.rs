//! systemd's file-descriptor store as a crash safety net (issue 15): every fd the daemon
//! would carry across a SIGUSR1 re-exec is also kept, as a duplicate, by the service
//! manager, together with a memfd holding the re-exec state document, so a SIGKILL, a
//! crash, the OOM killer or `systemctl restart` resumes exactly where a re-exec would.
//!
//! # Design
//!
//! **When.** Only with `NOTIFY_SOCKET` set *and* the unit allowing a store. systemd
//! silently ignores `FDSTORE=1` when `FileDescriptorStoreMax=` is 0, and systemd 252
//! (Debian 12) tells the service nothing about the limit (`$FDSTORE` with the limit is
//! set from 254 on; 252's manager has no such variable), so our units say so themselves
//! with `Environment=VH_FDSTORE=1` (see `systemd/*.service.d/fdstore.conf`); `$FDSTORE`
//! > 0 is honoured too. Otherwise nothing is sent and behaviour is today's.
//!
//! **What, under which name** (`FDNAME=`; systemd allows 255 printable ASCII characters
//! without `:`; every name is unique so `FDSTOREREMOVE=1` removes exactly one fd):
//!
//! | fd | name | `FDPOLL` |
//! |---|---|---|
//! | listening socket *i* of server *s* | `vh-listen-<s>-<i>` | default |
//! | client connection *id* of server *s* (QEMU's inherited virtlockd owner connection included) | `vh-client-<s>-<id>` | `0` |
//! | log pipe (read end) | `vh-log-<n>` | `0` |
//! | lease fd (carries the OFD lock) | `vh-lease-<n>` | `0` |
//! | state slots | `vh-state-a`, `vh-state-b` | `0` |
//!
//! `FDPOLL=0` wherever a hang-up must not make systemd drop the fd: a pipe whose QEMU
//! has exited still holds its last output (systemd would drop it on POLLHUP and the
//! bytes with it, the recipe's first trap); a client that hung up while we were down
//! must still be seen to hang up by the new image, which then releases its leases and
//! kills its owner exactly as a live daemon would. Lease fds are regular files
//! (epoll refuses them; systemd accepts non-pollable fds only with `FDPOLL=0`).
//!
//! **Removal.** When a log, a lease or a client goes away the daemon closes its fd *and*
//! sends `FDSTOREREMOVE=1` for its name: the store's duplicate otherwise keeps the pipe
//! open (QEMU never sees EPIPE), the socket open (the peer never sees the hang-up) or
//! the lease locked (an OFD lock belongs to the open file description, which the
//! duplicate keeps alive). Leases are therefore unlocked explicitly (`F_OFD_SETLK
//! F_UNLCK`) *before* the close and the removal, so a lost removal message leaves at
//! worst an unlocked stale fd, which the next start removes as unknown.
//!
//! **State.** Two memfds, slots A and B, are stored once, with the first snapshot. Each update writes
//! the whole document into the slot *not* holding the newest generation: its header is
//! zeroed first, then the body written, then a header carrying the generation, the
//! length and a hash of the body (FNV-1a over 64-bit words). A crash at any instant
//! leaves at least one slot with a complete header that matches its body; a start takes
//! the valid slot with the highest generation. The store never has to be touched per update (the memfds
//! are shared files: what we write is what systemd holds), so an update costs one
//! document serialisation and three `pwrite`s. Before the document comes a table of
//! `fd <number> <name>` lines: the fd numbers the document uses, and under which
//! stored name each one lives.
//!
//! Ordering makes the snapshot safe: an fd is stored *before* the first document that
//! names it, and removed from the store only *after* a document without it is written.
//! A restart can thus find stored fds the document does not name (removed on sight,
//! before anything is stored, and new names start above theirs so none is reused) but
//! should never find a document naming an fd the store lacks. If it does (systemd
//! dropped a socket on POLLERR, refused an fd over `FileDescriptorStoreMax=`, or a
//! store failed) that one item is lost, as a re-exec loses an fd that is gone: its
//! number is held by a placeholder until the restore is done, so the restore never
//! adopts an unrelated fd (the log file, the runtime's epoll) opened there, and a held
//! lease lost that way gets its owner killed.
//!
//! The very first snapshot of a process whose store is empty (a fresh start, or the
//! first after a re-exec) is the exception: it is written before its fds are stored
//! (until then the process alone holds them, so a death in between frees them either
//! way; with the document in the store the next start at least knows whose leases
//! they were and kills those owners). A start that finds stored fds but no whole
//! document (only the slots can be there then, or a store damaged otherwise) starts
//! fresh and removes them. A whole document this build cannot read fails the start loudly and
//! keeps the store (it may hold leases of running guests); see `daemon::unreadable_store`.
//!
//! **Resume.** On a start with stored fds ([`take_stored`], called first thing in
//! `main`, while the process has only fds 0-2 and the passed ones), each stored fd is
//! moved to the number recorded for its name, so the document is valid as written and
//! the re-exec restore path in `daemon.rs` takes it unchanged (minus the pid magic,
//! which names the dead process). Socket-unit fds passed alongside are duplicates of
//! stored listeners and are closed. The dead process may have read a request it never
//! answered, so after a resume from the store (not after a re-exec, which parks every
//! client between calls) every client is hung up except virtlockd's owner connections
//! (restricted, or registered by their own peer as QEMU's is): a caller gets EOF rather
//! than waiting forever, and a guest keeps its connection.
//!
//! **File limits.** systemd passes the stored fds as 3..3+n *after* applying the unit's
//! soft `LimitNOFILE`: with the units' soft 1024 a store of more than about 1,020 fds
//! makes every restart fail with `202/FDS` (observed on 252), so `fdstore.conf` raises
//! the soft limit above the store's size; and the daemon raises its own soft limit to
//! the hard one *before* [`take_stored`] moves fds to their recorded numbers.
//!
//! **Re-exec.** Before a SIGUSR1 exec every stored fd is removed from the store: the
//! next image may be libvirt's C daemon, which knows nothing of the store, releases a
//! lease by closing its fd (a stored duplicate would keep the OFD lock forever) and
//! closes clients and pipes the same way. If the new image is ours it stores everything
//! again before it reports READY; if the exec fails the restored daemon does the same.
//!
//! **Keeping it current** ([`crate::fdstore_keeper`]): the server calls the keeper after
//! each call and before its reply is written; the keeper writes a snapshot only if
//! something changed since the last one (the daemons mark changes: an accept, a
//! hang-up, an owner registered, a log opened or closed, a lease taken or released).
//! The app builds the document with `App::snapshot`, the same document `handoff`
//! writes but from the live state, under the locks that keep the fds it names open.
//! Changes no reply waits for (a hang-up, a pipe's EOF, the closes after an owner's
//! connection dropped) are written by a background task. Fd numbers are reused at
//! once, so code that closes an fd a snapshot may name says so first
//! (`fdstore_keeper::closing`): the next snapshot stores what then holds that number.
//! virtlogd moves pipe data with splice(2) while the store is on: a crash between a
//! read and its write would lose the bytes read.
//!
//! **SIGTERM.** `systemctl restart` and `systemctl stop` both send SIGTERM, and only a
//! restart may leave anything in the store: after a stop systemd 252 empties it, which
//! closes every lease fd while the owners (QEMU) keep running, so another host could
//! start the same disk. With the store on, SIGTERM therefore asks systemd which job
//! runs on our unit ([`crate::stop_intent`]: `systemctl list-jobs` for the unit named
//! in `/proc/self/cgroup`, bounded to 2 s, then once more to 10 s). During the stop phase of a `restart`,
//! `try-restart` or `reload-or-restart` systemd reports the job as `restart`; `stop`
//! and a system shutdown report `stop` (checked in containers with 252 and 257).
//! * A restart: a last snapshot is written, the app does what must not wait in the
//!   store (`App::before_store_exit`: virtlogd drains its pipes into the files) and
//!   the process exits 0, closing, releasing and killing nothing (the store holds it
//!   all; QEMU's pipes and connections stay open); the start resumes from the store.
//! * Anything else (a stop, a shutdown, no job as after a plain `kill`, a failed or
//!   slow query): every fd is removed from the store first (we still hold our own, so
//!   nothing is freed yet), then the daemon stops exactly as without the store, as
//!   libvirt 9.0 does: virtlockd kills every registered owner and then releases its
//!   leases, virtlogd drains and closes its pipes. No owner is left running without
//!   its lease.
//!
//! Both branches are logged at warning level with the reason. SIGINT, SIGQUIT, the idle
//! timeout and admin shutdown quit as without the store.
//!
//! **Stop + start.** A `stop` stops as without the store (above) and leaves the store
//! empty (252 has no `FileDescriptorStorePreserve=`, which comes with 254 and our units
//! do not set): the next start is a fresh one, as today. `restart` and
//! `Restart=on-failure` keep it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

/// The variable our units set to say the store is on (systemd 252 sets none).
pub const ENABLE_ENV: &str = "VH_FDSTORE";
/// The prefix of every name we store under.
pub const PREFIX: &str = "vh-";
/// Names of the two state slots.
pub const STATE_SLOTS: [&str; 2] = ["vh-state-a", "vh-state-b"];

/// Whether the store is to be used, from `NOTIFY_SOCKET`, `VH_FDSTORE` and `FDSTORE`
/// (pure, for tests).
pub fn enabled_by(
    notify_socket: Option<&OsStr>,
    vh_fdstore: Option<&OsStr>,
    fdstore: Option<&OsStr>,
) -> bool {
    if notify_socket.is_none_or(|s| s.is_empty()) {
        return false;
    }
    let on = |v: Option<&OsStr>| {
        v.is_some_and(|v| matches!(v.as_bytes(), b"1" | b"yes" | b"true" | b"on"))
    };
    let max = fdstore
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    on(vh_fdstore) || max > 0
}

/// systemd's rule for `FDNAME=` (`fdname_is_valid`): 1 to 255 printable ASCII
/// characters, no `:` (the separator of `LISTEN_FDNAMES`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// Names of stored fds (see the module docs' table).
pub mod names {
    pub fn listener(server: &str, i: usize) -> String {
        format!("vh-listen-{server}-{i}")
    }
    pub fn client(server: &str, id: u64) -> String {
        format!("vh-client-{server}-{id}")
    }
    pub fn log(n: u64) -> String {
        format!("vh-log-{n}")
    }
    pub fn lease(n: u64) -> String {
        format!("vh-lease-{n}")
    }
}

/// The service manager's store, reached through `$NOTIFY_SOCKET`.
#[derive(Debug, Clone)]
pub struct FdStore {
    addr: OsString,
    /// One datagram socket for every message (a socket per fd stored cost two more
    /// syscalls each, a thousand of them per re-exec).
    sock: std::sync::Arc<std::sync::OnceLock<OwnedFd>>,
}

impl FdStore {
    /// The store of this process, when it is on (see the module docs).
    pub fn from_env() -> Option<FdStore> {
        let notify = std::env::var_os("NOTIFY_SOCKET");
        enabled_by(
            notify.as_deref(),
            std::env::var_os(ENABLE_ENV).as_deref(),
            std::env::var_os("FDSTORE").as_deref(),
        )
        .then(|| FdStore {
            addr: notify.unwrap_or_default(),
            sock: Default::default(),
        })
    }

    /// A store at an explicit notify socket address (tests).
    pub fn at(addr: impl Into<OsString>) -> FdStore {
        FdStore {
            addr: addr.into(),
            sock: Default::default(),
        }
    }

    /// `FDSTORE=1` with `FDNAME=name` and the fd; `poll: false` adds `FDPOLL=0`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>, poll: bool) -> io::Result<()> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid fd store name {name:?}"),
            ));
        }
        let msg = store_message(name, poll);
        self.send(msg.as_bytes(), Some(fd))
    }

    /// `FDSTOREREMOVE=1` for `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.send(format!("FDSTOREREMOVE=1\nFDNAME={name}").as_bytes(), None)
    }

    fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        use nix::sys::socket::{
            sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
        };
        let sock = match self.sock.get() {
            Some(s) => s,
            None => {
                let s = socket(
                    AddressFamily::Unix,
                    SockType::Datagram,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                // Another thread may have won: either socket does.
                let _ = self.sock.set(s);
                self.sock
                    .get()
                    .ok_or_else(|| io::Error::other("notify socket missing"))?
            }
        };
        let bytes = self.addr.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(bytes)?,
        };
        let raw = fd.map(|f| [f.as_raw_fd()]);
        let cmsg: Vec<ControlMessage> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
        let iov = [io::IoSlice::new(msg)];
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        )?;
        Ok(())
    }
}

fn store_message(name: &str, poll: bool) -> String {
    if poll {
        format!("FDSTORE=1\nFDNAME={name}")
    } else {
        format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0")
    }
}

const MAGIC: &[u8; 8] = b"VHSTATE2";
const HEADER: usize = 32;

/// FNV-1a's step over 64-bit words rather than bytes (8 times fewer multiplications:
/// the body is hashed on every change): enough to tell a torn body from a whole one.
fn fnv1a(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    // The length, so that trailing zero bytes still count.
    (h ^ data.len() as u64).wrapping_mul(PRIME)
}

/// Reads a slot: `(generation, body)` if its header is whole and matches its body.
fn read_slot(slot: &File) -> Option<(u64, Vec<u8>)> {
    let mut hdr = [0u8; HEADER];
    slot.read_exact_at(&mut hdr, 0).ok()?;
    if &hdr[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&hdr[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (gen, len, hash) = (word(8), word(16), word(24));
    let len = usize::try_from(len).ok()?;
    let mut body = vec![0u8; len];
    slot.read_exact_at(&mut body, HEADER as u64).ok()?;
    (fnv1a(&body) == hash).then_some((gen, body))
}

/// The two memfds holding the state document (module docs: **State**).
#[derive(Debug)]
pub struct StateSlots {
    slots: [File; 2],
    gen: u64,
}

impl StateSlots {
    /// Two fresh, empty slots.
    pub fn create() -> io::Result<StateSlots> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let mk = |n: &std::ffi::CStr| -> io::Result<File> {
            Ok(File::from(memfd_create(n, MemFdCreateFlag::MFD_CLOEXEC)?))
        };
        Ok(StateSlots {
            slots: [mk(c"vh-state-a")?, mk(c"vh-state-b")?],
            gen: 0,
        })
    }

    /// Slots handed back by the store; the next write follows the newest generation.
    pub fn adopt(a: File, b: File) -> StateSlots {
        let gen = [&a, &b]
            .iter()
            .filter_map(|s| read_slot(s).map(|(g, _)| g))
            .max()
            .unwrap_or(0);
        StateSlots { slots: [a, b], gen }
    }

    /// The newest whole document: `(generation, body)`.
    pub fn latest(&self) -> Option<(u64, Vec<u8>)> {
        self.slots
            .iter()
            .filter_map(read_slot)
            .max_by_key(|(g, _)| *g)
    }

    /// Writes `body` as the next generation into the slot not holding the newest one.
    /// Returns the generation written.
    pub fn write(&mut self, body: &[u8]) -> io::Result<u64> {
        let gen = self.gen + 1;
        // Generations alternate between the slots: odd in A, even in B.
        let slot = &self.slots[gen.is_multiple_of(2) as usize];
        slot.write_all_at(&[0u8; HEADER], 0)?;
        // No truncation: the header says how long the body is, and a slot that shrank
        // and grew again on every change would free and fault in its pages each time.
        slot.write_all_at(body, HEADER as u64)?;
        let mut hdr = [0u8; HEADER];
        hdr[..8].copy_from_slice(MAGIC);
        hdr[8..16].copy_from_slice(&gen.to_le_bytes());
        hdr[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        hdr[24..32].copy_from_slice(&fnv1a(body).to_le_bytes());
        slot.write_all_at(&hdr, 0)?;
        self.gen = gen;
        Ok(gen)
    }

    /// Stores both slots (once, at start).
    pub fn store_in(&self, store: &FdStore) -> io::Result<()> {
        for (slot, name) in self.slots.iter().zip(STATE_SLOTS) {
            store.store(name, slot.as_fd(), false)?;
        }
        Ok(())
    }
}

/// A snapshot body: the fd table, a blank line, the state document.
pub fn snapshot_body<'a>(
    fds: impl ExactSizeIterator<Item = (RawFd, &'a str)>,
    doc: &str,
) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(doc.len() + fds.len() * 24 + 1);
    for (fd, name) in fds {
        let _ = writeln!(out, "fd {fd} {name}");
    }
    out.push('\n');
    out.push_str(doc);
    out.into_bytes()
}

/// Splits a snapshot body into its fd table (name → recorded number) and document.
pub fn parse_snapshot(body: &[u8]) -> Result<(HashMap<String, RawFd>, String), String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("state is not UTF-8: {e}"))?;
    let (table, doc) = text
        .split_once("\n\n")
        .or_else(|| text.strip_prefix('\n').map(|d| ("", d)))
        .ok_or("state has no fd table")?;
    let mut map = HashMap::new();
    for line in table.lines() {
        let mut w = line.splitn(3, ' ');
        let (Some("fd"), Some(n), Some(name)) = (w.next(), w.next(), w.next()) else {
            return Err(format!("bad fd table line {line:?}"));
        };
        let n: RawFd = n
            .parse()
            .map_err(|_| format!("bad fd number in {line:?}"))?;
        if n < 3 || map.insert(name.to_string(), n).is_some() {
            return Err(format!("bad or repeated fd table entry {line:?}"));
        }
    }
    Ok((map, doc.to_string()))
}

/// What a start with stored fds resumes from.
#[derive(Debug)]
pub struct Resumed {
    /// The re-exec state document; the fd numbers it names are open (and inheritable,
    /// as after a re-exec).
    pub doc: String,
    /// The state slots, to keep writing.
    pub slots: StateSlots,
    /// Stored names the document does not use (to remove from the store).
    pub stale: Vec<String>,
    /// Names the document uses whose fd the store did not give back.
    pub missing: Vec<String>,
    /// Name → number of every stored fd now open at its recorded number.
    pub table: HashMap<String, RawFd>,
}

/// Moves stored fds to the numbers the document recorded for their names. `passed` are
/// all passed fds by name; `table` is name → recorded number. Returns the names the
/// table lacks (their fds are closed) and the table names with no fd. Every recorded
/// number is free when this returns successfully except the ones now holding their fd.
///
/// Must run while no other thread opens fds (the numbers are chosen by hand).
pub fn place(
    passed: Vec<(String, OwnedFd)>,
    table: &HashMap<String, RawFd>,
) -> io::Result<(Vec<String>, Vec<String>)> {
    // First lift every fd above all recorded numbers, so no dup2 below clobbers a
    // stored fd that has not reached its place yet.
    let floor = table.values().copied().max().unwrap_or(2).saturating_add(1);
    let mut lifted = Vec::with_capacity(passed.len());
    let mut stale = Vec::new();
    for (name, fd) in passed {
        if !table.contains_key(&name) {
            stale.push(name);
            continue;
        }
        let up = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it alone.
        lifted.push((name, unsafe { OwnedFd::from_raw_fd(up) }));
        drop(fd);
    }
    let mut placed = std::collections::HashSet::new();
    for (name, fd) in lifted {
        let Some(&want) = table.get(&name) else {
            continue;
        };
        // dup2 clears close-on-exec on the target: stored fds come back inheritable,
        // as fds do after a re-exec. The recorded number is ours now: the restore
        // adopts it by number.
        nix::unistd::dup2(fd.as_raw_fd(), want)?;
        placed.insert(name);
    }
    let missing = table
        .keys()
        .filter(|n| !placed.contains(*n))
        .cloned()
        .collect();
    Ok((stale, missing))
}

/// Called first thing in `main`: when the store is on and systemd passed our stored
/// fds, takes every passed fd, picks the newest state slot and moves each stored fd to
/// its recorded number. `Ok(None)`: a fresh start (the activation variables are left
/// for socket activation). Fds passed under names not ours (socket units) are closed:
/// they duplicate stored listeners.
///
/// Stored fds with no whole document to go with them (a start killed before its first
/// snapshot, or a store holding one slot) are a fresh start: nothing named them, so no
/// reply was ever sent for them; they are closed and removed from the store, and the
/// socket units' fds passed alongside are kept for socket activation.
///
/// `Err`: a whole document that cannot be read (e.g. written by a different build).
/// The store is left as it is: it may hold leases of running guests.
pub fn take_stored() -> Result<Option<Resumed>, String> {
    let Some(store) = FdStore::from_env() else {
        return Ok(None);
    };
    let parsed = crate::activation::parse_env(
        std::env::var_os("LISTEN_PID").as_deref(),
        std::env::var_os("LISTEN_FDS").as_deref(),
        std::env::var_os("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    let crate::activation::Parsed::Activated(names) = parsed else {
        return Ok(None);
    };
    if !names.iter().any(|n| n.starts_with(PREFIX)) {
        return Ok(None);
    }
    let number = |i: usize| crate::activation::LISTEN_FDS_START.saturating_add(i as RawFd);
    let is_open = |fd: RawFd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok();
    // Is there a whole document? Looked at before anything is taken, so that a fresh
    // start can leave the socket units' fds to socket activation.
    let slot_at = |slot: &str| {
        names
            .iter()
            .position(|n| n == slot)
            .map(number)
            .filter(|&fd| is_open(fd))
    };
    let whole = match (slot_at(STATE_SLOTS[0]), slot_at(STATE_SLOTS[1])) {
        (Some(a), Some(b)) => {
            // SAFETY: both numbers are open (F_GETFD succeeded) and were passed by
            // systemd; ManuallyDrop borrows them for the read without closing them.
            let (a, b) = unsafe {
                (
                    std::mem::ManuallyDrop::new(File::from_raw_fd(a)),
                    std::mem::ManuallyDrop::new(File::from_raw_fd(b)),
                )
            };
            read_slot(&a).is_some() || read_slot(&b).is_some()
        }
        _ => false,
    };
    if !whole {
        fresh_start_from(&store, &names);
        return Ok(None);
    }
    // Single-threaded here (called before anything else in main).
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut ours = Vec::new();
    let mut slots: [Option<File>; 2] = [None, None];
    for (i, name) in names.into_iter().enumerate() {
        let raw = number(i);
        if !is_open(raw) {
            continue;
        }
        // SAFETY: systemd passed this open descriptor (F_GETFD succeeded) as number
        // 3 + i; each passed number is taken exactly once, here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if let Some(k) = STATE_SLOTS.iter().position(|s| *s == name) {
            slots[k] = Some(File::from(fd));
        } else if name.starts_with(PREFIX) {
            ours.push((name, fd));
        }
        // Anything else (a socket unit's fd) is dropped here.
    }
    let [Some(a), Some(b)] = slots else {
        return Err("the fd store's state slots vanished".into());
    };
    let slots = StateSlots::adopt(a, b);
    let Some((_, body)) = slots.latest() else {
        return Err("no complete state document in the fd store".into());
    };
    let (table, doc) = parse_snapshot(&body)?;
    // The slots were moved to fds 3.. as well; lift them out of the way of the table.
    let slots = StateSlots {
        slots: slots.slots.map(|f| lift_file(f, &table)),
        gen: slots.gen,
    };
    let (stale, missing) = place(ours, &table).map_err(|e| format!("placing stored fds: {e}"))?;
    let mut table = table;
    let mut lost = Vec::new();
    for name in &missing {
        if let Some(n) = table.remove(name) {
            lost.push(n);
        }
    }
    hold_lost(&lost).map_err(|e| format!("holding the numbers of lost fds: {e}"))?;
    Ok(Some(Resumed {
        doc,
        slots,
        stale,
        missing,
        table,
    }))
}

/// A fresh start although systemd passed stored fds (no whole document): every fd of
/// ours is closed and removed from the store (before anything new is stored under the
/// same names); the rest (socket units' listeners) move down to 3.. and the activation
/// variables are rewritten to name only them.
fn fresh_start_from(store: &FdStore, names: &[String]) {
    let plan = FreshPlan::of(names);
    for (raw, name) in &plan.remove {
        if nix::fcntl::fcntl(*raw, nix::fcntl::FcntlArg::F_GETFD).is_ok() {
            // SAFETY: systemd passed this open descriptor; it is closed once, here.
            drop(unsafe { OwnedFd::from_raw_fd(*raw) });
        }
        if let Err(e) = store.remove(name) {
            eprintln!("cannot remove {name} from the fd store: {e}");
        }
    }
    eprintln!(
        "the fd store holds {} fds but no whole state document (a start that died before its first snapshot): starting fresh",
        plan.remove.len()
    );
    let mut kept_names = Vec::new();
    for (from, to, name) in &plan.keep {
        if from != to {
            if nix::unistd::dup2(*from, *to).is_err() {
                continue;
            }
            let _ = nix::unistd::close(*from);
        }
        kept_names.push(name.as_str());
    }
    // Single-threaded here (called before anything else in main).
    if kept_names.is_empty() {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    } else {
        std::env::set_var("LISTEN_FDS", kept_names.len().to_string());
        std::env::set_var("LISTEN_FDNAMES", kept_names.join(":"));
    }
}

/// What a fresh start with stored fds does with the passed ones (pure, for tests).
#[derive(Debug, PartialEq, Eq)]
pub struct FreshPlan {
    /// Ours: (number, name), closed and removed from the store.
    pub remove: Vec<(RawFd, String)>,
    /// The rest (socket units'): (from, to, name), compacted to 3.. in order. The j-th
    /// kept fd comes from a number >= 3 + j, and every lower number is either ours
    /// (closed first) or already moved, so no move clobbers a kept fd.
    pub keep: Vec<(RawFd, RawFd, String)>,
}

impl FreshPlan {
    pub fn of(names: &[String]) -> FreshPlan {
        let start = crate::activation::LISTEN_FDS_START;
        let mut plan = FreshPlan {
            remove: Vec::new(),
            keep: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let raw = start.saturating_add(i as RawFd);
            if name.starts_with(PREFIX) {
                plan.remove.push((raw, name.clone()));
            } else {
                let to = start.saturating_add(plan.keep.len() as RawFd);
                plan.keep.push((raw, to, name.clone()));
            }
        }
        plan
    }
}

/// Numbers the document recorded for fds the store did not give back, each held by a
/// placeholder until the restore is done: otherwise the log file, the pid file or the
/// runtime's epoll fd would be opened at such a number and the restore would adopt it
/// as a client, a pipe or a lease.
static LOST: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Puts a placeholder (`/dev/null`, `O_PATH`) on each of `numbers`.
pub fn hold_lost(numbers: &[RawFd]) -> io::Result<()> {
    if numbers.is_empty() {
        return Ok(());
    }
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open(2) just returned this descriptor; we own it alone.
    let first = unsafe { OwnedFd::from_raw_fd(null) };
    // open(2) took the lowest free number, which may be one of the holes: the source
    // of the copies lives above all of them.
    let floor = numbers.iter().copied().max().unwrap_or(2).saturating_add(1);
    let up = nix::fcntl::fcntl(
        first.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor),
    )?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it alone.
    let null = unsafe { OwnedFd::from_raw_fd(up) };
    drop(first);
    let mut held = LOST.lock().map_err(|_| io::Error::other("poisoned"))?;
    for &n in numbers {
        if n < 3 || held.iter().any(|h| h.as_raw_fd() == n) {
            continue;
        }
        nix::unistd::dup2(null.as_raw_fd(), n)?;
        // dup2 cleared close-on-exec; a placeholder must not reach a child.
        crate::restart::set_cloexec(n)?;
        // SAFETY: dup2 just made `n` a copy of our placeholder; we own it alone.
        held.push(unsafe { OwnedFd::from_raw_fd(n) });
    }
    Ok(())
}

/// Whether `fd` is a placeholder for a lost fd (the restore must not adopt it).
pub fn is_lost(fd: RawFd) -> bool {
    LOST.lock()
        .map(|h| h.iter().any(|f| f.as_raw_fd() == fd))
        .unwrap_or(false)
}

/// After the restore: the placeholders go (nothing names their numbers any more).
pub fn release_lost() {
    if let Ok(mut h) = LOST.lock() {
        h.clear();
    }
}

/// Moves a file above every recorded number (keeping it if that fails).
fn lift_file(f: File, table: &HashMap<String, RawFd>) -> File {
    let floor = table.values().copied().max().unwrap_or(2).saturating_add(1);
    if f.as_raw_fd() >= floor && !table.values().any(|&n| n == f.as_raw_fd()) {
        return f;
    }
    match nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor)) {
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; we own it alone.
        Ok(up) => File::from(unsafe { OwnedFd::from_raw_fd(up) }),
        Err(_) => f,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn s(v: &str) -> Option<&OsStr> {
        Some(OsStr::new(v))
    }

    #[test]
    fn fresh_start_removes_ours_and_compacts_the_socket_units() {
        let names: Vec<String> = [
            "vh-state-a",
            "virtlockd.socket",
            "vh-lease-3",
            "admin.socket",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = FreshPlan::of(&names);
        assert_eq!(
            p.remove,
            vec![(3, "vh-state-a".to_string()), (5, "vh-lease-3".to_string())]
        );
        assert_eq!(
            p.keep,
            vec![
                (4, 3, "virtlockd.socket".to_string()),
                (6, 4, "admin.socket".to_string())
            ]
        );
    }

    #[test]
    fn lost_numbers_are_held_until_released() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let n = r.as_raw_fd();
        drop(r);
        hold_lost(&[n]).unwrap();
        assert!(is_lost(n));
        // The number stays taken: nothing opened now lands on it.
        let (r2, w2) = nix::unistd::pipe().unwrap();
        assert_ne!(r2.as_raw_fd(), n);
        assert_ne!(w2.as_raw_fd(), n);
        assert!(nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD).is_ok());
        release_lost();
        assert!(!is_lost(n));
        drop((w, r2, w2));
    }

    #[test]
    fn enabled_only_with_a_notify_socket_and_a_store() {
        assert!(enabled_by(s("/run/n"), s("1"), None));
        assert!(enabled_by(s("@n"), None, s("4224")));
        assert!(
            !enabled_by(s("/run/n"), None, None),
            "252 without our variable"
        );
        assert!(!enabled_by(s("/run/n"), s("0"), s("0")));
        assert!(!enabled_by(None, s("1"), s("10")), "no systemd");
        assert!(!enabled_by(s(""), s("1"), None));
    }

    #[test]
    fn names_are_valid_for_systemd() {
        for n in [
            names::listener("virtlockd", 0),
            names::client("admin", 18_446_744_073_709_551_615),
            names::log(7),
            names::lease(1_000_000),
            STATE_SLOTS[0].to_string(),
        ] {
            assert!(valid_name(&n), "{n}");
            assert!(n.starts_with(PREFIX));
        }
        assert!(!valid_name("a:b"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(256)));
        assert!(!valid_name("tab\there"));
    }

    /// What systemd receives: the text and the fd, as one datagram with SCM_RIGHTS.
    #[test]
    fn store_and_remove_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let store = FdStore::at(path.as_os_str());
        let (r, _w) = nix::unistd::pipe().unwrap();
        store.store("vh-log-1", r.as_fd(), false).unwrap();
        let (text, fds) = vh_testkit::recv_notify(&rx).unwrap();
        assert_eq!(text, "FDSTORE=1\nFDNAME=vh-log-1\nFDPOLL=0");
        assert_eq!(fds.len(), 1);
        drop(fds);

        store.remove("vh-log-1").unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=vh-log-1");
        assert!(store.store("bad:name", r.as_fd(), true).is_err());
        assert_eq!(store_message("x", true), "FDSTORE=1\nFDNAME=x");
    }

    #[test]
    fn slots_alternate_and_the_newest_whole_one_wins() {
        let mut st = StateSlots::create().unwrap();
        assert!(st.latest().is_none());
        assert_eq!(st.write(b"one").unwrap(), 1);
        assert_eq!(st.write(b"two, longer").unwrap(), 2);
        assert_eq!(st.latest().unwrap(), (2, b"two, longer".to_vec()));
        // A crash in the middle of writing generation 3 (into slot A): its header is
        // zeroed, the body half written. Generation 2 is what a restart sees.
        let a = &st.slots[0].try_clone().unwrap();
        a.write_all_at(&[0u8; HEADER], 0).unwrap();
        a.write_all_at(b"thr", HEADER as u64).unwrap();
        assert_eq!(st.latest().unwrap(), (2, b"two, longer".to_vec()));
        // A torn body under a whole header (cannot happen with our order, but a bug
        // must not resume from garbage): the hash refuses it.
        st.write(b"three").unwrap();
        a.write_all_at(b"X", HEADER as u64).unwrap();
        assert_eq!(st.latest().unwrap().0, 2);
        // Adopting the slots continues after the newest whole generation, overwriting
        // the torn one (never the whole one).
        let [x, y] = st.slots;
        let mut again = StateSlots::adopt(x, y);
        assert_eq!(again.gen, 2);
        again.write(b"four").unwrap();
        assert_eq!(again.latest().unwrap(), (3, b"four".to_vec()));
    }

    #[test]
    fn snapshot_round_trip() {
        let body = snapshot_body([(12, "vh-log-1"), (7, "vh-lease-2")].into_iter(), "{}");
        let (map, doc) = parse_snapshot(&body).unwrap();
        assert_eq!(doc, "{}");
        assert_eq!(map["vh-log-1"], 12);
        assert_eq!(map["vh-lease-2"], 7);
        let (map, doc) = parse_snapshot(&snapshot_body(std::iter::empty(), "{\"a\":1}")).unwrap();
        assert!(map.is_empty());
        assert_eq!(doc, "{\"a\":1}");
        assert!(parse_snapshot(b"fd x y\n\n{}").is_err());
        assert!(
            parse_snapshot(b"fd 1 y\n\n{}").is_err(),
            "stdio is never ours"
        );
        assert!(parse_snapshot(b"fd 9 y\nfd 10 y\n\n{}").is_err());
    }

    /// Stored fds land on their recorded numbers, even when those numbers are where
    /// other stored fds arrived; unknown names are reported stale.
    #[test]
    fn place_moves_fds_to_recorded_numbers() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
        let (e, _f) = std::os::unix::net::UnixStream::pair().unwrap();
        // Swap numbers: a goes where c is now and c where a is now.
        let (ra, rc) = (a.as_raw_fd(), c.as_raw_fd());
        let table: HashMap<String, RawFd> = [
            ("vh-client-x-1".to_string(), rc),
            ("vh-client-x-2".to_string(), ra),
        ]
        .into_iter()
        .collect();
        let (stale, missing) = place(
            vec![
                ("vh-client-x-1".into(), a.into()),
                ("vh-client-x-2".into(), c.into()),
                ("vh-log-9".into(), e.into()),
            ],
            &table,
        )
        .unwrap();
        assert_eq!(stale, vec!["vh-log-9".to_string()]);
        assert!(missing.is_empty());
        use std::io::{Read, Write};
        // SAFETY: `place` left these numbers open and owned by nobody else.
        let mut at_rc = unsafe { std::os::unix::net::UnixStream::from_raw_fd(rc) };
        // SAFETY: as above, for the other number `place` left open.
        let mut at_ra = unsafe { std::os::unix::net::UnixStream::from_raw_fd(ra) };
        at_rc.write_all(b"1").unwrap();
        at_ra.write_all(b"2").unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"1", "a's peer hears from number rc");
        d.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"2", "c's peer hears from number ra");
        let fl = nix::fcntl::fcntl(rc, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_eq!(fl & libc::FD_CLOEXEC, 0, "inheritable, as after a re-exec");
    }
}
