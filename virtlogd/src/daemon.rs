//! virtlogd's part of the daemon front-end: the log handler behind the main server,
//! and the `handler` section of the re-exec state.

use crate::handler::{HandedOffLog, Limits, LogCounters, LogHandler, LogOwner};
use crate::program::LogProgram;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, warn};
use uuid::Uuid;
use vh_common::config::DaemonConfig;
use vh_common::daemon::{adopt_inheritable_fds, App, Daemon};
use vh_common::paths::{DaemonKind, Mode};
use vh_common::restart::{DaemonState, LogFileState, LogHandlerState, LogdState};
use vh_common::server::{ClientHooks, NoHooks, Program, RunState};

pub struct LogDaemon {
    pub handler: Arc<LogHandler>,
    mode: Mode,
}

impl App for LogDaemon {
    const KIND: DaemonKind = DaemonKind::Logd;

    fn new(config: &DaemonConfig, mode: Mode, mut run: watch::Receiver<RunState>) -> Self {
        let handler = LogHandler::new(Limits {
            max_size: config.max_size,
            max_backups: config.max_backups,
        });
        // The pump's stop is started the moment a re-exec begins, in parallel with the
        // servers parking their clients, rather than at `handoff`.
        let h = handler.clone();
        tokio::spawn(async move {
            while run.changed().await.is_ok() {
                if *run.borrow() == RunState::Handoff {
                    h.handoff_begins();
                }
            }
        });
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

    async fn handoff(&self, daemon: DaemonState, magic: String) -> (String, Vec<RawFd>) {
        let handoff = self.handler.begin_handoff().await;
        // Our counters ride in a key of their own, which libvirt 9.0 ignores.
        let mut counters = serde_json::Map::new();
        for l in handoff.logs() {
            if let Some(path) = l.path.to_str() {
                counters.insert(path.to_owned(), counters_to_json(&l.counters));
            }
        }
        // Open refuses paths that are not UTF-8 (a JSON string cannot carry them); one
        // that got here all the same is left out rather than named lossily, which
        // would make the next image write to a different file.
        let files = handoff
            .logs()
            .filter_map(|l| {
                let Some(path) = l.path.to_str() else {
                    error!(path = ?l.path, "log path is not UTF-8; not handed over");
                    return None;
                };
                Some(LogFileState {
                    pipefd: l.pipe,
                    path: path.to_owned(),
                    driver: l.owner.driver.clone(),
                    domname: l.owner.domname.clone(),
                    domuuid: Uuid::from_bytes(l.owner.domuuid),
                })
            })
            .collect();
        let doc = LogdState {
            daemon,
            magic,
            handler: LogHandlerState { files },
            counters: Some(serde_json::json!({ "logs": counters })),
        };
        // Written while the pump thread takes the files out of the logs and closes them.
        let text = doc.to_json_string();
        handoff.finish().await;
        // Log pipes are never close-on-exec (see `LogFile::pipe`): no fds to clear.
        (text, Vec::new())
    }

    type State = LogdState;

    fn parse_state(text: &str) -> Result<LogdState, String> {
        LogdState::parse(text).map_err(|e| e.to_string())
    }

    fn state_magic(state: &LogdState) -> &str {
        &state.magic
    }

    /// The handler gave every file away at hand-off, so `in_place` changes nothing here.
    fn restore(&self, doc: LogdState, _in_place: bool) -> Result<DaemonState, String> {
        // Log pipes arrive inheritable and stay so (see `LogFile::pipe`).
        let fds: Vec<RawFd> = doc.handler.files.iter().map(|f| f.pipefd).collect();
        let carried = doc
            .counters
            .as_ref()
            .and_then(|c| c.get("logs"))
            .and_then(|l| l.as_object());
        let polled = adopt_inheritable_fds(&fds);
        let mut logs = Vec::with_capacity(fds.len());
        for (f, pipe) in doc.handler.files.into_iter().zip(polled) {
            let pipe = match pipe {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(path = %f.path, "inherited log pipe {}: {e}", f.pipefd);
                    continue;
                }
            };
            let counters = carried
                .and_then(|c| c.get(&f.path))
                .map(counters_from_json)
                .unwrap_or_default();
            logs.push(HandedOffLog {
                counters,
                pipe,
                path: PathBuf::from(f.path),
                owner: LogOwner {
                    driver: f.driver,
                    domname: f.domname,
                    domuuid: *f.domuuid.as_bytes(),
                },
            });
        }
        // One unopenable log loses only itself (the pump reports it); 9.0 would fail the
        // whole restart.
        if let Err(e) = self.handler.restore(logs) {
            warn!("cannot restore logs: {e}");
        }
        Ok(doc.daemon)
    }

    async fn shutdown(&self) {
        let handler = self.handler.clone();
        let _ = tokio::task::spawn_blocking(move || handler.shutdown()).await;
    }
}

fn counters_to_json(c: &LogCounters) -> serde_json::Value {
    serde_json::json!({
        "written": c.written,
        "dropped": c.dropped,
        "rotations": c.rotations,
    })
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
