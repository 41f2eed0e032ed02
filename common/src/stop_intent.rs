//! Why systemd sent us SIGTERM: to restart the unit, or to stop it for good.
//!
//! With the fd store on, a SIGTERM for a restart must leave everything in the store
//! (the next start resumes from it), but a SIGTERM for a stop must not: systemd 252
//! empties the store after a stop, which closes every lease fd while the lease owners
//! (QEMU) keep running, and another host could then start the same disk. So on SIGTERM
//! the daemon asks systemd which job is running on its own unit and only keeps the
//! store for a restart; for anything else it stops as libvirt 9.0 does (virtlockd
//! kills every registered owner, then releases).
//!
//! What systemd reports, checked in systemd-nspawn containers running systemd 252
//! (Debian 12) and 257 (Debian 13), with `systemctl list-jobs` run from a service's
//! SIGTERM handler: `restart`, `try-restart` and `reload-or-restart` (on a unit without
//! `ExecReload=`) all show the unit's job as `restart running` while the old process is
//! being stopped (systemd runs a restart job as a stop and turns it into a start only
//! once the stop is done); `stop` and a system shutdown (`poweroff`) show
//! `stop running`; `systemctl kill -s TERM` shows no job.
//! Only a `restart` or `try-restart` job keeps the store. No job, another type, an
//! unknown unit, a query that failed twice (bounded by [`QUERY_TIMEOUT`], then by
//! [`RETRY_TIMEOUT`] after `EXTEND_TIMEOUT_USEC`) all mean stop:
//! an owner killed by mistake is what 9.0 does on every restart; a lease freed under a
//! running owner is what must never happen.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the job query may take: a stop must never hang on it.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a SIGTERM with the fd store on is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopIntent {
    /// systemd restarts the unit: keep everything in the store.
    Restart(String),
    /// Anything else (a stop, a shutdown, a plain kill, or we could not tell).
    Stop(String),
}

/// Our unit's name from the text of `/proc/self/cgroup`: the innermost `.service`
/// component of the unified (`0::`) or the named systemd hierarchy's path.
pub fn own_unit(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            (ctrl.is_empty() || ctrl == "name=systemd").then_some(path)
        })
        .find_map(|path| {
            path.rsplit('/')
                .find(|c| c.ends_with(".service") && c.len() > ".service".len())
                .map(str::to_string)
        })
}

/// The job type of `unit` in `systemctl list-jobs --no-legend --plain` output
/// (`ID UNIT TYPE STATE` per line).
pub fn job_type(list_jobs: &str, unit: &str) -> Option<(String, String)> {
    list_jobs.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [id, u, ty, _state] if *u == unit => Some((id.to_string(), ty.to_string())),
            _ => None,
        }
    })
}

/// The intent a job type (or its absence) stands for.
pub fn classify(unit: &str, job: Option<(String, String)>) -> StopIntent {
    match job {
        Some((id, ty)) if ty == "restart" || ty == "try-restart" => {
            StopIntent::Restart(format!("systemd job {id} on {unit} is a {ty}"))
        }
        Some((id, ty)) => StopIntent::Stop(format!("systemd job {id} on {unit} is a {ty}")),
        None => StopIntent::Stop(format!("no systemd job on {unit} (a plain kill?)")),
    }
}

/// Asks systemd (the user manager for a session daemon) what the SIGTERM is for.
/// Blocks the calling thread for at most about [`QUERY_TIMEOUT`]; run it off the
/// async workers.
pub fn query(user_manager: bool) -> StopIntent {
    let cgroup = match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(c) => c,
        Err(e) => return StopIntent::Stop(format!("cannot read /proc/self/cgroup: {e}")),
    };
    let Some(unit) = own_unit(&cgroup) else {
        return StopIntent::Stop(format!("not in a service's cgroup ({})", cgroup.trim()));
    };
    let cmd = job_query(&unit, user_manager);
    let first = match run_bounded(cmd, QUERY_TIMEOUT) {
        Ok(out) => return classify(&unit, job_type(&out, &unit)),
        Err(why) => why,
    };
    // PID 1 may be busy (right after a daemon-reload or daemon-reexec): a restart
    // misread as a stop kills every guest, so ask once more, for longer, after asking
    // systemd for the time (the stop timeout would otherwise run on meanwhile).
    if let Err(e) = crate::activation::notify_extend_timeout(RETRY_TIMEOUT.as_secs() + 5) {
        tracing::warn!("cannot notify systemd: {e}");
    }
    tracing::warn!("asking systemd about {unit} again: {first}");
    let cmd = job_query(&unit, user_manager);
    match run_bounded(cmd, RETRY_TIMEOUT) {
        Ok(out) => classify(&unit, job_type(&out, &unit)),
        Err(why) => StopIntent::Stop(format!(
            "cannot ask systemd about {unit}: {first}; again: {why}"
        )),
    }
}

/// `systemctl list-jobs` for our unit. The child gets none of our fds past stdio: lease
/// fds and log pipes stay inheritable for their whole life (so a re-exec need not
/// touch them), and a copy held by `systemctl` would keep a released OFD lease locked
/// or a pipe open for as long as it runs.
fn job_query(unit: &str, user_manager: bool) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("systemctl");
    if user_manager {
        cmd.arg("--user");
    }
    cmd.args([
        "list-jobs",
        "--no-legend",
        "--plain",
        "--no-pager",
        "--",
        unit,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and makes one raw
    // syscall (async-signal-safe); it touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            // close_range(3, ~0, CLOSE_RANGE_CLOEXEC): every fd past stdio goes at the
            // exec (std's own error pipe is close-on-exec already). A kernel before 5.11
            // refuses the call: the child then inherits them, as before.
            let _ = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32);
            Ok(())
        });
    }
    cmd
}

/// How long the one retry of the job query may take (systemd is asked for that time
/// first, with `EXTEND_TIMEOUT_USEC`).
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cmd`, killing it after `limit`; its stdout if it exited successfully.
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd.spawn().map_err(|e| format!("systemctl: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("systemctl gave no answer within {limit:?}"));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("systemctl: {e}"));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        // The child has exited: this reads what is buffered up to EOF.
        o.read_to_string(&mut out)
            .map_err(|e| format!("systemctl's output: {e}"))?;
    }
    if !status.success() {
        return Err(format!("systemctl list-jobs: {status}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_unit_from_cgroup() {
        assert_eq!(
            own_unit("0::/system.slice/virtlockd.service\n").as_deref(),
            Some("virtlockd.service")
        );
        // Delegated subgroups below the unit.
        assert_eq!(
            own_unit("0::/system.slice/virtlogd.service/main\n").as_deref(),
            Some("virtlogd.service")
        );
        assert_eq!(
            own_unit(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/virtlogd.service\n"
            )
            .as_deref(),
            Some("virtlogd.service")
        );
        // cgroup v1: the named systemd hierarchy, not a controller's.
        assert_eq!(
            own_unit("4:memory:/\n1:name=systemd:/system.slice/virtlockd.service\n").as_deref(),
            Some("virtlockd.service")
        );
        assert_eq!(own_unit("0::/user.slice/session-3.scope\n"), None);
        assert_eq!(own_unit("0::/\n"), None);
    }

    #[test]
    fn job_types_seen_on_252_and_257() {
        // What a SIGTERM handler saw in systemd 252 and 257 containers.
        let restart = "49 virtlockd.service restart running\n";
        let stop = "190 virtlockd.service stop running\n";
        let u = "virtlockd.service";
        assert!(matches!(
            classify(u, job_type(restart, u)),
            StopIntent::Restart(_)
        ));
        assert!(matches!(
            classify(u, job_type(stop, u)),
            StopIntent::Stop(_)
        ));
        assert!(matches!(classify(u, job_type("", u)), StopIntent::Stop(_)));
        // Another unit's restart is not ours.
        assert!(matches!(
            classify(u, job_type("7 virtlogd.service restart running\n", u)),
            StopIntent::Stop(_)
        ));
        assert!(matches!(
            classify(u, job_type("8 virtlockd.service try-restart running\n", u)),
            StopIntent::Restart(_)
        ));
    }

    #[test]
    fn a_slow_query_is_cut_short() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30").stdout(Stdio::piped());
        // Killed and reaped rather than waited for: an error, not a 30 s wait.
        assert!(run_bounded(cmd, Duration::from_millis(100)).is_err());
    }
}
