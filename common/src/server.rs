//! One libvirt RPC server ("virtlogd", "virtlockd" or "admin"): its listening services,
//! its clients, and dispatch of their calls onto registered programs.
//!
//! Each client is one tokio task that reads a message, dispatches it inline, writes the
//! reply (fds included) and only then reads the next one: libvirt's
//! `nrequests_client_max = 1`, without a worker pool. After each call the task goes to
//! the back of the run queue, so clients take turns as in 9.0's FIFO of calls. Nothing is shared between clients
//! but the client registry, which is touched only on connect, disconnect and by admin.
//!
//! A task ends in one of three ways:
//! * the peer hangs up or breaks the protocol: the client is closed and its program's
//!   `client_closed` hook runs (virtlockd releases the owner's leases there);
//! * the daemon quits: the same, for every client;
//! * the daemon hands off for re-exec: the task gives its socket back at once *without*
//!   running the close hook, so that nothing held is released, together with whatever
//!   it had half done: the part of a request already read and the part of a reply not
//!   yet written ([`PendingIo`]). The next image carries on from there, so a re-exec
//!   never waits for a slow peer and never desynchronises one.

use crate::connection::{FrameReader, Incoming, Outbox, ReadEnd};
use crate::error::{RpcError, MESSAGE_STRING_MAX};
use crate::protocol::{self, msg_type, status, Header};
use crate::xdr::XdrError;
use std::any::Any;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

/// What the daemon as a whole is doing; every task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Close everything (SIGTERM, idle timeout).
    Quit,
    /// Give every fd back untouched (SIGUSR1 re-exec).
    Handoff,
}

/// Per-client private state owned by a program (virtlockd's registered owner, say).
pub type Private = Box<dyn Any + Send>;

/// Who a client is, as recorded at accept time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Epoch seconds.
    pub conn_time: i64,
    pub fd: RawFd,
}

/// A program's hooks into the client life cycle, and its per-client state.
pub trait ClientHooks: Send + Sync + 'static {
    fn new_private(&self, _info: &ClientInfo) -> Private {
        Box::new(())
    }
    /// The client is gone for good (not on hand-off).
    fn client_closed(&self, _info: &ClientInfo, _private: Private) {}
    /// The `privateData` object of the re-exec state.
    fn save_private(&self, _private: &Private) -> Result<serde_json::Value, PrivateDataError> {
        Ok(serde_json::json!({}))
    }
    fn restore_private(&self, _v: &serde_json::Value) -> Result<Private, PrivateDataError> {
        Ok(Box::new(()))
    }
}

/// Why a client's `privateData` could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDataError {
    /// The client's private state is not what the program gives its clients (`{0}`
    /// names the program's kind of client).
    #[error("{0} client state missing")]
    Missing(&'static str),
    /// The `privateData` object could not be read.
    #[error(transparent)]
    Document(#[from] crate::restart::RestartError),
}

/// The default hooks: no private state (virtlogd, admin).
pub struct NoHooks;
impl ClientHooks for NoHooks {}

/// What a procedure handler returns on success.
#[derive(Debug, Default)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    pub fn void() -> Self {
        Reply::default()
    }
    pub fn payload(payload: Vec<u8>) -> Self {
        Reply {
            payload,
            fds: Vec::new(),
        }
    }
}

/// Why a call failed, in the terms of libvirt's dispatcher.
#[derive(Debug)]
pub enum DispatchError {
    UnknownProcedure,
    Decode(XdrError),
    Failed(RpcError),
}

impl From<RpcError> for DispatchError {
    fn from(e: RpcError) -> Self {
        DispatchError::Failed(e)
    }
}

impl From<XdrError> for DispatchError {
    fn from(e: XdrError) -> Self {
        DispatchError::Decode(e)
    }
}

/// The call being dispatched and the client making it.
pub struct CallContext<'a> {
    pub server: &'a Arc<Server>,
    pub client: &'a ClientInfo,
    pub private: &'a mut Private,
    /// Fds that came with the call; whatever the handler leaves here is closed after it.
    pub fds: Vec<OwnedFd>,
    /// Set by a handler (admin CONNECT_CLOSE) to drop the connection after the reply.
    pub close_after_reply: bool,
}

/// One RPC program served on a server.
pub trait Program: Send + Sync + 'static {
    fn program(&self) -> u32;
    fn version(&self) -> u32;
    /// Handles one call. Must answer `UnknownProcedure` before decoding anything, so
    /// that the checks come in libvirt's order.
    fn dispatch(
        &self,
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError>;

    /// Like [`dispatch`](Self::dispatch), for a program whose calls may block (on a
    /// stuck file system, say): it may answer [`Dispatched::Later`] with a future that
    /// the client's task awaits, so that other clients keep being served meanwhile.
    /// This client's next call is read only once the reply is written, as always.
    fn dispatch_deferred(&self, ctx: &mut CallContext<'_>, proc_: i32, args: &[u8]) -> Dispatched {
        Dispatched::Now(self.dispatch(ctx, proc_, args))
    }
}

/// Where [`Server::begin_call`] left a message.
enum CallStep {
    /// Handled; `false`: close once the queued reply is sent.
    Done(bool),
    /// A deferred call: its work, then [`Server::finish_call`] with the rest.
    Later(LaterCall),
}

/// What a deferred call's reply needs once its work is done.
struct LaterCall {
    work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, DispatchError>> + Send>>,
    header: Header,
    close_after: bool,
}

/// A call's result, or the work still to do for it.
pub enum Dispatched {
    Now(Result<Reply, DispatchError>),
    Later(
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, DispatchError>> + Send>>,
    ),
}

/// One listening socket of a server.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub path: Option<PathBuf>,
    /// Whether we bound it ourselves (and so unlink it on a clean stop).
    pub unlink_on_stop: bool,
}

/// Wakes a client's task: an admin close, or a change of the server's run state (which
/// the task reads itself). One `Notify` for both, so the task waits on one `notified()`
/// (64 bytes in its future) instead of that and a `watch::changed()` (120 more).
#[derive(Default)]
struct ClientWake {
    notify: Notify,
    /// Set by [`Server::close_client`]; any other wake-up just makes the task look at
    /// the run state again.
    close: AtomicBool,
}

struct ClientEntry {
    info: ClientInfo,
    wake: Arc<ClientWake>,
    /// The client's private state as last saved for the fd store (`{}` without it).
    saved: serde_json::Value,
    /// Its fd is being closed: no fd store snapshot lists it any more (the entry itself
    /// stays until the close hook has run, so a quit still waits for that).
    closing: bool,
}

/// The fd store's hook into the servers (see `fdstore_keeper`): called after a call
/// was dispatched and before its reply is written, so that a snapshot holding what the
/// call changed exists before the client hears of it.
pub trait StoreHook: Send + Sync + 'static {
    fn after_call(&self);
}

/// What the fd store's snapshot needs of one live client.
pub struct LiveClient {
    pub info: ClientInfo,
    pub private: serde_json::Value,
}

/// A server's listeners and clients, held still for an fd store snapshot
/// ([`Server::store_view`]). Keep it no longer than the snapshot: accepts and hang-ups
/// wait for it.
pub struct StoreView<'a> {
    listeners: MutexGuard<'a, Vec<(RawFd, bool)>>,
    clients: MutexGuard<'a, BTreeMap<u64, ClientEntry>>,
}

impl StoreView<'_> {
    /// The listening sockets (fd number, unlink on stop).
    pub fn listeners(&self) -> Vec<(RawFd, bool)> {
        self.listeners.clone()
    }

    /// The connected clients with their private state as last saved.
    pub fn clients(&self) -> Vec<LiveClient> {
        self.clients
            .values()
            .filter(|e| !e.closing)
            .map(|e| LiveClient {
                info: e.info.clone(),
                private: e.saved.clone(),
            })
            .collect()
    }
}

/// A client socket given back at hand-off, with what is needed to restore it.
pub struct HandedOffClient {
    pub info: ClientInfo,
    pub fd: OwnedFd,
    pub private: serde_json::Value,
    pub pending: PendingIo,
}

/// A client's half-done I/O at hand-off, resumed by the next image.
#[derive(Debug, Default)]
pub struct PendingIo {
    /// The bytes consumed of a request not yet complete (length word included).
    pub input: Vec<u8>,
    /// Fds already received with that request.
    pub input_fds: Vec<OwnedFd>,
    /// The bytes of a reply not yet written.
    pub output: Vec<u8>,
    /// Fds of that reply not yet sent.
    pub output_fds: Vec<OwnedFd>,
}

impl PendingIo {
    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
            && self.input_fds.is_empty()
            && self.output.is_empty()
            && self.output_fds.is_empty()
    }
}

/// A listening socket given back at hand-off.
pub struct HandedOffService {
    pub info: ServiceInfo,
    pub fd: OwnedFd,
}

/// Live server limits and counters (admin reads and sets them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    pub max_clients: usize,
    /// Limit on clients still waiting for authentication; 0 means none.
    pub max_unauth: usize,
}

impl ClientLimits {
    /// Whether one more client may be accepted, given how many are connected and how
    /// many of those still wait for authentication (9.0's `virNetServerCheckLimits`).
    /// Our services all use auth NONE, so every client is authenticated at accept and
    /// `unauth` is always 0: `nclients_unauth_max` never locks anyone out.
    pub fn admits(&self, nclients: usize, unauth: usize) -> bool {
        nclients < self.max_clients && (self.max_unauth == 0 || unauth < self.max_unauth)
    }
}

pub struct Server {
    name: String,
    programs: RwLock<Vec<Arc<dyn Program>>>,
    hooks: Arc<dyn ClientHooks>,
    allowed_uid: u32,
    max_clients: AtomicUsize,
    max_unauth: AtomicUsize,
    next_client_id: AtomicU64,
    clients: Mutex<BTreeMap<u64, ClientEntry>>,
    /// Signalled whenever the client set or the limits change.
    changed: Notify,
    run: watch::Receiver<RunState>,
    services_live: AtomicUsize,
    handed_off_clients: Mutex<Vec<HandedOffClient>>,
    handed_off_services: Mutex<Vec<HandedOffService>>,
    service_infos: Mutex<Vec<ServiceInfo>>,
    /// Listening sockets being served: fd number and whether we unlink it on stop.
    listener_fds: Mutex<Vec<(RawFd, bool)>>,
    store_hook: std::sync::OnceLock<Arc<dyn StoreHook>>,
    /// Whether the task that wakes every client on a run state change is running.
    run_watch: AtomicBool,
}

/// Locks one of the server's (or the admin program's) tables, recovering it if a panic
/// poisoned it. Recovery, not an empty table: every critical section on these tables is
/// one insert, remove, push or read, so a panicking holder leaves them whole, and
/// reading a poisoned client table as empty would let a re-exec or `--timeout` think the
/// server drained and the client limit admit anyone.
pub(crate) fn lock_table<T>(table: &Mutex<T>) -> MutexGuard<'_, T> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Server {
    pub fn new(
        name: &str,
        allowed_uid: u32,
        limits: ClientLimits,
        hooks: Arc<dyn ClientHooks>,
        run: watch::Receiver<RunState>,
    ) -> Arc<Self> {
        Arc::new(Server {
            name: name.to_string(),
            programs: RwLock::new(Vec::new()),
            hooks,
            allowed_uid,
            max_clients: AtomicUsize::new(limits.max_clients),
            max_unauth: AtomicUsize::new(limits.max_unauth),
            next_client_id: AtomicU64::new(1),
            clients: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            run,
            services_live: AtomicUsize::new(0),
            handed_off_clients: Mutex::new(Vec::new()),
            handed_off_services: Mutex::new(Vec::new()),
            service_infos: Mutex::new(Vec::new()),
            listener_fds: Mutex::new(Vec::new()),
            store_hook: std::sync::OnceLock::new(),
            run_watch: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn add_program(&self, p: Arc<dyn Program>) {
        if let Ok(mut v) = self.programs.write() {
            v.push(p);
        }
    }

    pub fn hooks(&self) -> &Arc<dyn ClientHooks> {
        &self.hooks
    }

    pub fn limits(&self) -> ClientLimits {
        ClientLimits {
            max_clients: self.max_clients.load(Ordering::Relaxed),
            max_unauth: self.max_unauth.load(Ordering::Relaxed),
        }
    }

    pub fn set_limits(&self, l: ClientLimits) {
        self.max_clients.store(l.max_clients, Ordering::Relaxed);
        self.max_unauth.store(l.max_unauth, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.load(Ordering::Relaxed)
    }

    pub fn set_next_client_id(&self, id: u64) {
        self.next_client_id.store(id.max(1), Ordering::Relaxed);
    }

    pub fn nclients(&self) -> usize {
        lock_table(&self.clients).len()
    }

    /// Snapshot of the connected clients, in id (= accept) order.
    pub fn clients(&self) -> Vec<ClientInfo> {
        lock_table(&self.clients)
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    pub fn client(&self, id: u64) -> Option<ClientInfo> {
        lock_table(&self.clients).get(&id).map(|e| e.info.clone())
    }

    /// Asks a client's task to close the connection (admin CLIENT_CLOSE).
    pub fn close_client(&self, id: u64) -> bool {
        match lock_table(&self.clients).get(&id) {
            Some(e) => {
                e.wake.close.store(true, Ordering::Release);
                e.wake.notify.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn services(&self) -> Vec<ServiceInfo> {
        lock_table(&self.service_infos).clone()
    }

    /// Waits until the client set or the limits change.
    pub async fn wait_changed(&self) {
        self.changed.notified().await
    }

    /// Whether every task of this server has finished (after Quit or Handoff).
    pub fn is_drained(&self) -> bool {
        self.nclients() == 0 && self.services_live.load(Ordering::Acquire) == 0
    }

    /// Returns once [`Self::is_drained`]: woken by each task as it ends, not by polling
    /// (a re-exec's downtime starts here).
    pub async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so an end between the two is not missed.
            changed.as_mut().enable();
            if self.is_drained() {
                return;
            }
            changed.await;
        }
    }

    pub fn take_handed_off(&self) -> (Vec<HandedOffService>, Vec<HandedOffClient>) {
        // Services are re-added (with their info) when they are restored.
        lock_table(&self.service_infos).clear();
        let s = std::mem::take(&mut *lock_table(&self.handed_off_services));
        let c = std::mem::take(&mut *lock_table(&self.handed_off_clients));
        (s, c)
    }

    /// Sets the fd store's hook (once, when the store is on).
    pub fn set_store_hook(&self, hook: Arc<dyn StoreHook>) {
        let _ = self.store_hook.set(hook);
    }

    /// The listening sockets being served (fd number, unlink on stop).
    pub fn listener_fds(&self) -> Vec<(RawFd, bool)> {
        lock_table(&self.listener_fds).clone()
    }

    /// The connected clients with their private state as last saved for the fd store.
    pub fn live_clients(&self) -> Vec<LiveClient> {
        self.store_view().clients()
    }

    /// Listeners and clients as the fd store's snapshot lists them. While the view
    /// lives no listed fd is closed: a listener leaves its table, and a client is
    /// marked closing in its table, before its fd is closed, and both wait for the view, so a number listed here cannot
    /// be closed and reused by another fd before the keeper has stored it.
    pub fn store_view(&self) -> StoreView<'_> {
        StoreView {
            listeners: lock_table(&self.listener_fds),
            clients: lock_table(&self.clients),
        }
    }

    /// Starts serving a listening socket.
    pub fn add_service(self: &Arc<Self>, listener: UnixListener, info: ServiceInfo) {
        lock_table(&self.service_infos).push(info.clone());
        lock_table(&self.listener_fds).push((listener.as_raw_fd(), info.unlink_on_stop));
        crate::fdstore_keeper::touch();
        self.services_live.fetch_add(1, Ordering::AcqRel);
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop(listener, info).await });
    }

    async fn accept_loop(self: Arc<Self>, listener: UnixListener, info: ServiceInfo) {
        let listener_fd = listener.as_raw_fd();
        let mut run = self.run.clone();
        let mut suspended = false;
        let end = loop {
            // At the client limit libvirt stops polling the listener: new peers wait in
            // the backlog rather than being refused. Nobody ever waits for
            // authentication here (auth NONE), hence 0 unauthenticated clients.
            let full = !self.limits().admits(self.nclients(), 0);
            if full != suspended {
                suspended = full;
                if full {
                    info!(server = %self.name, "Temporarily suspending services");
                } else {
                    info!(server = %self.name, "Re-enabling services");
                }
            }
            let state = *run.borrow();
            if state != RunState::Running {
                break state;
            }
            if full {
                tokio::select! {
                    _ = self.changed.notified() => {}
                    r = run.changed() => if r.is_err() { break RunState::Quit },
                    // Notify has no memory for waiters that arrive late; poll as a backstop.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => self.accepted(stream),
                    Err(e) if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) => {
                        warn!(server = %self.name, "accept: {e}; pausing accepts");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        warn!(server = %self.name, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                r = run.changed() => if r.is_err() { break RunState::Quit },
                // Lowered limits take effect at once, not after one more accept
                // (accept is cancel-safe).
                _ = self.changed.notified() => {}
            }
        };
        lock_table(&self.listener_fds).retain(|(fd, _)| *fd != listener_fd);
        if end != RunState::Handoff {
            crate::fdstore_keeper::closing(listener_fd);
        }
        match end {
            RunState::Handoff => match listener.into_std() {
                Ok(l) => {
                    lock_table(&self.handed_off_services).push(HandedOffService {
                        info,
                        fd: OwnedFd::from(l),
                    });
                }
                Err(e) => warn!(server = %self.name, "cannot hand off listener: {e}"),
            },
            _ => {
                if info.unlink_on_stop {
                    if let Some(p) = &info.path {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        self.services_live.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn accepted(self: &Arc<Self>, stream: UnixStream) {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                warn!(server = %self.name, "cannot read peer credentials: {e}");
                return;
            }
        };
        let pid = cred.pid().unwrap_or(0);
        if cred.uid() != self.allowed_uid {
            // libvirt closes such peers without a word; the log line is its wording.
            error!(
                server = %self.name,
                "operation forbidden: Disallowing client {pid} with uid {}",
                cred.uid()
            );
            return;
        }
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let info = ClientInfo {
            id,
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            conn_time: now_epoch(),
            fd: stream.as_raw_fd(),
        };
        let private = self.hooks.new_private(&info);
        info!("{}: new client", who(&self.name, &info));
        self.spawn_client(
            stream,
            info,
            private,
            FrameReader::default(),
            Outbox::default(),
        );
    }

    /// Re-creates a client from an inherited socket (re-exec, or a failed exec).
    pub fn adopt_client(
        self: &Arc<Self>,
        fd: OwnedFd,
        id: u64,
        conn_time: i64,
        private: &serde_json::Value,
        pending: PendingIo,
    ) -> io::Result<()> {
        let reader = FrameReader::resume(&pending.input, pending.input_fds)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let outbox = Outbox::resume(pending.output, pending.output_fds);
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(std_stream)?;
        let cred = stream.peer_cred()?;
        if cred.uid() != self.allowed_uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "Disallowing client {} with uid {}",
                    cred.pid().unwrap_or(0),
                    cred.uid()
                ),
            ));
        }
        let private = self
            .hooks
            .restore_private(private)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let info = ClientInfo {
            id,
            pid: cred.pid().unwrap_or(0),
            uid: cred.uid(),
            gid: cred.gid(),
            conn_time,
            fd: stream.as_raw_fd(),
        };
        // Keep ids unique after restoring.
        self.next_client_id.fetch_max(id + 1, Ordering::Relaxed);
        self.spawn_client(stream, info, private, reader, outbox);
        Ok(())
    }

    /// Re-creates a listening service from an inherited socket.
    pub fn adopt_service(self: &Arc<Self>, fd: OwnedFd, info: ServiceInfo) -> io::Result<()> {
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true)?;
        let l = UnixListener::from_std(l)?;
        self.add_service(l, info);
        Ok(())
    }

    /// Starts (once) the task that wakes every client when the run state changes
    /// (a re-exec's hand-off, a quit), so that a client's task waits on its own
    /// `ClientWake` alone. Started with the first client, inside the runtime.
    fn start_run_watch(self: &Arc<Self>) {
        if self.run_watch.swap(true, Ordering::AcqRel) {
            return;
        }
        // Weak: the watch must not keep a server alive that nothing else uses.
        let server = Arc::downgrade(self);
        let mut run = self.run.clone();
        tokio::spawn(async move {
            loop {
                let gone = run.changed().await.is_err();
                let Some(server) = server.upgrade() else {
                    return;
                };
                for e in lock_table(&server.clients).values() {
                    e.wake.notify.notify_one();
                }
                if gone {
                    return;
                }
            }
        });
    }

    fn spawn_client(
        self: &Arc<Self>,
        stream: UnixStream,
        info: ClientInfo,
        private: Private,
        reader: FrameReader,
        outbox: Outbox,
    ) {
        self.start_run_watch();
        let wake = Arc::new(ClientWake::default());
        // A client restored across a restart carries its private state in the snapshot
        // from the start (the first call saves it again).
        let saved = match self.store_hook.get() {
            Some(_) => self.hooks.save_private(&private).unwrap_or_default(),
            None => serde_json::Value::Null,
        };
        lock_table(&self.clients).insert(
            info.id,
            ClientEntry {
                info: info.clone(),
                wake: wake.clone(),
                saved,
                closing: false,
            },
        );
        crate::fdstore_keeper::touch();
        self.changed.notify_waiters();
        let me = self.clone();
        tokio::spawn(async move {
            me.client_loop(stream, info, private, wake, reader, outbox)
                .await
        });
    }

    // A plain fn returning an `async move` block, not an `async fn`: an async fn's
    // future keeps its arguments twice (as passed, and moved into the body's locals),
    // and this future is most of what an idle connection costs (920 -> 632 bytes).
    #[allow(clippy::manual_async_fn)]
    fn client_loop(
        self: Arc<Self>,
        stream: UnixStream,
        info: ClientInfo,
        mut private: Private,
        wake: Arc<ClientWake>,
        mut reader: FrameReader,
        mut outbox: Outbox,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            let mut close_when_sent = false;
            let outcome: RunState = loop {
                // Read before waiting: a change after this wakes `wake` (the run watch
                // notifies every client in the table, and this one is in it), and a
                // `notify_one` with nobody waiting is kept for the next `notified()`.
                if self.run.has_changed().is_err() {
                    // The daemon's side of the run state is gone: it is shutting down.
                    break RunState::Quit;
                }
                let state = *self.run.borrow();
                if state == RunState::Handoff {
                    // Whatever the peer takes right now need not be carried (and a C next
                    // image, which cannot resume it, gets a whole reply out).
                    let _ = outbox.try_flush(&stream);
                    break state;
                }
                if state != RunState::Running {
                    break state;
                }
                // A reply goes out whole before the next request is read (one request at
                // a time, as libvirt's nrequests_client_max = 1).
                if !outbox.is_empty() {
                    tokio::select! {
                        r = outbox.flush(&stream) => match r {
                            Ok(()) if close_when_sent => break RunState::Quit,
                            // Go to the back of the queue before reading this client's next
                            // request. Without it, a client that answers quickly (it often
                            // runs on our CPU, woken by our reply) has its next request read
                            // at once, and the loop ping-pongs with it for a whole coop
                            // budget while every other client waits: that was the 4-8 ms p99
                            // with 16 busy owners.
                            Ok(()) => tokio::task::yield_now().await,
                            Err(e) => {
                                debug!(server = %self.name, client = info.id, "write failed: {e}");
                                break RunState::Quit;
                            }
                        },
                        _ = wake.notify.notified() => {
                            if wake.close.load(Ordering::Acquire) {
                                break RunState::Quit;
                            }
                        }
                    }
                    continue;
                }
                let msg = tokio::select! {
                    r = reader.read(&stream) => r,
                    _ = wake.notify.notified() => {
                        if wake.close.load(Ordering::Acquire) {
                            break RunState::Quit;
                        }
                        continue;
                    }
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(ReadEnd::Eof) => break RunState::Quit,
                    Err(ReadEnd::Broken(why)) => {
                        self.violation(&info, &why);
                        break RunState::Quit;
                    }
                };
                // Only a deferred call's own future is awaited here; the rest of the call is
                // synchronous, so the connection's future does not carry a `handle` state
                // (its message, header, program) while it waits for the next request.
                let keep = match self.begin_call(&info, &mut private, msg, &mut outbox) {
                    CallStep::Done(keep) => keep,
                    CallStep::Later(LaterCall {
                        work,
                        header,
                        close_after,
                    }) => {
                        let res = work.await;
                        self.finish_call(&info, &header, close_after, res, &mut outbox)
                    }
                };
                if !keep {
                    close_when_sent = true;
                }
                if let Some(hook) = self.store_hook.get() {
                    self.save_for_store(&info, &private);
                    hook.after_call();
                }
                // The reply usually goes out at once; only a full socket takes the select
                // above (and its waiter registrations) on the next turn.
                match outbox.try_flush(&stream) {
                    Ok(()) if close_when_sent => break RunState::Quit,
                    Ok(()) => tokio::task::yield_now().await,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        debug!(server = %self.name, client = info.id, "write failed: {e}");
                        break RunState::Quit;
                    }
                }
            };
            let id = info.id;
            if outcome == RunState::Handoff {
                let saved = match self.hooks.save_private(&private) {
                    Ok(v) => v,
                    Err(e) => {
                        warn!(server = %self.name, client = info.id, "cannot save client state: {e}");
                        serde_json::json!({})
                    }
                };
                match stream.into_std() {
                    Ok(s) => {
                        let (input, input_fds) = reader.take_partial();
                        let (output, output_fds) = outbox.take_unsent();
                        let pending = PendingIo {
                            input,
                            input_fds,
                            output,
                            output_fds,
                        };
                        if !pending.is_empty() {
                            debug!(
                                server = %self.name,
                                client = info.id,
                                "carrying {} request and {} reply bytes across re-exec",
                                pending.input.len(),
                                pending.output.len()
                            );
                        }
                        lock_table(&self.handed_off_clients).push(HandedOffClient {
                            info,
                            fd: OwnedFd::from(s),
                            private: saved,
                            pending,
                        });
                    }
                    Err(e) => warn!(server = %self.name, "cannot hand off client: {e}"),
                }
            } else {
                // Marked under the table's lock first: a snapshot listing clients holds
                // that lock, so the fd it lists stays open until the keeper has stored it,
                // and no later snapshot lists it (`store_view`). The entry itself stays
                // until the close hook has run (a quit waits for an empty table).
                if let Some(e) = lock_table(&self.clients).get_mut(&id) {
                    e.closing = true;
                }
                crate::fdstore_keeper::closing(stream.as_raw_fd());
                drop(stream);
                info!("{}: client closed", who(&self.name, &info));
                self.hooks.client_closed(&info, private);
            }
            // Only now, once a handed-off client is in `handed_off_clients`: a re-exec
            // takes that list as soon as no client is left here, and must not miss it.
            lock_table(&self.clients).remove(&id);
            if outcome != RunState::Handoff {
                crate::fdstore_keeper::touch_soon();
            }
            self.changed.notify_waiters();
        }
    }

    /// Records the client's private state for the next fd store snapshot; a change
    /// (an owner registered) makes one due.
    fn save_for_store(&self, info: &ClientInfo, private: &Private) {
        let Ok(saved) = self.hooks.save_private(private) else {
            return;
        };
        if let Some(e) = lock_table(&self.clients).get_mut(&info.id) {
            if e.saved != saved {
                e.saved = saved;
                crate::fdstore_keeper::touch();
            }
        }
    }

    /// Dispatches one message and queues what it produces (`Done(false)`: close once
    /// that is sent), or hands back a deferred call's work for the caller to await and
    /// pass to [`Self::finish_call`].
    fn begin_call(
        self: &Arc<Self>,
        info: &ClientInfo,
        private: &mut Private,
        msg: Incoming,
        out: &mut Outbox,
    ) -> CallStep {
        let h = msg.header;
        // 1. Keepalive is consumed before dispatch, and only as type MESSAGE.
        if h.prog == protocol::KEEPALIVE_PROGRAM
            && h.vers == protocol::KEEPALIVE_VERSION
            && h.type_ == msg_type::MESSAGE
        {
            if h.proc_ == protocol::KEEPALIVE_PING {
                out.push(protocol::pong_frame(), Vec::new());
            }
            return CallStep::Done(true);
        }
        let is_call = h.type_ == msg_type::CALL || h.type_ == msg_type::CALL_WITH_FDS;
        // 2. Find the program.
        let program = self.programs.read().ok().and_then(|v| {
            v.iter()
                .find(|p| p.program() == h.prog && p.version() == h.vers)
                .cloned()
        });
        let Some(program) = program else {
            if is_call {
                let e = RpcError::rpc(format!(
                    "Cannot find program {} version {}",
                    h.prog as i32, h.vers as i32
                ));
                self.call_refused(info, &e);
                out.push(protocol::encode_error_frame(&h, &e), Vec::new());
            } else {
                info!(
                    "{}: dropping message, unknown program {} version {} type {} proc {}",
                    who(&self.name, info),
                    h.prog as i32,
                    h.vers as i32,
                    h.type_,
                    h.proc_
                );
            }
            return CallStep::Done(true);
        };
        // 3. Only calls are answered; anything else is dropped without a word (but
        // logged, as 9.0 does; it ignores stream data quietly).
        if !is_call {
            if h.type_ != msg_type::STREAM {
                self.violation_kept(info, &format!("Unexpected message type {}", h.type_));
            }
            return CallStep::Done(true);
        }
        // 4. Status must be OK.
        if h.status != status::OK {
            // libvirt prints the status with %u.
            let e = RpcError::rpc(format!("Unexpected message status {}", h.status as u32));
            self.call_refused(info, &e);
            out.push(protocol::encode_error_frame(&h, &e), Vec::new());
            return CallStep::Done(true);
        }
        let mut ctx = CallContext {
            server: self,
            client: info,
            private,
            fds: msg.fds,
            close_after_reply: false,
        };
        let res = program.dispatch_deferred(&mut ctx, h.proc_, &msg.body[msg.payload_offset..]);
        let close_after = ctx.close_after_reply;
        drop(ctx); // unused call fds are closed here, as libvirt does
        let res = match res {
            Dispatched::Now(r) => r,
            Dispatched::Later(work) => {
                return CallStep::Later(LaterCall {
                    work,
                    header: h,
                    close_after,
                })
            }
        };
        CallStep::Done(self.finish_call(info, &h, close_after, res, out))
    }

    /// Queues a dispatched call's reply (or error). `false`: close once that is sent.
    fn finish_call(
        &self,
        info: &ClientInfo,
        h: &Header,
        close_after: bool,
        res: Result<Reply, DispatchError>,
        out: &mut Outbox,
    ) -> bool {
        // A quit that began meanwhile (a signal, or this very call: admin
        // CONNECT_DAEMON_SHUTDOWN) closes the client without the reply, as 11.3 drops
        // every queued reply when it closes its clients.
        if *self.run.borrow() == RunState::Quit {
            return false;
        }
        match res {
            Ok(reply) => {
                let with_fds = !reply.fds.is_empty();
                let frame = protocol::encode_frame(
                    &h.reply(with_fds, status::OK),
                    with_fds.then_some(reply.fds.len() as u32),
                    &reply.payload,
                );
                out.push(frame, reply.fds);
            }
            Err(err) => {
                let e = match err {
                    DispatchError::UnknownProcedure => {
                        let e = RpcError::rpc(format!("unknown procedure: {}", h.proc_));
                        self.call_refused(info, &e);
                        e
                    }
                    DispatchError::Decode(x) => {
                        debug!(server = %self.name, "undecodable payload: {x}");
                        let e = RpcError::rpc("Unable to decode message payload");
                        self.call_refused(info, &e);
                        e
                    }
                    DispatchError::Failed(e) => {
                        // A procedure's own refusal (a lease held elsewhere, a log
                        // already open) is the caller's business, not a fault of ours:
                        // info, where 9.0 logs every reported error at error level.
                        let msg = e.message.as_deref().unwrap_or("(no message)");
                        info!("{}: call failed: {msg}", who(&self.name, info));
                        e
                    }
                };
                // A text over the XDR string limit (an over-long path echoed back) cannot
                // be encoded: libvirt then closes the connection without a reply.
                let too_long = [&e.message, &e.str1, &e.str2, &e.str3]
                    .iter()
                    .any(|s| s.as_ref().is_some_and(|s| s.len() > MESSAGE_STRING_MAX));
                if too_long {
                    debug!(server = %self.name, client = info.id, "error reply too long; closing");
                    return false;
                }
                out.push(protocol::encode_error_frame(h, &e), Vec::new());
            }
        }
        !close_after
    }
}

impl Server {
    /// A protocol violation that closes the connection: logged at error level with the
    /// client's identity (9.0 logs each one at error level, without the identity).
    fn violation(&self, info: &ClientInfo, why: &str) {
        error!("{}: protocol error, closing: {why}", who(&self.name, info));
    }

    /// A protocol violation that is ignored (the connection stays).
    fn violation_kept(&self, info: &ClientInfo, why: &str) {
        error!("{}: protocol error, ignored: {why}", who(&self.name, info));
    }

    /// A call refused by the RPC layer (unknown program or procedure, bad status,
    /// undecodable arguments): logged at error level, as 9.0 does.
    fn call_refused(&self, info: &ClientInfo, e: &RpcError) {
        let msg = e.message.as_deref().unwrap_or("(no message)");
        error!("{}: {msg}", who(&self.name, info));
    }
}

/// "virtlogd client 3 (pid 1234, uid 0)": who a log line is about.
fn who(server: &str, info: &ClientInfo) -> String {
    format!(
        "{server} client {} (pid {}, uid {})",
        info.id, info.pid, info.uid
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Records which client each call came from, in the order they were dispatched.
    struct Recorder(Arc<Mutex<Vec<u64>>>);
    const PROG: u32 = 0x7e57;

    impl Program for Recorder {
        fn program(&self) -> u32 {
            PROG
        }
        fn version(&self) -> u32 {
            1
        }
        fn dispatch(
            &self,
            ctx: &mut CallContext<'_>,
            _proc: i32,
            _args: &[u8],
        ) -> Result<Reply, DispatchError> {
            if let Ok(mut v) = self.0.lock() {
                v.push(ctx.client.id);
            }
            Ok(Reply::void())
        }
    }

    fn call(serial: u32) -> Vec<u8> {
        let h = protocol::Header {
            prog: PROG,
            vers: 1,
            proc_: 1,
            type_: msg_type::CALL,
            serial,
            status: status::OK,
        };
        protocol::encode_frame(&h, None, &[])
    }

    /// 9.0 counts only clients waiting for authentication against
    /// `nclients_unauth_max`, and 0 means no limit: with auth NONE neither that limit
    /// nor `--max-unauth-clients 0` keeps anyone out (it used to count every client).
    #[test]
    fn unauth_limit_counts_only_unauthenticated_clients() {
        let l = |max_clients, max_unauth| ClientLimits {
            max_clients,
            max_unauth,
        };
        assert!(l(10, 0).admits(5, 0));
        assert!(l(10, 1).admits(5, 0));
        assert!(l(10, 10).admits(9, 0));
        assert!(!l(10, 10).admits(10, 0));
        assert!(!l(0, 0).admits(0, 0));
        assert!(!l(10, 2).admits(5, 2));
        assert!(l(10, 0).admits(5, 7));
    }

    /// A client with many calls queued must not keep the loop to itself: one that sent a
    /// single call at the same time is served after at most a couple of the other's.
    /// (Without the yield after each call, all 50 came first.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_pipelining_client_does_not_starve_others() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (_tx, rx) = watch::channel(RunState::Running);
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let limits = ClientLimits {
            max_clients: 10,
            max_unauth: 10,
        };
        let server = Server::new("test", uid, limits, Arc::new(NoHooks), rx);
        server.add_program(Arc::new(Recorder(order.clone())));

        let (mut busy, busy_srv) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut one, one_srv) = std::os::unix::net::UnixStream::pair().unwrap();
        let burst: Vec<u8> = (0..50).flat_map(call).collect();
        busy.write_all(&burst).unwrap();
        one.write_all(&call(0)).unwrap();
        let none = serde_json::json!({});
        server
            .adopt_client(busy_srv.into(), 1, 0, &none, PendingIo::default())
            .unwrap();
        server
            .adopt_client(one_srv.into(), 2, 0, &none, PendingIo::default())
            .unwrap();

        for _ in 0..10_000 {
            if order.lock().unwrap().len() == 51 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 51, "every call dispatched");
        let pos = order.iter().position(|&id| id == 2).unwrap();
        assert!(
            pos <= 2,
            "the lone call came after {pos} of the burst's: {order:?}"
        );
    }
}
