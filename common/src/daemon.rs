//! The daemon front-end both binaries share: command line, config, logging, pid file,
//! sockets (systemd activation or self-bound), signals, `--timeout`, and the SIGUSR1
//! re-exec with its state file.
//!
//! Re-exec keeps the pid and every fd that matters. It is one code path in both
//! directions: the state document we would hand to a new image is also what we restore
//! from when the exec fails, so a failed upgrade leaves the daemon serving with
//! everything it held (libvirt 9.0 exits and loses all locks there).
//!
//! A reload must be harmless at any moment, also while an image is starting, when a
//! caught signal's handler is gone (execve resets it to the default action: terminate):
//! * the old image sets SIGUSR1 to *ignored* (which survives execve) and unblocks it
//!   in the thread that execs, just before `execve`. Ignored rather than blocked,
//!   because libvirt 9.0 never unblocks SIGUSR1 (its `sigaction` replaces SIG_IGN,
//!   but a blocked mask would leave a C next image deaf to every later reload);
//! * our image blocks SIGUSR1 as the first thing in `main`, before any thread exists
//!   (so every thread inherits it), and unblocks it in the main thread only once it
//!   serves and can re-exec again. A reload sent while it starts stays pending and
//!   becomes exactly one more re-exec once it is up: several coalesce into one, and
//!   each `systemctl reload` is followed by an exec that began after it was sent,
//!   which is what an operator racing a package upgrade expects. Only one arriving
//!   in the dynamic loader, before `main`, meets SIG_IGN and is dropped.

use crate::activation::{self, Activation};
use crate::cli::{self, CliAction, Options};
use crate::config::{self, DaemonConfig, DaemonKeys};
use crate::fdstore::{self, FdStore};
use crate::fdstore_keeper::{FdKind, Keeper, SnapshotSink};
use crate::logging::{self, LogHandle, LogInputs};
use crate::paths::{DaemonKind, DaemonPaths, Mode};
use crate::pidfile::PidFile;
use crate::restart::{
    self, ClientCarry, ClientState, DaemonState, ServerState, ServiceState, SocketState,
    ADMIN_SERVER,
};
use crate::server::{
    ClientHooks, ClientLimits, HandedOffClient, NoHooks, PendingIo, Program, RunState, Server,
    ServiceInfo, StoreHook,
};
use crate::stop_intent::{self, StopIntent};
use std::ffi::{CString, OsString};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// libvirt's `virDaemonErr` exit codes (in `vh-proto`, which the man pages come from).
pub use vh_proto::exit;

/// Listen backlog libvirt uses for its services.
const BACKLOG: i32 = 30;
/// How long a re-exec waits for tasks to park before giving up on stragglers. Client
/// tasks park as soon as they see the hand-off (they carry their half-done I/O), so
/// this is only a guard against a handler that never returns.
const HANDOFF_WAIT: Duration = Duration::from_secs(5);
/// Graceful-quit guard, as libvirt's (11.3 also asks systemd for this much stop time).
const QUIT_WAIT: Duration = Duration::from_secs(30);
/// Bound on [`App::force_stop`] (an owner kill takes up to 3 s; they run at once).
const FORCE_STOP_WAIT: Duration = Duration::from_secs(10);

/// Everything the daemon-specific part (virtlogd, virtlockd) needs from the front-end.
pub struct Daemon {
    pub kind: DaemonKind,
    pub mode: Mode,
    pub paths: DaemonPaths,
    /// The keys both daemons read (the app's own keys went to [`App::new`]).
    pub config: DaemonConfig,
    pub options: Options,
    /// Run-time control of the daemon's own logging (admin program).
    pub log: LogHandle,
    pub main: Arc<Server>,
    pub admin: Arc<Server>,
    run_tx: watch::Sender<RunState>,
    timeout: AtomicU32,
    timeout_changed: tokio::sync::Notify,
    /// A quit asked for from inside (admin CONNECT_DAEMON_SHUTDOWN).
    quit_requested: tokio::sync::Notify,
    /// The quit has begun (servers told to close); set once.
    quitting: AtomicBool,
    /// Keeps systemd's fd store current, when it is on.
    keeper: std::sync::OnceLock<Arc<Keeper>>,
}

impl Daemon {
    /// Current `--timeout` (admin SET_DAEMON_TIMEOUT changes it).
    pub fn timeout(&self) -> u32 {
        self.timeout.load(Ordering::Relaxed)
    }

    pub fn set_timeout(&self, secs: u32) {
        self.timeout.store(secs, Ordering::Relaxed);
        // Wake the main loop so a new timeout is armed at once, as in 9.0.
        self.timeout_changed.notify_one();
    }

    /// Starts a quit as a signal would (admin CONNECT_DAEMON_SHUTDOWN). The servers
    /// close at once, before the call that asked returns, so that call gets no reply:
    /// 11.3 closes every client, dropping the queued reply, in the same loop iteration.
    pub fn request_quit(&self) {
        self.begin_quit();
        self.quit_requested.notify_one();
    }

    /// 11.3's first quit step: `STOPPING=1`, then every listener and client closes.
    fn begin_quit(&self) {
        if self.quitting.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = activation::notify_stopping() {
            warn!("cannot notify systemd: {e}");
        }
        let _ = self.run_tx.send(RunState::Quit);
    }

    pub fn run_state(&self) -> watch::Receiver<RunState> {
        self.run_tx.subscribe()
    }

    pub fn servers(&self) -> [&Arc<Server>; 2] {
        [&self.admin, &self.main]
    }

    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers().into_iter().find(|s| s.name() == name)
    }

    /// The fd store's figures, when the daemon keeps one (`vhctl status`).
    pub fn fd_store(&self) -> Option<crate::fdstore_keeper::KeeperStats> {
        self.keeper.get().map(|k| k.stats())
    }
}

/// What a daemon binary plugs into the front-end.
pub trait App: Send + Sync + Sized + 'static {
    const KIND: DaemonKind;
    /// Serve everything from one thread. Right for virtlockd: each call is microseconds
    /// of work under one table lock, so extra threads only add hand-offs and lock
    /// contention, and one loop serves clients in arrival order (as 9.0 does).
    const SINGLE_THREADED: bool = false;
    /// The daemon's own config keys, declared and validated in its crate.
    type Keys: DaemonKeys + Send + 'static;

    /// Builds the daemon-specific state, before the servers exist.
    fn new(config: &DaemonConfig<Self::Keys>, mode: Mode, run: watch::Receiver<RunState>) -> Self;
    /// Hooks of the main server's clients.
    fn hooks(&self) -> Arc<dyn ClientHooks>;
    /// Programs served on the main server.
    fn programs(&self) -> Vec<Arc<dyn Program>>;
    /// Extra programs on the admin server (the admin program itself is added by the
    /// front-end's caller through this too).
    fn admin_programs(&self, daemon: &Arc<Daemon>) -> Vec<Arc<dyn Program>>;
    /// Whether something held should keep an idle daemon alive (`--timeout`).
    fn inhibits_shutdown(&self) -> bool;
    /// The ELF section that marks an image able to take this app's own hand-off (see
    /// `next_image`); `None`: every re-exec hands off as to libvirt's C daemon.
    const NEXT_IMAGE_MARKER: Option<crate::next_image::Marker> = None;
    /// A re-exec begins (before the servers park): whether the program it will run
    /// carries [`Self::NEXT_IMAGE_MARKER`]. A failed exec restores from the document
    /// this hand-off wrote, so whatever it named is adopted as the next image would.
    fn next_image_is_ours(&self, _ours: bool) {}
    /// After every server handed off: the full state document, as JSON text, and the
    /// fds it names that are still close-on-exec (fds the app keeps inheritable all
    /// along need not be listed).
    fn handoff(
        &self,
        daemon: DaemonState,
        magic: String,
    ) -> impl Future<Output = (String, Vec<RawFd>)> + Send;
    /// The whole state document, parsed.
    type State: Send + 'static;
    /// Parses a state document.
    fn parse_state(text: &str) -> Result<Self::State, restart::RestartError>;
    /// The document's `magic` (see [`restart::restart_magic`]).
    fn state_magic(state: &Self::State) -> &str;
    /// Restores the daemon-specific part of a document; returns its generic part.
    /// `in_place` is true after a failed exec: whatever `handoff` did not move out of
    /// the app is still live and must not be adopted a second time.
    fn restore(
        &self,
        state: Self::State,
        in_place: bool,
    ) -> Result<DaemonState, restart::RestoreError>;
    /// Clean stop: release what a stop releases.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
    /// With the fd store on, a SIGTERM for a restart leaves everything in the store (see
    /// `run`; a SIGTERM for a stop quits as without the store); this runs first, for
    /// what must not wait in the store without us (virtlogd drains its pipes into the
    /// files, so the bytes already written do not wait for the next start). It must
    /// close and release nothing.
    fn before_store_exit(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// After a resume from the fd store (a crash or a restart, not a re-exec) the
    /// dead process may have read a request it never answered: its caller would wait
    /// forever. Every client is therefore hung up, except those this returns `true`
    /// for (virtlockd keeps the restricted QEMU owner connections: hanging one up would
    /// kill its guest). `private` is the client's saved private state, `peer_pid` the
    /// connection's peer (`SO_PEERCRED`, 0 if unknown).
    fn keep_after_crash(
        &self,
        _server: &str,
        _private: &serde_json::Value,
        _peer_pid: i32,
    ) -> bool {
        false
    }
    /// A quit whose clients did not drain in time (a call stuck on storage): stop what
    /// must not outlive us anyway, bounded (virtlockd kills every registered owner,
    /// whose leases our exit frees). Runs instead of [`Self::shutdown`].
    fn force_stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// With the fd store on: builds the whole state document as [`Self::handoff`]
    /// would, without handing anything off, and calls `keep` with it and the fds the
    /// app's part names, while holding whatever keeps those fds open (see
    /// `fdstore_keeper`).
    fn snapshot(&self, daemon: DaemonState, magic: String, keep: &mut SnapshotSink<'_>);
}

/// Entry point of both binaries: returns the process exit code.
pub fn main<A: App>() -> i32 {
    // Before anything else (see the module doc): a reload arriving while we start
    // waits until we can act on it.
    hold_reloads();
    // Then, before this process opens any file: the fds systemd kept for us go back to
    // the numbers our last snapshot recorded (numbers above the soft limit need the
    // raised one).
    raise_nofile_limit();
    let resumed = match fdstore::take_stored() {
        Ok(r) => r,
        Err(e) => {
            return unreadable_store::<A>(&e);
        }
    };
    let args: Vec<OsString> = std::env::args_os().collect();
    name_after_fd_exec(&args);
    let opts = match cli::parse(A::KIND, &args) {
        Ok(CliAction::Run(o)) => o,
        Ok(CliAction::Exit {
            code,
            stdout,
            stderr,
        }) => {
            print!("{stdout}");
            eprint!("{stderr}");
            return code;
        }
        Err(e) => {
            eprintln!("{}: {e}", A::KIND.name());
            return e.exit_code();
        }
    };
    let mode = Mode::current();
    let paths = match DaemonPaths::current(A::KIND) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}: cannot determine paths: {e}", A::KIND.name());
            return exit::INIT;
        }
    };
    let (cfg_path, explicit) = match &opts.config {
        Some(p) => (p.clone(), true),
        None => (paths.config_file.clone(), false),
    };
    let config = match config::load::<A::Keys>(&cfg_path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", e.load_failure_message(&cfg_path));
            return 1;
        }
    };
    let inputs = LogInputs::from_process(
        A::KIND,
        mode,
        paths.default_log_file.clone(),
        &config,
        opts.verbose,
        opts.daemon,
    );
    let log = match logging::setup(&inputs) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{}: {e}", A::KIND.name());
            return 1;
        }
    };
    if let Err(e) = paths.create_run_dir() {
        error!("Unable to create rundir {}: {e}", paths.run_dir.display());
        return exit::RUNDIR;
    }
    let (state, resumed) = match resumed {
        // A crash or `systemctl restart`: the newest snapshot is a re-exec document
        // (its magic names the dead process, so it is not checked).
        Some(r) => {
            info!(
                "resuming from the fd store: {} fds, {} stale, {} missing",
                r.table.len(),
                r.stale.len(),
                r.missing.len()
            );
            for name in &r.missing {
                warn!("the fd store did not give back {name}; that item is lost");
            }
            match A::parse_state(&r.doc) {
                Ok(s) => (Some(s), Some((r.slots, r.table, r.stale))),
                Err(e) => {
                    error!("cannot parse the state in the fd store: {e}");
                    return unreadable_store::<A>(&e.to_string());
                }
            }
        }
        None => match take_state::<A>(&paths.state_file) {
            Ok(s) => (s, None),
            Err(code) => return code,
        },
    };
    // Daemonize only on a fresh start: after re-exec we already are the daemon.
    let mut status_pipe = None;
    if opts.daemon && state.is_none() {
        match daemonize(A::KIND) {
            Ok(p) => status_pipe = p,
            Err(e) => {
                error!("Failed to fork as daemon: {e}");
                return exit::INIT;
            }
        }
    }
    let pid_path = opts.pid_file.clone().unwrap_or(paths.pid_file.clone());
    let pidfile = match PidFile::acquire(&pid_path) {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            report_status(&mut status_pipe, exit::PIDFILE as u8);
            return exit::PIDFILE;
        }
    };
    let mut builder = if A::SINGLE_THREADED {
        let mut b = tokio::runtime::Builder::new_current_thread();
        // Look for newly readable clients every 8 task polls instead of tokio's 61.
        // A client whose request arrives while the queue is long otherwise waits for
        // up to 61 other polls before it even joins the queue, behind clients served
        // again meanwhile: with 256 busy owners some got 20 % fewer turns, and p99 rose
        // to 1.7x p50. At 8 every owner gets the same share (as with 9.0's FIFO); an
        // epoll_wait(0) per 8 calls is noise next to a call's open/fcntl.
        b.event_interval(8);
        b
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)));
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start runtime: {e}");
            return exit::INIT;
        }
    };
    let code = rt.block_on(run::<A>(
        opts,
        mode,
        paths,
        config,
        log,
        (state, resumed),
        status_pipe,
    ));
    let _ = pidfile.release();
    if code == STORE_KEPT {
        // SIGTERM with the fd store on (see `run`): leave now, as a crash would, so
        // that dropping the runtime runs no close of anything the store keeps.
        std::process::exit(0);
    }
    code
}

/// How long a start that cannot read the fd store's document waits before it fails.
const UNREADABLE_STORE_PAUSE: Duration = Duration::from_secs(5);

/// A whole state document in the fd store that this build cannot read (a format change
/// across an upgrade, a damaged store). The store may hold the leases of running guests
/// and their owners' connections: starting fresh would drop them (another host could
/// then start the same disk), so the store is left untouched and the start fails
/// loudly, once per attempt, after a pause, so that `Restart=on-failure` retries every
/// few seconds rather than ten times a second (the units' `RestartSec=100ms` is meant
/// for crashes). Meanwhile every lease stays locked by the store's copies and QEMU's
/// pipes stay open. The way out is the operator's: install a build that reads the
/// document, or `systemctl stop` (which empties the store: owners then run without
/// their leases, as after a stop of 9.0 without its owner kill).
fn unreadable_store<A: App>(why: &str) -> i32 {
    eprintln!(
        "{}: cannot resume from the fd store: {why}; the store is kept as it is (it may hold leases of running guests); retrying in {} s",
        A::KIND.name(),
        UNREADABLE_STORE_PAUSE.as_secs()
    );
    std::thread::sleep(UNREADABLE_STORE_PAUSE);
    exit::INIT
}

/// `run`'s result for a SIGTERM with the fd store on (exit 0, without a drain).
const STORE_KEPT: i32 = -1;

/// What a resume from the fd store hands the keeper: the slots, name → number, and
/// stale names.
type StoreResume = (
    fdstore::StateSlots,
    std::collections::HashMap<String, RawFd>,
    Vec<String>,
);

/// Consumes the re-exec state file: the parsed state if it is meant for this process;
/// `None` without a file or for a stale one (a fresh start); the exit code, once logged,
/// for a document that cannot be restored. The document is parsed once, and its magic
/// checked on the result (with thousands of logs or leases every pass over the text is
/// downtime).
fn take_state<A: App>(path: &Path) -> Result<Option<A::State>, i32> {
    let text = match restart::read_state_file(path) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(None),
        Err(e) => {
            error!("cannot read re-exec state {}: {e}", path.display());
            return Err(exit::INIT);
        }
    };
    let parsed = A::parse_state(&text);
    let my_pid = std::process::id();
    // A document the parse refused is still only a stale file if its magic is another
    // process's (what libvirt checks first).
    let meant = match &parsed {
        Ok(state) => restart::magic_matches(Some(A::state_magic(state)), my_pid),
        Err(_) => {
            restart::scan_magic(&text).and_then(|m| restart::magic_matches(m.as_deref(), my_pid))
        }
    };
    match (meant, parsed) {
        (Err(e), _) => {
            error!("cannot read re-exec state {}: {e}", path.display());
            Err(exit::INIT)
        }
        (Ok(false), _) => Ok(None),
        (Ok(true), Ok(state)) => Ok(Some(state)),
        (Ok(true), Err(why)) => {
            error!("cannot restore re-exec state: {why}");
            Err(exit::INIT)
        }
    }
}

fn report_status(pipe: &mut Option<OwnedFd>, code: u8) {
    if let Some(fd) = pipe.take() {
        let _ = nix::unistd::write(&fd, &[code]);
    }
}

async fn run<A: App>(
    options: Options,
    mode: Mode,
    paths: DaemonPaths,
    config: DaemonConfig<A::Keys>,
    log: LogHandle,
    (state, resumed): (Option<A::State>, Option<StoreResume>),
    mut status_pipe: Option<OwnedFd>,
) -> i32 {
    let (run_tx, run_rx) = watch::channel(RunState::Running);
    let app = Arc::new(A::new(&config, mode, run_rx.clone()));
    let own_uid = nix::unistd::geteuid().as_raw();
    // System mode: only root may talk to us; session mode: only our own user.
    let main_uid = if mode.is_privileged() { 0 } else { own_uid };
    let main = Server::new(
        A::KIND.name(),
        main_uid,
        ClientLimits {
            max_clients: config.max_clients as usize,
            max_unauth: config.max_clients as usize,
        },
        app.hooks(),
        run_rx.clone(),
    );
    let admin = Server::new(
        ADMIN_SERVER,
        own_uid,
        ClientLimits {
            max_clients: config.admin_max_clients as usize,
            max_unauth: config.admin_max_clients as usize,
        },
        Arc::new(NoHooks),
        run_rx,
    );
    let daemon = Arc::new(Daemon {
        kind: A::KIND,
        mode,
        timeout: AtomicU32::new(options.timeout),
        timeout_changed: tokio::sync::Notify::new(),
        quit_requested: tokio::sync::Notify::new(),
        quitting: AtomicBool::new(false),
        paths,
        config: config.shared(),
        options,
        log,
        main,
        admin,
        run_tx,
        keeper: std::sync::OnceLock::new(),
    });
    // Handlers first, as libvirt does: the sockets serve as soon as they are adopted,
    // and a SIGUSR1 sent once a client got an answer must not meet the default action
    // (terminate) of a fresh image.
    let mut sigterm = signal(SignalKind::terminate());
    let mut sigint = signal(SignalKind::interrupt());
    let mut sigquit = signal(SignalKind::quit());
    let mut sigusr1 = signal(SignalKind::user_defined1());
    let (Ok(sigterm), Ok(sigint), Ok(sigquit), Ok(sigusr1)) =
        (&mut sigterm, &mut sigint, &mut sigquit, &mut sigusr1)
    else {
        error!("cannot install signal handlers");
        report_status(&mut status_pipe, exit::SIGNAL as u8);
        return exit::SIGNAL;
    };
    // Programs before any socket: adopted clients and listeners serve at once, and a
    // call must never meet a server without its program ("Cannot find program").
    for p in app.programs() {
        daemon.main.add_program(p);
    }
    for p in app.admin_programs(&daemon) {
        daemon.admin.add_program(p);
    }
    let restarted = state.is_some();
    // The store's hooks go in before any client exists (a restored client's private
    // state is saved as it is adopted).
    let from_store = resumed.is_some();
    let stale_ids = resumed
        .as_ref()
        .map(|r| crate::fdstore_keeper::stale_client_ids(&r.2))
        .unwrap_or_default();
    let keeper = start_keeper(&daemon, &app, resumed);
    let setup = match state {
        Some(state) => restore::<A>(&daemon, &app, state, false, &stale_ids, from_store),
        None => listen(&daemon),
    };
    // Nothing names the numbers of fds the store lost any more.
    fdstore::release_lost();
    if let Err((code, why)) = setup {
        error!("{why}");
        report_status(&mut status_pipe, code as u8);
        return code;
    }
    if restarted {
        info!("restarted in place from the re-exec state");
    }
    if let Some(k) = &keeper {
        // Everything is restored or set up: store it all before READY.
        k.go();
        commit(&daemon, &*app, k);
        info!("keeping {} fds in systemd's fd store", k.stats().stored);
    }
    // Everything is served and the SIGUSR1 stream is registered: a reload that came
    // while we started is delivered now and re-execs once more.
    accept_reloads();
    for server in daemon.servers() {
        for svc in server.services() {
            let path = svc.path.as_deref().unwrap_or(Path::new("(unnamed)"));
            info!("server {} listening on {}", server.name(), path.display());
        }
    }
    info!(
        "{} (libvirt {}) ready, pid {}, {} mode",
        A::KIND.name(),
        cli::LIBVIRT_VERSION,
        std::process::id(),
        if daemon.mode.is_privileged() {
            "system"
        } else {
            "session"
        }
    );
    report_status(&mut status_pipe, 0);
    let _ = activation::notify_ready();

    let mut idle_since: Option<Instant> = None;
    // A SIGTERM for a stop emptied the store (see below).
    let mut store_emptied = false;
    loop {
        let timeout = daemon.timeout();
        tokio::select! {
            _ = sigterm.recv() => {
                info!("SIGTERM received");
                if let Some(k) = &keeper {
                    // `systemctl restart` and `stop` both send SIGTERM; only a restart
                    // may leave everything in the store (the next start resumes from
                    // it). After a stop systemd 252 empties the store, which would free
                    // every lease under its still running owner: so ask systemd which
                    // job this is (see `stop_intent`), and for anything but a restart
                    // stop as without the store (owners killed, then leases released;
                    // pipes drained and closed), as libvirt 9.0 does.
                    let user = !daemon.mode.is_privileged();
                    let intent = tokio::task::spawn_blocking(move || stop_intent::query(user))
                        .await
                        .unwrap_or_else(|e| StopIntent::Stop(format!("job query failed: {e}")));
                    match intent {
                        StopIntent::Restart(why) => {
                            // The last snapshot, then leave without closing, releasing
                            // or killing anything: the store holds it all.
                            commit(&daemon, &*app, k);
                            app.before_store_exit().await;
                            commit(&daemon, &*app, k);
                            // At warning level (the default log_level shows it): the
                            // process leaves with every lease and pipe still held.
                            warn!("SIGTERM for a restart ({why}): leaving everything in the fd store");
                            return STORE_KEPT;
                        }
                        StopIntent::Stop(why) => {
                            // Take everything out of the store first: we still hold
                            // every lease and pipe ourselves, so nothing is freed
                            // before the owners are killed; from here on it is the stop
                            // without the store. Its exit code cannot bring us back
                            // with leases nobody serves: systemd never auto-restarts a
                            // unit whose stop job runs, a clean quit exits 0 (which
                            // `Restart=on-failure` leaves alone) and a forced one (1)
                            // after a plain kill restarts with the store empty.
                            // A failed removal is logged; a stop cannot be refused.
                            let _ = k.clear();
                            store_emptied = true;
                            warn!("SIGTERM for a stop ({why}): fd store emptied; stopping as without it (lease owners are killed, as libvirt 9.0 does)");
                        }
                    }
                }
                break
            }
            _ = sigint.recv() => { info!("SIGINT received"); break }
            _ = sigquit.recv() => { info!("SIGQUIT received"); break }
            _ = daemon.quit_requested.notified() => { info!("daemon-shutdown requested"); break }
            _ = daemon.timeout_changed.notified() => idle_since = None,
            _ = sigusr1.recv() => {
                info!("SIGUSR1: re-executing in place");
                reexec::<A>(&daemon, &app).await;
                // Only reached when the exec failed and we restored ourselves.
                continue;
            }
            // A cheap 1 s tick, only while an idle timeout is set.
            _ = tokio::time::sleep(Duration::from_secs(1)), if timeout > 0 => {
                let idle = daemon.main.nclients() == 0
                    && daemon.admin.nclients() == 0
                    && !app.inhibits_shutdown();
                match (idle, idle_since) {
                    (false, _) => idle_since = None,
                    (true, None) => idle_since = Some(Instant::now()),
                    (true, Some(t)) if t.elapsed() >= Duration::from_secs(u64::from(timeout)) => {
                        info!("idle for {timeout}s; exiting");
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    quit::<A>(&daemon, &app, store_emptied).await
}

/// 11.3's quit: `STOPPING=1`, servers closed, `EXTEND_TIMEOUT_USEC` for the wait, the
/// wait, then the app's own stop.
///
/// `store_emptied`: a SIGTERM for a stop took everything out of the fd store. A forced
/// quit then still stops the owners ([`App::force_stop`]) and exits 0: exit 1 would
/// make `Restart=on-failure` start a fresh daemon (after a plain `kill`, with no stop
/// job running) that knows nothing of the leases just freed.
async fn quit<A: App>(daemon: &Arc<Daemon>, app: &A, store_emptied: bool) -> i32 {
    info!("shutting down");
    daemon.begin_quit();
    if let Err(e) = activation::notify_extend_timeout(QUIT_WAIT.as_secs()) {
        warn!("cannot notify systemd: {e}");
    }
    if !servers_drained(daemon, QUIT_WAIT).await {
        error!("Make forcefull daemon shutdown");
        if let Err(e) = activation::notify_extend_timeout(FORCE_STOP_WAIT.as_secs()) {
            warn!("cannot notify systemd: {e}");
        }
        if tokio::time::timeout(FORCE_STOP_WAIT, app.force_stop())
            .await
            .is_err()
        {
            error!(
                "forced stop did not finish in {} s",
                FORCE_STOP_WAIT.as_secs()
            );
        }
        return if store_emptied { 0 } else { 1 };
    }
    app.shutdown().await;
    0
}

/// Binds our own sockets, or claims the ones systemd passed.
fn listen(daemon: &Arc<Daemon>) -> Result<(), (i32, String)> {
    let kind = daemon.kind;
    match Activation::from_env() {
        Ok(Some(mut act)) => {
            for (server, name) in [
                (&daemon.main, kind.socket_fd_name()),
                (&daemon.admin, kind.admin_socket_fd_name()),
            ] {
                for fd in act.claim(name) {
                    let _ = nix::sys::socket::listen(
                        &fd,
                        nix::sys::socket::Backlog::new(BACKLOG)
                            .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
                    );
                    let path = socket_path(fd.as_raw_fd());
                    server
                        .adopt_service(
                            fd,
                            ServiceInfo {
                                path,
                                unlink_on_stop: false,
                            },
                        )
                        .map_err(|e| {
                            (exit::NETWORK, format!("cannot use activated socket: {e}"))
                        })?;
                }
            }
            act.complete().map_err(|e| (exit::NETWORK, e.to_string()))?;
            Ok(())
        }
        Ok(None) => {
            for (server, path) in [
                (&daemon.main, &daemon.paths.socket),
                (&daemon.admin, &daemon.paths.admin_socket),
            ] {
                serve_own_socket(server, path)?;
            }
            Ok(())
        }
        Err(e) => Err((e.exit_code(), e.to_string())),
    }
}

/// The filesystem path a unix socket is bound to, if any.
fn socket_path(fd: RawFd) -> Option<std::path::PathBuf> {
    let addr: nix::sys::socket::UnixAddr = nix::sys::socket::getsockname(fd).ok()?;
    addr.path().map(|p| p.to_path_buf())
}

/// Binds `path` ourselves (no socket from systemd, or none left) and serves it, unlinked
/// again on stop; errors carry libvirt's exit code for a socket failure.
fn serve_own_socket(server: &Arc<Server>, path: &Path) -> Result<(), (i32, String)> {
    let fd = bind_socket(path).map_err(|e| {
        (
            exit::NETWORK,
            format!("Failed to bind socket to '{}': {e}", path.display()),
        )
    })?;
    server
        .adopt_service(
            fd,
            ServiceInfo {
                path: Some(path.to_path_buf()),
                unlink_on_stop: true,
            },
        )
        .map_err(|e| (exit::NETWORK, e.to_string()))
}

/// Binds a listening unix socket the way libvirt does: stale file removed, mode 0700,
/// backlog 30.
pub fn bind_socket(path: &Path) -> io::Result<OwnedFd> {
    use nix::sys::socket::{bind, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use nix::sys::stat::{umask, Mode as FMode};
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    // The umask is process-wide; nothing else creates files while we start up.
    let old = umask(FMode::from_bits_truncate(0o077));
    let r = bind(fd.as_raw_fd(), &addr);
    umask(old);
    r?;
    nix::sys::socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// Rebuilds servers, services and clients from a state document (after re-exec, or
/// after a failed exec, from the document that was meant for the new image).
fn restore<A: App>(
    daemon: &Arc<Daemon>,
    app: &A,
    state: A::State,
    in_place: bool,
    stale_ids: &std::collections::HashMap<String, u64>,
    after_crash: bool,
) -> Result<(), (i32, String)> {
    let mut hung_up = 0usize;
    let mut lost_listener = std::collections::HashSet::new();
    let _claims = FdClaims::begin();
    let state = app
        .restore(state, in_place)
        .map_err(|e| (exit::INIT, format!("cannot restore re-exec state: {e}")))?;
    for (name, srv) in &state.servers {
        let Some(server) = daemon.server(name) else {
            warn!("re-exec state names an unknown server {name}");
            continue;
        };
        // Past the ids of stale stored clients too (`Keeper::start` removes those):
        // a new client under a stale client's name would be removed with it.
        let floor = stale_ids.get(name).map_or(0, |m| m.saturating_add(1));
        server.set_next_client_id(srv.next_client_id.max(floor));
        // The config file may have changed across the upgrade; the running limits win,
        // as in libvirt (they are part of the state).
        server.set_limits(ClientLimits {
            max_clients: srv.max_clients as usize,
            max_unauth: srv.max_anonymous_clients as usize,
        });
        for svc in &srv.services {
            for sock in &svc.socks {
                let fd = match adopt_fd(sock.fd) {
                    Ok(fd) => fd,
                    // Lost from the fd store: bound afresh below. Failing the start
                    // instead would fail every restart the same way.
                    Err(e) if fdstore::is_lost(sock.fd) => {
                        error!(server = name.as_str(), "inherited socket {}: {e}", sock.fd);
                        lost_listener.insert(name.clone());
                        continue;
                    }
                    Err(e) => {
                        return Err((exit::INIT, format!("inherited socket {}: {e}", sock.fd)))
                    }
                };
                let path = socket_path(fd.as_raw_fd());
                server
                    .adopt_service(
                        fd,
                        ServiceInfo {
                            path,
                            unlink_on_stop: sock.unlink_unix,
                        },
                    )
                    .map_err(|e| (exit::INIT, e.to_string()))?;
            }
        }
        for c in &srv.clients {
            let fd = match adopt_fd(c.sock.fd) {
                Ok(fd) => fd,
                Err(e) => {
                    error!(
                        server = name.as_str(),
                        client = c.id,
                        "inherited client socket {}: {e}; client not restored",
                        c.sock.fd
                    );
                    continue;
                }
            };
            let peer_pid =
                nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
                    .map_or(0, |cr| cr.pid());
            let pending = match &c.carry {
                Some(carry) => match take_carry(carry) {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(client = c.id, "cannot resume half-done I/O: {e}");
                        PendingIo::default()
                    }
                },
                None => PendingIo::default(),
            };
            // One bad client loses only itself (libvirt fails the whole restore).
            if let Err(e) = server.adopt_client(fd, c.id, c.conn_time, &c.private_data, pending) {
                warn!(
                    server = name.as_str(),
                    client = c.id,
                    "cannot restore client: {e}"
                );
                continue;
            }
            // Closed through the client's own loop, so its hang-up runs as for any
            // other (a registered owner's leases released and the owner stopped).
            if after_crash && !app.keep_after_crash(name, &c.private_data, peer_pid) {
                server.close_client(c.id);
                hung_up += 1;
            }
        }
    }
    // A server whose listener was lost from the fd store and that has none left binds
    // its own path again, as a start without socket activation does.
    for (server, path) in [
        (&daemon.main, &daemon.paths.socket),
        (&daemon.admin, &daemon.paths.admin_socket),
    ] {
        if !lost_listener.contains(server.name()) || !server.services().is_empty() {
            continue;
        }
        warn!(
            server = server.name(),
            "no listener restored; binding {}",
            path.display()
        );
        serve_own_socket(server, path)?;
    }
    if hung_up > 0 {
        warn!("resumed from the fd store: hung up {hung_up} clients whose requests the previous process may have read without answering");
    }
    Ok(())
}

thread_local! {
    /// The fd numbers adopted so far by the restore running on this thread (a restore
    /// is synchronous, on one thread); `None` outside a restore.
    static CLAIMED: std::cell::RefCell<Option<FdSet>> =
        const { std::cell::RefCell::new(None) };
}

/// A set of fd numbers, as a bitmap (10,000 inherited fds: a few KiB and no hashing in
/// the re-exec pause). Only numbers of fds found open are recorded, so it is bounded by
/// the fd table's size.
#[derive(Default)]
struct FdSet(Vec<u64>);

impl FdSet {
    /// Records `fd`; false if it was recorded already (or is negative, which no open fd
    /// is).
    fn insert(&mut self, fd: RawFd) -> bool {
        let Ok(i) = usize::try_from(fd) else {
            return false;
        };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }
}

/// While alive, every fd adopted on this thread is recorded and a second claim of the
/// same number is refused. A state document is input: one that names an fd twice (two
/// clients, a client and a lock file, two log pipes...) must not give that fd two
/// owners, which would close it twice, the second time perhaps as someone else's fd.
pub struct FdClaims(());

impl FdClaims {
    pub fn begin() -> FdClaims {
        CLAIMED.with(|c| *c.borrow_mut() = Some(FdSet::default()));
        FdClaims(())
    }
}

impl Drop for FdClaims {
    fn drop(&mut self) {
        CLAIMED.with(|c| *c.borrow_mut() = None);
    }
}

/// Records a claim of `fd` in the current [`FdClaims`], refusing a repeated one.
fn claim(fd: RawFd) -> io::Result<()> {
    CLAIMED.with(|c| {
        let fresh = match c.borrow_mut().as_mut() {
            Some(set) => set.insert(fd),
            None => true,
        };
        if fresh {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "fd {fd} is claimed twice in the state document; refusing the second claim"
            )))
        }
    })
}

/// Takes ownership of an inherited fd number, checking it is open and not already
/// adopted in this restore ([`FdClaims`]), and marks it close-on-exec again.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    if fdstore::is_lost(fd) {
        return Err(io::Error::other("its fd was lost from the fd store"));
    }
    // Fails with EBADF when the fd is not open.
    restart::set_cloexec(fd)?;
    claim(fd)?;
    // SAFETY: the fd is open (F_SETFD succeeded), was handed to this image through the
    // state document, and `claim` refuses a number adopted before in this restore;
    // nothing else in this process owns it, so it is ours to own and close.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of inherited fds that are to stay inheritable (an app that keeps
/// them so all along, as virtlogd does its log pipes). One poll(2) tells which are
/// open, rather than a syscall per fd; an fd named twice is refused the second time.
pub fn adopt_inheritable_fds(fds: &[RawFd]) -> Vec<io::Result<OwnedFd>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        })
        .collect();
    // SAFETY: `polled` is an exclusively borrowed array of exactly `polled.len()`
    // pollfd structs, which poll(2) only writes the `revents` of; a zero timeout
    // never blocks.
    let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
    let open = |p: &libc::pollfd| {
        if n >= 0 {
            p.revents & libc::POLLNVAL == 0
        } else {
            // More fds than RLIMIT_NOFILE (EINVAL) or no memory: ask one by one.
            nix::fcntl::fcntl(p.fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
        }
    };
    let mut seen = FdSet::default();
    polled
        .iter()
        .map(|p| {
            // poll(2) skips negative fds without a word.
            if p.fd < 0 || !open(p) {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            if fdstore::is_lost(p.fd) {
                return Err(io::Error::other("its fd was lost from the fd store"));
            }
            if !seen.insert(p.fd) {
                return Err(io::Error::other(format!("fd {} named twice", p.fd)));
            }
            claim(p.fd)?;
            // SAFETY: the fd is open (poll did not flag it POLLNVAL), was handed to
            // this image through the state document, and neither this call nor the
            // restore's other claims adopted it before; nothing else in this process
            // owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(p.fd) })
        })
        .collect()
}

fn server_state(
    server: &Server,
    services: Vec<ServiceState>,
    clients: Vec<ClientState>,
) -> ServerState {
    let l = server.limits();
    ServerState {
        min_workers: 0,
        max_workers: 0,
        priority_workers: 0,
        max_clients: l.max_clients as u32,
        max_anonymous_clients: l.max_unauth.min(l.max_clients) as u32,
        keepalive_interval: -1,
        keepalive_count: 0,
        next_client_id: server.next_client_id(),
        services,
        clients,
    }
}

/// Waits until every listener and client task of both servers has ended.
async fn servers_drained(daemon: &Daemon, within: Duration) -> bool {
    let both = async {
        daemon.main.drained().await;
        daemon.admin.drained().await;
    };
    tokio::time::timeout(within, both).await.is_ok()
}

/// Starts keeping the fd store when it is on: the keeper, the servers' hooks and the
/// background snapshot task (changes no reply waits for). Snapshots start with
/// [`Keeper::go`].
fn start_keeper<A: App>(
    daemon: &Arc<Daemon>,
    app: &Arc<A>,
    resumed: Option<StoreResume>,
) -> Option<Arc<Keeper>> {
    let store = FdStore::from_env()?;
    let keeper = match Keeper::start(store, resumed) {
        Ok(k) => k,
        Err(e) => {
            error!("cannot start keeping the fd store: {e}; running without it");
            return None;
        }
    };
    let _ = daemon.keeper.set(keeper.clone());
    let hook: Arc<dyn StoreHook> = Arc::new(StoreCommit {
        daemon: Arc::downgrade(daemon),
        app: app.clone(),
        keeper: keeper.clone(),
    });
    for server in daemon.servers() {
        server.set_store_hook(hook.clone());
    }
    let (d, a, k) = (Arc::downgrade(daemon), app.clone(), keeper.clone());
    tokio::spawn(async move {
        loop {
            crate::fdstore_keeper::soon().await;
            let Some(d) = d.upgrade() else { return };
            commit(&d, &*a, &k);
        }
    });
    Some(keeper)
}

/// The servers' hook: a snapshot before each reply, if the call changed anything.
struct StoreCommit<A: App> {
    daemon: std::sync::Weak<Daemon>,
    app: Arc<A>,
    keeper: Arc<Keeper>,
}

impl<A: App> StoreHook for StoreCommit<A> {
    fn after_call(&self) {
        if let Some(d) = self.daemon.upgrade() {
            commit(&d, &*self.app, &self.keeper);
        }
    }
}

/// Writes an fd store snapshot if one is due: the live servers' part of the document
/// (listeners, clients with their saved private state), then the app's, stored and
/// written by the keeper under the app's locks.
fn commit<A: App>(daemon: &Daemon, app: &A, keeper: &Keeper) {
    if !keeper.due() {
        return;
    }
    let mut fds: Vec<(RawFd, FdKind)> = Vec::new();
    let mut servers = Vec::new();
    // Held until the keeper has written: no listed listener or client is closed (and
    // its number reused) before then.
    let mut views = Vec::new();
    for server in daemon.servers() {
        let name = server.name().to_string();
        let view = server.store_view();
        let services = view
            .listeners()
            .into_iter()
            .map(|(fd, unlink)| {
                fds.push((fd, FdKind::Listener(name.clone())));
                ServiceState {
                    auth: 0,
                    readonly: false,
                    nrequests_client_max: 1,
                    socks: vec![SocketState::listener(fd, unlink)],
                }
            })
            .collect();
        let mut clients: Vec<ClientState> = view
            .clients()
            .into_iter()
            .map(|c| {
                fds.push((c.info.fd, FdKind::Client(name.clone(), c.info.id)));
                ClientState {
                    id: c.info.id,
                    auth: 0,
                    auth_pending: false,
                    readonly: false,
                    nrequests_max: 1,
                    conn_time: c.info.conn_time,
                    sock: SocketState::connection(c.info.fd),
                    private_data: c.private,
                    carry: None,
                }
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        servers.push((name, server_state(server, services, clients)));
        views.push(view);
    }
    let magic = restart::restart_magic(std::process::id());
    app.snapshot(DaemonState { servers }, magic, &mut |app_fds, doc| {
        fds.extend_from_slice(app_fds);
        if let Err(e) = keeper.write(&fds, doc) {
            error!("cannot write the fd store snapshot: {e}");
        }
    });
    drop(views);
}

/// SIGUSR1: park everything, write the state, exec ourselves. Returns only if the exec
/// failed, after restoring the daemon from the same state.
async fn reexec<A: App>(daemon: &Arc<Daemon>, app: &A) {
    // Resolved and checked first: the app hands off more to its own next image. The
    // exec then runs this open file, not the path, which an upgrade may replace
    // meanwhile.
    let next = A::NEXT_IMAGE_MARKER
        .and_then(|m| crate::next_image::NextImage::probe(&exec_argv0(&daemon.options), m));
    app.next_image_is_ours(next.is_some());
    let _ = daemon.run_tx.send(RunState::Handoff);
    if !servers_drained(daemon, HANDOFF_WAIT).await {
        warn!("some clients did not park in time; handing off the rest");
    }
    let mut keep: Vec<RawFd> = Vec::new();
    let mut servers = Vec::new();
    for server in daemon.servers() {
        let (svcs, clients) = server.take_handed_off();
        let mut services = Vec::new();
        for s in svcs {
            let fd = s.fd.into_raw_fd();
            keep.push(fd);
            services.push(ServiceState {
                auth: 0,
                readonly: false,
                nrequests_client_max: 1,
                socks: vec![SocketState::listener(fd, s.info.unlink_on_stop)],
            });
        }
        let mut cs: Vec<ClientState> = clients
            .into_iter()
            .map(|c| client_state(c, &mut keep))
            .collect();
        cs.sort_by_key(|c| c.id);
        servers.push((
            server.name().to_string(),
            server_state(server, services, cs),
        ));
    }
    let magic = restart::restart_magic(std::process::id());
    let (text, app_fds) = app.handoff(DaemonState { servers }, magic).await;
    keep.extend(app_fds);
    for fd in &keep {
        if let Err(e) = restart::clear_cloexec(*fd) {
            warn!("cannot keep fd {fd} across exec: {e}");
        }
    }
    let err = match restart::write_state_file(&daemon.paths.state_file, &text) {
        Ok(()) => {
            // The next image may be libvirt's C daemon: nothing of ours may stay in the
            // store (a stored lease fd would keep its lock after C closes its copy).
            // Our next image stores everything again before READY.
            let cleared = match daemon.keeper.get() {
                Some(k) => k.clear(),
                None => Ok(()),
            };
            match cleared {
                Ok(()) => exec_self(&daemon.options, next.as_ref()),
                // A stored copy left behind would keep a lease locked after libvirt's
                // C daemon released it by closing its own fd: no exec then.
                Err(n) => io::Error::other(format!(
                    "{n} fds could not be removed from the fd store; not re-executing"
                )),
            }
        }
        Err(e) => io::Error::other(format!(
            "cannot write {}: {e}",
            daemon.paths.state_file.display()
        )),
    };
    // Still here: the exec failed. Keep serving with everything we hold.
    error!("Unable to restart self: {err}; staying up with all state");
    let _ = std::fs::remove_file(&daemon.paths.state_file);
    let _ = daemon.run_tx.send(RunState::Running);
    let restored = A::parse_state(&text)
        .map_err(|e| (exit::INIT, format!("cannot parse the state it wrote: {e}")))
        .and_then(|state| restore::<A>(daemon, app, state, true, &Default::default(), false));
    if let Err((_, why)) = restored {
        error!("restoring after a failed exec: {why}");
    }
    if let Some(k) = daemon.keeper.get() {
        k.resume_after_failed_exec();
        commit(daemon, app, k);
    }
}

/// One handed-off client's CLIENT object; every fd it names goes into `keep`.
fn client_state(c: HandedOffClient, keep: &mut Vec<RawFd>) -> ClientState {
    let id = c.info.id;
    let fd = c.fd.into_raw_fd();
    keep.push(fd);
    let carry = if c.pending.is_empty() {
        None
    } else {
        match put_carry(c.pending) {
            Ok(carry) => {
                keep.push(carry.fd);
                keep.extend(&carry.input_fds);
                keep.extend(&carry.output_fds);
                Some(carry)
            }
            Err(e) => {
                // Without it the next image would read the rest of a frame as a new
                // one; it closes the client then, as libvirt 9.0 would.
                error!(
                    client = id,
                    "cannot carry half-done I/O across re-exec: {e}"
                );
                None
            }
        }
    };
    ClientState {
        id,
        auth: 0,
        auth_pending: false,
        readonly: false,
        nrequests_max: 1,
        conn_time: c.info.conn_time,
        sock: SocketState::connection(fd),
        private_data: c.private,
        carry,
    }
}

/// Writes a client's half-done I/O into a memory file for the next image.
fn put_carry(p: PendingIo) -> io::Result<ClientCarry> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::Write;
    let mem = memfd_create(c"virt-helpers-carry", MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(mem);
    file.write_all(&p.input)?;
    file.write_all(&p.output)?;
    let own = |fds: Vec<OwnedFd>| fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    Ok(ClientCarry {
        fd: file.into_raw_fd(),
        input: p.input.len() as u64,
        input_fds: own(p.input_fds),
        output: p.output.len() as u64,
        output_fds: own(p.output_fds),
    })
}

/// Reads back what [`put_carry`] wrote (the previous image's, or ours after a failed
/// exec), taking ownership of every fd it names.
fn take_carry(c: &ClientCarry) -> io::Result<PendingIo> {
    use std::os::unix::fs::FileExt;
    let adopt_all = |fds: &[RawFd]| fds.iter().map(|&fd| adopt_fd(fd)).collect();
    let input_fds: io::Result<Vec<OwnedFd>> = adopt_all(&c.input_fds);
    let output_fds: io::Result<Vec<OwnedFd>> = adopt_all(&c.output_fds);
    let file = std::fs::File::from(adopt_fd(c.fd)?);
    let len = |n: u64| usize::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidData));
    let mut input = vec![0u8; len(c.input)?];
    file.read_exact_at(&mut input, 0)?;
    let mut output = vec![0u8; len(c.output)?];
    file.read_exact_at(&mut output, c.input)?;
    Ok(PendingIo {
        input,
        input_fds: input_fds?,
        output,
        output_fds: output_fds?,
    })
}

/// Blocks SIGUSR1 in the calling thread, and so in every thread it starts later.
fn hold_reloads() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGUSR1);
    if let Err(e) = set.thread_block() {
        eprintln!("cannot block SIGUSR1 during start-up: {e}");
    }
}

/// Unblocks SIGUSR1 in the calling (main) thread; the runtime's threads keep it
/// blocked, so every reload is taken by the thread that also execs.
fn accept_reloads() {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGUSR1);
    if let Err(e) = set.thread_unblock() {
        error!("cannot unblock SIGUSR1: {e}");
    }
}

/// The program a re-exec runs: argv[0] as we were started.
fn exec_argv0(opts: &Options) -> OsString {
    if opts.argv0.is_empty() {
        std::env::args_os().next().unwrap_or_default()
    } else {
        opts.argv0.clone()
    }
}

/// `execvp(argv[0], argv)` with the original arguments: a PATH search when argv[0] has
/// no slash, exactly what libvirt does; or, when `next` is the file that search found
/// and checked as ours, that open file. Returns only on failure.
fn exec_self(opts: &Options, next: Option<&crate::next_image::NextImage>) -> io::Error {
    let args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = exec_argv0(opts);
    let to_c = |s: &std::ffi::OsStr| CString::new(s.as_bytes());
    let Ok(file) = to_c(&argv0) else {
        return io::Error::from_raw_os_error(libc::EINVAL);
    };
    let argv: Result<Vec<CString>, _> = args.iter().map(|a| to_c(a)).collect();
    let Ok(argv) = argv else {
        return io::Error::from_raw_os_error(libc::EINVAL);
    };
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    // Across execve a caught signal reverts to its default action (terminate) until
    // the next image installs a handler; an ignored one stays ignored. Unblocked in
    // this thread, whose mask the next image inherits: libvirt 9.0 never unblocks it.
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_IGN is not a handler function; the previous action is restored
    // as it was if the exec fails.
    let previous = unsafe { sigaction(Signal::SIGUSR1, &ignore) };
    let mut usr1 = SigSet::empty();
    usr1.add(Signal::SIGUSR1);
    let old_mask = usr1.thread_swap_mask(SigmaskHow::SIG_UNBLOCK);
    let err = match next {
        Some(image) => image.exec(&argv),
        None => match nix::unistd::execvp(&file, &argv) {
            Ok(never) => match never {},
            Err(e) => e.into(),
        },
    };
    if let Ok(mask) = old_mask {
        let _ = mask.thread_set_mask();
    }
    if let Ok(previous) = previous {
        // SAFETY: puts back exactly the action that was installed before (the
        // runtime's signal handler).
        let _ = unsafe { sigaction(Signal::SIGUSR1, &previous) };
    }
    err
}

/// After a re-exec through an fd (see `next_image`), kernels before 6.14 name the
/// process after the fd's number ("/dev/fd/N"): an all-digit name becomes the one an
/// `execvp(argv[0])` gives, the last component of argv[0] (what `pgrep`, `ps` and the
/// journal show). One prctl otherwise.
fn name_after_fd_exec(args: &[OsString]) {
    use nix::sys::prctl;
    let Ok(name) = prctl::get_name() else { return };
    let digits = name.to_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return;
    }
    let Some(argv0) = args.first() else { return };
    let base = argv0
        .as_bytes()
        .rsplit(|&b| b == b'/')
        .next()
        .unwrap_or_default();
    // The kernel keeps 15 bytes of a name.
    if let Ok(name) = CString::new(&base[..base.len().min(15)]) {
        let _ = prctl::set_name(&name);
    }
}

/// Soft RLIMIT_NOFILE up to the hard limit, as libvirt does at start.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// `-d`: double fork and setsid. The original process waits for the daemon's status
/// byte and exits with it; the daemon gets the write end of that pipe.
fn daemonize(kind: DaemonKind) -> io::Result<Option<OwnedFd>> {
    use nix::unistd::{fork, setsid, ForkResult};
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: called before the tokio runtime or any other thread exists, so the child
    // inherits a consistent single-threaded process.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(wr);
            let mut b = [1u8; 1];
            let n = nix::unistd::read(rd.as_raw_fd(), &mut b).unwrap_or(0);
            if n == 1 && b[0] == 0 {
                std::process::exit(0);
            }
            eprintln!(
                "{}: error: Unable to start. Check /var/log/messages or run without --daemon for more info.",
                kind.name()
            );
            std::process::exit(1);
        }
        ForkResult::Child => {}
    }
    drop(rd);
    setsid()?;
    // SAFETY: still single-threaded, as above.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    Ok(Some(wr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// An fd number named twice in a state document is adopted once: the second claim
    /// fails, whether it comes through `adopt_fd` or `adopt_inheritable_fds`.
    #[test]
    fn a_duplicated_fd_is_adopted_once() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (fa, fb) = (a.into_raw_fd(), b.into_raw_fd());
        let claims = FdClaims::begin();
        let first = adopt_fd(fa).unwrap();
        let again = adopt_fd(fa).unwrap_err();
        assert!(again.to_string().contains("claimed twice"), "{again}");
        // Across the two entry points too (a client socket named as a log pipe).
        let polled = adopt_inheritable_fds(&[fa, fb, fb]);
        assert!(
            polled[0].is_err(),
            "fd {fa} was adopted as a client already"
        );
        assert!(polled[1].is_ok());
        assert!(polled[2].is_err());
        drop(claims);
        drop(first);
        drop(polled);
    }

    /// A claim scope ends with the restore: later restores start afresh.
    #[test]
    fn claims_end_with_their_scope() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fa = a.into_raw_fd();
        let c = FdClaims::begin();
        let owned = adopt_fd(fa).unwrap();
        drop(c);
        let _c = FdClaims::begin();
        // Re-adopting the same number in a new restore is allowed (the old owner gives
        // it up first, as `into_raw_fd` does at hand-off).
        let raw = owned.into_raw_fd();
        let again = adopt_fd(raw).unwrap();
        drop(again);
    }
}
