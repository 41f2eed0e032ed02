//! virtlogd's part of the daemon front-end: the log handler behind the main server,
//! the `handler` section of the re-exec state, and the daily log cleaner's timer.

use crate::cleaner;
use crate::config::LogdKeys;
use crate::handler::{HandedOffLog, Limits, LogCounters, LogHandler, LogOwner};
use crate::program::LogProgram;
use crate::state::{
    LogFileState, LogFileStateRef, LogHandlerState, LogHandlerStateRef, LogdState, LogdStateRef,
    StateDocument,
};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info, warn};
use uuid::Uuid;
use vh_common::config::DaemonConfig;
use vh_common::daemon::{adopt_fd, adopt_inheritable_fds, App, Daemon};
use vh_common::fdstore_keeper::{FdKind, SnapshotSink};
use vh_common::paths::{DaemonKind, Mode};
use vh_common::restart::{compact_doc, restart_magic, DaemonState, RestartError, RestoreError};
use vh_common::server::{ClientHooks, NoHooks, Program, RunState};

pub struct LogDaemon {
    pub handler: Arc<LogHandler>,
    mode: Mode,
}

/// What marks an image that adopts the log files a re-exec hands over open (see
/// `vh_common::next_image`). Only a build of this daemon carries it: libvirt's C
/// virtlogd would keep every such fd open forever, unknown, and open its own files
/// beside them. The contents name the document key it reads, so an image that
/// changed what it expects there must change them too.
#[used]
#[link_section = ".vh_logd_adopts_files"]
static NEXT_IMAGE_MARKER_BYTES: [u8; 30] = *b"virt-helpers virtlogd vhLogFil";

const NEXT_IMAGE_MARKER: vh_common::next_image::Marker = vh_common::next_image::Marker {
    section: ".vh_logd_adopts_files",
    contents: &NEXT_IMAGE_MARKER_BYTES,
};

/// 11.3's cleaner timer: when `max_age_days` > 0, a pass 24 h after start and every
/// 24 h after that, each on a blocking thread (it walks and unlinks files).
fn schedule_cleaner(handler: &Arc<LogHandler>, config: &LogdKeys) {
    let settings = cleaner::Settings {
        max_age_days: config.max_age_days,
        max_backups: config.max_backups,
        log_root: config.log_root.clone(),
    };
    if !settings.enabled() {
        return;
    }
    let handler = Arc::downgrade(handler);
    tokio::spawn(async move {
        let first = tokio::time::Instant::now() + cleaner::PERIOD;
        let mut tick = tokio::time::interval_at(first, cleaner::PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(handler) = handler.upgrade() else {
                return;
            };
            let s = settings.clone();
            let pass = tokio::task::spawn_blocking(move || clean_once(&handler, &s));
            if let Err(e) = pass.await {
                warn!("log cleaner pass failed: {e}");
            }
        }
    });
}

/// One cleaner pass against the live table of open logs.
fn clean_once(handler: &LogHandler, settings: &cleaner::Settings) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let open = match handler.open_paths() {
        Ok(open) => open,
        // Which chains are open is unknown: delete nothing.
        Err(e) => return warn!("log cleaner pass skipped: {e}"),
    };
    // Per expired chain, with opens held off: only the open logs whose file name starts
    // with the chain's can be in it.
    let gate = |chain: &std::path::Path, delete: &mut dyn FnMut()| {
        handler.without_opens(|| {
            let name = chain.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let Ok(open) = handler.open_paths() else {
                return;
            };
            let candidates: Vec<PathBuf> = open
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.as_bytes().starts_with(name))
                })
                .collect();
            if !cleaner::open_chains(&candidates).contains(chain) {
                delete();
            }
        })
    };
    let report = cleaner::pass(settings, now, &open, &gate);
    for p in &report.deleted {
        info!(path = %p.display(), "log cleaner deleted");
    }
}

impl App for LogDaemon {
    const KIND: DaemonKind = DaemonKind::Logd;
    type Keys = LogdKeys;

    fn new(
        config: &DaemonConfig<LogdKeys>,
        mode: Mode,
        mut run: watch::Receiver<RunState>,
    ) -> Self {
        let config = &config.own;
        let handler = LogHandler::new(Limits {
            max_size: config.max_size,
            max_backups: config.max_backups,
        });
        // The pump's stop is started the moment a re-exec begins, in parallel with the
        // servers parking their clients, rather than at `handoff`.
        // Referenced, so that no linker drops the marker's section.
        std::hint::black_box(&NEXT_IMAGE_MARKER_BYTES);
        let h = handler.clone();
        tokio::spawn(async move {
            while run.changed().await.is_ok() {
                if *run.borrow() == RunState::Handoff {
                    h.handoff_begins();
                }
            }
        });
        schedule_cleaner(&handler, config);
        LogDaemon { handler, mode }
    }

    fn hooks(&self) -> Arc<dyn ClientHooks> {
        Arc::new(NoHooks)
    }

    fn programs(&self) -> Vec<Arc<dyn Program>> {
        vec![LogProgram::new(self.handler.clone())]
    }

    fn admin_programs(&self, daemon: &Arc<Daemon>) -> Vec<Arc<dyn Program>> {
        // libvirt's admin program, plus our inspect program (what the daemon holds),
        // which libvirt's clients never call.
        vec![
            vh_common::admin::admin_program(Arc::downgrade(daemon)),
            crate::inspect::InspectProgram::new(self.handler.clone()),
        ]
    }

    /// Only a session daemon counts open logs as a reason to stay up (9.0's rule; the
    /// system daemon relies on systemd ordering).
    fn inhibits_shutdown(&self) -> bool {
        self.mode == Mode::Session && self.handler.nfiles() > 0
    }

    const NEXT_IMAGE_MARKER: Option<vh_common::next_image::Marker> = Some(NEXT_IMAGE_MARKER);

    fn next_image_is_ours(&self, ours: bool) {
        self.handler.next_image_is_ours(ours);
    }

    async fn handoff(&self, daemon: DaemonState, magic: String) -> (String, Vec<RawFd>) {
        let mut handoff = self.handler.begin_handoff().await;
        // The pump's epoll set is named before it is handed back (its number is final).
        let pump = handoff.take_pump();
        let pumpfd = pump.fd();
        // Open refuses paths that are not UTF-8 (a JSON string cannot carry them); one
        // that got here all the same is left out rather than named lossily, which
        // would make the next image write to a different file. Our counters ride in a
        // key of their own, which libvirt 9.0 ignores: one row per file, in order.
        let views: Vec<_> = handoff.logs().collect();
        let mut files = Vec::with_capacity(views.len());
        let mut rows = Vec::with_capacity(views.len());
        // Into our own image only: each file, open (see `LogdState::log_files`).
        let mut open_files = Vec::with_capacity(views.len());
        for l in &views {
            let Some(path) = l.path.to_str() else {
                error!(path = ?l.path, "log path is not UTF-8; not handed over");
                continue;
            };
            files.push(LogFileStateRef {
                pipefd: l.pipe,
                path,
                driver: l.owner.driver(),
                domname: l.owner.domname(),
                domuuid: Uuid::from_bytes(l.owner.domuuid),
            });
            rows.push([l.counters.written, l.counters.dropped, l.counters.rotations]);
            open_files.push(l.file.unwrap_or(-1));
        }
        let log_files = handoff.keeps_files().then_some(open_files);
        let mut doc = LogdStateRef {
            daemon,
            magic,
            handler: LogHandlerStateRef { files, pumpfd },
            log_counters: Some(rows),
            log_files,
        };
        // Written while the pump thread takes the files out of the logs and closes them
        // (unless they go to our own image).
        let mut text = compact_doc(&doc);
        let epoll = pump.prepared().await;
        // Log pipes and files are never close-on-exec (see `LogFile::pipe`,
        // `rotating_file::open_entry`): no fds to clear. The epoll set is, and is kept
        // open (and inheritable) by the front-end.
        let keep = match (epoll, pumpfd) {
            (Some(fd), Some(n)) if fd.as_raw_fd() == n => vec![fd.into_raw_fd()],
            (_, Some(_)) => {
                // The pump did not hand it back (stuck): the document must not name
                // an fd this image does not give away.
                doc.handler.pumpfd = None;
                text = compact_doc(&doc);
                Vec::new()
            }
            _ => Vec::new(),
        };
        drop(doc);
        drop(views);
        handoff.release();
        (text, keep)
    }

    type State = LogdState;

    fn parse_state(text: &str) -> Result<LogdState, RestartError> {
        LogdState::parse(text)
    }

    fn state_magic(state: &LogdState) -> &str {
        &state.magic
    }

    /// The handler gave every log away at hand-off (and forgot, not closed, the files
    /// it named), so `in_place` changes nothing here.
    fn restore(&self, mut doc: LogdState, _in_place: bool) -> Result<DaemonState, RestoreError> {
        // Log pipes arrive inheritable and stay so (see `LogFile::pipe`).
        let mut fds: Vec<RawFd> = doc.handler.files.iter().map(|f| f.pipefd).collect();
        let npipes = fds.len();
        // Open files come only from our own image, re-executing (the document's magic is
        // this very process): a document in the fd store after a crash names the dead
        // process's numbers, which mean nothing here.
        let open_files = doc
            .log_files
            .take()
            .filter(|f| f.len() == npipes && doc.magic == restart_magic(std::process::id()));
        if let Some(f) = &open_files {
            fds.extend(f.iter().copied().filter(|&fd| fd >= 0));
        }
        // An image before the rows wrote an object keyed by path.
        let carried = doc
            .counters
            .as_ref()
            .and_then(|c| c.get("logs"))
            .and_then(|l| l.as_object());
        let rows = doc
            .log_counters
            .take()
            .filter(|r| r.len() == doc.handler.files.len())
            .map(Vec::into_iter);
        let mut rows = rows.into_iter().flatten();
        // Pipes and files in one pass (one poll(2) over all of them); a number named
        // twice is adopted once, as the first (pipe) it was named for.
        let mut polled = adopt_inheritable_fds(&fds).into_iter();
        let pipes: Vec<_> = polled.by_ref().take(npipes).collect();
        let mut adopted_files = polled;
        let mut files_of_logs = open_files.into_iter().flatten().map(move |fd| {
            if fd < 0 {
                return None;
            }
            match adopted_files.next() {
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => {
                    warn!("inherited log file {fd}: {e}; reopening it by path");
                    None
                }
                None => None,
            }
        });
        let fds = &fds[..npipes];
        // The previous pump's epoll set (ours only; see `LogHandlerState::pumpfd`),
        // adopted after the pipes: a number that is also a pipe's is not an epoll set.
        let epoll = doc.handler.pumpfd.and_then(|n| {
            if fds.contains(&n) {
                warn!("inherited log pump epoll fd {n} is also a log pipe; ignored");
                return None;
            }
            adopt_fd(n)
                .map_err(|e| warn!("inherited log pump epoll fd {n}: {e}"))
                .ok()
        });
        let mut logs = Vec::with_capacity(fds.len());
        for (f, pipe) in doc.handler.files.into_iter().zip(pipes) {
            let row = rows.next();
            let file = files_of_logs.next().flatten();
            let pipe = match pipe {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(path = %f.path, "inherited log pipe {}: {e}", f.pipefd);
                    continue;
                }
            };
            let counters = match row {
                Some([written, dropped, rotations]) => LogCounters {
                    written,
                    dropped,
                    rotations,
                },
                None => carried
                    .and_then(|c| c.get(&f.path))
                    .map(counters_from_json)
                    .unwrap_or_default(),
            };
            logs.push(HandedOffLog {
                counters,
                pipe,
                path: PathBuf::from(f.path),
                owner: LogOwner {
                    driver: f.driver,
                    domname: f.domname,
                    domuuid: *f.domuuid.as_bytes(),
                },
                file,
            });
        }
        // One unopenable log loses only itself (the pump reports it); 9.0 would fail the
        // whole restart.
        if let Err(e) = self.handler.restore(logs, epoll) {
            warn!("cannot restore logs: {e}");
        }
        Ok(doc.daemon)
    }

    async fn shutdown(&self) {
        let handler = self.handler.clone();
        let _ = tokio::task::spawn_blocking(move || handler.shutdown()).await;
    }

    /// Drains every pipe into its file and stops the pump; the logs stay in the table
    /// and their pipes open (the store keeps them for the next start). Spliced, so a
    /// SIGKILL meanwhile loses nothing either.
    async fn before_store_exit(&self) {
        let handler = self.handler.clone();
        let _ = tokio::task::spawn_blocking(move || handler.shutdown()).await;
    }

    /// The document `handoff` writes, from the live table: no pump epoll set (the
    /// next image after a crash starts its own), no carried I/O, and no counters: they
    /// change with every byte, so a snapshot's would be stale anyway, and they were
    /// half of each snapshot's cost (a crash restarts them from zero).
    fn snapshot(&self, daemon: DaemonState, magic: String, keep: &mut SnapshotSink<'_>) {
        let (logs, _held) = self.handler.snapshot();
        let mut fds = Vec::with_capacity(logs.len());
        let mut files = Vec::with_capacity(logs.len());
        for (pipe, path, owner) in logs {
            // Open refuses paths that are not UTF-8 (see `handoff`).
            let Some(path) = path.to_str() else { continue };
            fds.push((pipe, FdKind::Log));
            files.push(LogFileState {
                pipefd: pipe,
                path: path.to_owned(),
                driver: owner.driver,
                domname: owner.domname,
                domuuid: Uuid::from_bytes(owner.domuuid),
            });
        }
        let doc = LogdState {
            daemon,
            magic,
            handler: LogHandlerState {
                files,
                pumpfd: None,
            },
            counters: None,
            log_counters: None,
            log_files: None,
        };
        // Compact, unlike the re-exec file (only our next image reads it).
        match serde_json::to_string(&doc) {
            Ok(text) => keep(&fds, &text),
            Err(e) => error!("cannot serialise the fd store snapshot: {e}"),
        }
    }
}

/// A missing or malformed figure counts from zero: counters must never stop a restore.
fn counters_from_json(v: &serde_json::Value) -> LogCounters {
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    LogCounters {
        written: n("written"),
        dropped: n("dropped"),
        rotations: n("rotations"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filetime::{set_file_mtime, FileTime};
    use std::path::Path;
    use std::time::{Duration, Instant, SystemTime};

    fn aged(p: &Path, days: u64) {
        std::fs::write(p, b"x").unwrap();
        let t = SystemTime::now() - Duration::from_secs(days * 86_400);
        set_file_mtime(p, FileTime::from_system_time(t)).unwrap();
    }

    /// Waits (in real time, bounded) for a blocking pass to have removed `p`.
    async fn gone(p: &Path) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.exists() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// 11.3's timer: nothing before 24 h, a pass at 24 h, another 24 h later; logs the
    /// daemon holds open are kept.
    #[tokio::test(start_paused = true)]
    async fn cleaner_runs_24h_after_start_then_daily() {
        let t = tempfile::tempdir().unwrap();
        let config = LogdKeys {
            max_age_days: 2,
            log_root: t.path().to_str().unwrap().to_string(),
            ..LogdKeys::default()
        };
        let handler = LogHandler::new(Limits {
            max_size: config.max_size,
            max_backups: config.max_backups,
        });
        let open = t.path().join("held.log");
        aged(&open, 30);
        let owner = LogOwner {
            driver: "qemu".into(),
            domname: "held".into(),
            domuuid: [1; 16],
        };
        let (_, _, _wr) = handler
            .open(owner, open.as_os_str().as_bytes(), false)
            .unwrap();
        aged(&open, 30);
        let first = t.path().join("a.log");
        aged(&first, 3);
        schedule_cleaner(&handler, &config);

        tokio::time::sleep(cleaner::PERIOD - Duration::from_secs(60)).await;
        assert!(first.exists(), "no pass before 24 h");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(gone(&first).await, "the first pass runs at 24 h");

        let second = t.path().join("qemu").join("b.log");
        std::fs::create_dir_all(second.parent().unwrap()).unwrap();
        aged(&second, 3);
        tokio::time::sleep(cleaner::PERIOD - Duration::from_secs(600)).await;
        assert!(second.exists(), "no second pass before another 24 h");
        tokio::time::sleep(Duration::from_secs(1200)).await;
        assert!(gone(&second).await, "the second pass runs 24 h later");
        assert!(open.exists(), "an open log's chain is never deleted");
        handler.shutdown();
    }
}
