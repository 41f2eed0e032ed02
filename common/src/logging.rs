//! libvirt's logging settings (`log_level`, `log_filters`, `log_outputs`)
//! driving `tracing`.
//!
//! * A **category** is an event's `target` with `::` turned into `.`
//!   (`vh_common::server` → `vh_common.server`); code may also set explicit
//!   libvirt-style targets such as `target: "rpc"`.
//! * An event passes if its level is at least the threshold of its category:
//!   the priority of the *first* filter whose pattern matches (a glob with
//!   `*` and `?`, matched as a substring, i.e. as `*pattern*`), else the
//!   default priority (`log_level`, default 3 = warning).
//! * It is then written to every output whose own priority it reaches.
//!
//! Whether a callsite is enabled depends only on its level and target, so
//! the decision is cached per callsite by `tracing` (`register_callsite`)
//! and disabled events cost a load and a branch. Changing filters or outputs
//! at run time ([`LogHandle`]) rebuilds that cache.
//!
//! The `journald` output speaks journald's native datagram protocol
//! directly (no extra crate); `syslog` goes through the C library's
//! `syslog(3)`.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::cli::LIBVIRT_VERSION;
use crate::paths::{DaemonKind, Mode};

/// journald's native socket.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// libvirt's log priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// 1
    Debug = 1,
    /// 2
    Info = 2,
    /// 3 (the default)
    Warning = 3,
    /// 4
    Error = 4,
}

impl Priority {
    /// 1..=4 → priority.
    pub fn from_number(n: u64) -> Option<Priority> {
        Some(match n {
            1 => Priority::Debug,
            2 => Priority::Info,
            3 => Priority::Warning,
            4 => Priority::Error,
            _ => return None,
        })
    }

    /// The number, 1..=4.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The level word libvirt prints (`debug`, `info`, `warning`, `error`).
    pub fn name(self) -> &'static str {
        match self {
            Priority::Debug => "debug",
            Priority::Info => "info",
            Priority::Warning => "warning",
            Priority::Error => "error",
        }
    }

    /// The priority of a tracing level (TRACE counts as debug).
    pub fn of_level(level: &Level) -> Priority {
        match *level {
            Level::ERROR => Priority::Error,
            Level::WARN => Priority::Warning,
            Level::INFO => Priority::Info,
            _ => Priority::Debug,
        }
    }

    /// The most verbose tracing level this priority lets through.
    pub fn level_filter(self) -> LevelFilter {
        match self {
            Priority::Debug => LevelFilter::TRACE,
            Priority::Info => LevelFilter::INFO,
            Priority::Warning => LevelFilter::WARN,
            Priority::Error => LevelFilter::ERROR,
        }
    }

    fn syslog(self) -> libc::c_int {
        match self {
            Priority::Debug => libc::LOG_DEBUG,
            Priority::Info => libc::LOG_INFO,
            Priority::Warning => libc::LOG_WARNING,
            Priority::Error => libc::LOG_ERR,
        }
    }

    /// `log_level` from the config (non-zero values only).
    pub fn from_log_level(n: u32) -> Result<Priority, LogError> {
        Priority::from_number(u64::from(n)).ok_or_else(|| {
            LogError(format!(
                "Failed to set logging priority, argument '{n}' is invalid"
            ))
        })
    }

    /// `LIBVIRT_DEBUG`: `1`..`4` or `debug`/`info`/`warning`/`error`.
    pub fn from_env_str(s: &str) -> Result<Priority, LogError> {
        Ok(match s {
            "1" | "debug" => Priority::Debug,
            "2" | "info" => Priority::Info,
            "3" | "warning" => Priority::Warning,
            "4" | "error" => Priority::Error,
            _ => {
                return Err(LogError(format!(
                    "Failed to set logging priority, argument '{s}' is invalid"
                )))
            }
        })
    }
}

/// A logging configuration error. `Display` gives the full libvirt text
/// (`invalid argument: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogError(pub String);

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid argument: {}", self.0)
    }
}

impl std::error::Error for LogError {}

/// libvirt's priority parse (`virStrToLong_uip`): an unsigned decimal.
fn parse_prio(s: &str) -> Option<Priority> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<u64>().ok().and_then(Priority::from_number)
}

/// One `level:match` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Threshold for matching categories.
    pub priority: Priority,
    /// The pattern as given (a leading '+' removed).
    pub pattern: String,
}

/// Glob match with `*` and `?` (other characters literal).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl Filter {
    /// True if `category` matches (`*pattern*` glob).
    pub fn matches(&self, category: &str) -> bool {
        let pat = format!("*{}*", self.pattern);
        glob(pat.as_bytes(), category.as_bytes())
    }
}

/// Parses a space-separated filter list (empty items skipped).
pub fn parse_filters(src: &str) -> Result<Vec<Filter>, LogError> {
    let mut out = Vec::new();
    for item in src.split(' ').filter(|s| !s.is_empty()) {
        let mut tok = item.split(':');
        let (Some(p), Some(m)) = (tok.next(), tok.next()) else {
            return Err(LogError(format!("Malformed format for filter '{item}'")));
        };
        let Some(priority) = parse_prio(p) else {
            return Err(LogError(format!(
                "Invalid priority '{p}' for filter '{item}'"
            )));
        };
        let pattern = m.strip_prefix('+').unwrap_or(m);
        if pattern.is_empty() {
            return Err(LogError(format!("Invalid match string '{m}'")));
        }
        out.push(Filter {
            priority,
            pattern: pattern.to_string(),
        });
    }
    Ok(out)
}

/// Formats filters as libvirt's admin API does: `"L:M "` per filter,
/// each followed by a space (including the last); empty if none.
pub fn format_filters(filters: &[Filter]) -> String {
    let mut s = String::new();
    for f in filters {
        let _ = write!(s, "{}:{} ", f.priority.number(), f.pattern);
    }
    s
}

/// Where an output writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard error.
    Stderr,
    /// `syslog(3)` with this ident.
    Syslog(String),
    /// A file, appended to (absolute path).
    File(PathBuf),
    /// journald's native protocol.
    Journald,
}

/// One `level:dest[:data]` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Minimum priority written.
    pub priority: Priority,
    /// Where.
    pub dest: Destination,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.priority.number();
        match &self.dest {
            Destination::Stderr => write!(f, "{n}:stderr"),
            Destination::Journald => write!(f, "{n}:journald"),
            Destination::Syslog(id) => write!(f, "{n}:syslog:{id}"),
            Destination::File(p) => write!(f, "{n}:file:{}", p.display()),
        }
    }
}

/// Makes a path absolute against the current directory (lexically).
fn absolute(p: &str) -> PathBuf {
    let path = Path::new(p);
    let base = if path.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    };
    let mut out = base;
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Parses a space-separated output list. A later output with the same
/// destination (and name) replaces an earlier one.
pub fn parse_outputs(src: &str) -> Result<Vec<Output>, LogError> {
    let mut list: Vec<Output> = Vec::new();
    for item in src.split(' ').filter(|s| !s.is_empty()) {
        let tok: Vec<&str> = item.split(':').collect();
        if tok.len() < 2 {
            return Err(LogError(format!(
                "Malformed format for log output '{item}'"
            )));
        }
        let Some(priority) = parse_prio(tok[0]) else {
            return Err(LogError(format!(
                "Invalid log priority '{}' for log output '{item}'",
                tok[0]
            )));
        };
        let want = match tok[1] {
            "stderr" | "journald" => 2,
            "file" | "syslog" => 3,
            other => {
                return Err(LogError(format!(
                    "Invalid log destination '{other}' for log output '{item}'"
                )))
            }
        };
        if tok.len() != want {
            return Err(LogError(format!(
                "Log output '{item}' does not meet the format requirements for destination type '{}'",
                tok[1]
            )));
        }
        let dest = match tok[1] {
            "stderr" => Destination::Stderr,
            "journald" => Destination::Journald,
            "syslog" => Destination::Syslog(tok[2].to_string()),
            _ => Destination::File(absolute(tok[2])),
        };
        let out = Output { priority, dest };
        list.retain(|o| o.dest != out.dest);
        list.push(out);
    }
    Ok(list)
}

/// Formats outputs as libvirt does: space-separated, no trailing space.
pub fn format_outputs(outputs: &[Output]) -> String {
    outputs
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything logging needs to know at start-up.
#[derive(Debug, Clone)]
pub struct LogInputs {
    /// Which daemon (for the default log file name and syslog/journal ident).
    pub daemon: DaemonKind,
    /// System or session mode.
    pub mode: Mode,
    /// The `-d` default log file (`DaemonPaths::default_log_file`).
    pub default_log_file: PathBuf,
    /// `log_level` from the config (0 = unset).
    pub log_level: u32,
    /// `log_filters` from the config.
    pub log_filters: Option<String>,
    /// `log_outputs` from the config.
    pub log_outputs: Option<String>,
    /// `LIBVIRT_DEBUG`.
    pub env_debug: Option<String>,
    /// `LIBVIRT_LOG_FILTERS`.
    pub env_filters: Option<String>,
    /// `LIBVIRT_LOG_OUTPUTS`.
    pub env_outputs: Option<String>,
    /// `-v`.
    pub verbose: bool,
    /// `-d`.
    pub daemonize: bool,
    /// Whether standard input is a terminal.
    pub stdin_is_tty: bool,
    /// Whether journald's socket is writable.
    pub journald_available: bool,
}

impl LogInputs {
    /// Fills in the environment variables, the tty and journald checks
    /// from the running process.
    #[allow(clippy::too_many_arguments)]
    pub fn from_process<K>(
        daemon: DaemonKind,
        mode: Mode,
        default_log_file: PathBuf,
        config: &crate::config::DaemonConfig<K>,
        verbose: bool,
        daemonize: bool,
    ) -> LogInputs {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        LogInputs {
            daemon,
            mode,
            default_log_file,
            log_level: config.log_level,
            log_filters: config.log_filters.clone(),
            log_outputs: config.log_outputs.clone(),
            env_debug: env("LIBVIRT_DEBUG"),
            env_filters: env("LIBVIRT_LOG_FILTERS"),
            env_outputs: env("LIBVIRT_LOG_OUTPUTS"),
            verbose,
            daemonize,
            stdin_is_tty: nix::unistd::isatty(0).unwrap_or(false),
            journald_available: nix::unistd::access(
                JOURNALD_SOCKET,
                nix::unistd::AccessFlags::W_OK,
            )
            .is_ok(),
        }
    }
}

/// The resolved logging state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Threshold for categories no filter matches.
    pub default_priority: Priority,
    /// Filters, first match wins.
    pub filters: Vec<Filter>,
    /// Explicit outputs; empty means [`LogSettings::default_output`].
    pub outputs: Vec<Output>,
    /// The output used when none is configured.
    pub default_output: Output,
    /// Ident for syslog/journald and the program name.
    pub ident: String,
}

impl LogSettings {
    /// Applies libvirt's precedence: config < environment < `-v`, then picks
    /// the default output.
    pub fn resolve(inp: &LogInputs) -> Result<LogSettings, LogError> {
        let mut prio = Priority::Warning;
        if inp.log_level != 0 {
            prio = Priority::from_log_level(inp.log_level)?;
        }
        let mut filters = parse_filters(inp.log_filters.as_deref().unwrap_or(""))?;
        let mut outputs = parse_outputs(inp.log_outputs.as_deref().unwrap_or(""))?;
        if let Some(d) = inp.env_debug.as_deref().filter(|s| !s.is_empty()) {
            prio = Priority::from_env_str(d)?;
        }
        if let Some(f) = inp.env_filters.as_deref().filter(|s| !s.is_empty()) {
            filters = parse_filters(f)?;
        }
        if let Some(o) = inp.env_outputs.as_deref().filter(|s| !s.is_empty()) {
            outputs = parse_outputs(o)?;
        }
        if inp.verbose && prio > Priority::Info {
            prio = Priority::Info;
        }
        let journald = Output {
            // A default journald output caps debug to info.
            priority: prio.max(Priority::Info),
            dest: Destination::Journald,
        };
        let default_output = if inp.daemonize {
            if inp.journald_available {
                journald
            } else {
                Output {
                    priority: prio,
                    dest: Destination::File(inp.default_log_file.clone()),
                }
            }
        } else if !inp.stdin_is_tty && inp.journald_available {
            journald
        } else {
            Output {
                priority: prio,
                dest: Destination::Stderr,
            }
        };
        Ok(LogSettings {
            default_priority: prio,
            filters,
            outputs,
            default_output,
            ident: inp.daemon.name().to_string(),
        })
    }

    /// The outputs in effect (explicit ones, else the default).
    pub fn effective_outputs(&self) -> Vec<Output> {
        if self.outputs.is_empty() {
            vec![self.default_output.clone()]
        } else {
            self.outputs.clone()
        }
    }

    /// The threshold for one category.
    pub fn category_priority(&self, category: &str) -> Priority {
        self.filters
            .iter()
            .find(|f| f.matches(category))
            .map_or(self.default_priority, |f| f.priority)
    }
}

enum Sink {
    Stderr,
    File(File),
    Journald(UnixDatagram),
    Syslog,
}

struct ActiveOutput {
    spec: Output,
    sink: Sink,
    started: AtomicBool,
}

impl ActiveOutput {
    fn open(spec: Output, ident: &str) -> io::Result<ActiveOutput> {
        let sink = match &spec.dest {
            Destination::Stderr => Sink::Stderr,
            Destination::File(p) => Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)?,
            ),
            Destination::Journald => {
                let s = UnixDatagram::unbound()?;
                s.connect(JOURNALD_SOCKET)?;
                s.set_nonblocking(true)?;
                Sink::Journald(s)
            }
            Destination::Syslog(id) => {
                open_syslog(if id.is_empty() { ident } else { id });
                Sink::Syslog
            }
        };
        Ok(ActiveOutput {
            spec,
            sink,
            started: AtomicBool::new(false),
        })
    }
}

fn open_syslog(ident: &str) {
    let Ok(c) = std::ffi::CString::new(ident) else {
        return;
    };
    // openlog keeps the pointer, so the string must live forever. This
    // leaks a few bytes per syslog output (re)definition, which is rare.
    let leaked: &'static std::ffi::CStr = Box::leak(c.into_boxed_c_str());
    // SAFETY: `leaked` is a valid NUL-terminated string with 'static lifetime.
    unsafe { libc::openlog(leaked.as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
}

struct State {
    settings: LogSettings,
    outputs: Vec<ActiveOutput>,
    hostname: String,
}

impl State {
    fn build(settings: LogSettings) -> Result<State, LogError> {
        let mut outputs = Vec::new();
        for spec in settings.effective_outputs() {
            let shown = spec.to_string();
            let o = ActiveOutput::open(spec, &settings.ident).map_err(|e| {
                LogError(format!(
                    "Failed to open log output '{shown}': {}",
                    crate::config::strerror(&e)
                ))
            })?;
            outputs.push(o);
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim_end().to_string())
            .unwrap_or_default();
        Ok(State {
            settings,
            outputs,
            hostname,
        })
    }

    fn min_output(&self) -> Option<Priority> {
        self.outputs.iter().map(|o| o.spec.priority).min()
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let prio = Priority::of_level(meta.level());
        let Some(min_out) = self.min_output() else {
            return false;
        };
        if prio < min_out {
            return false;
        }
        prio >= self.settings.category_priority(&category(meta.target()))
    }

    fn max_level(&self) -> LevelFilter {
        let Some(min_out) = self.min_output() else {
            return LevelFilter::OFF;
        };
        let min_cat = self
            .settings
            .filters
            .iter()
            .map(|f| f.priority)
            .chain([self.settings.default_priority])
            .min()
            .unwrap_or(Priority::Warning);
        min_cat.max(min_out).level_filter()
    }
}

/// The libvirt-style category of a tracing target.
pub fn category(target: &str) -> String {
    target.replace("::", ".")
}

/// The `tracing` layer that filters and writes; cheap to clone.
#[derive(Clone)]
pub struct LibvirtLayer {
    state: Arc<RwLock<State>>,
}

/// Run-time control of the installed logging (for the admin protocol).
#[derive(Clone)]
pub struct LogHandle {
    state: Arc<RwLock<State>>,
}

/// Builds the layer and its handle without installing anything globally.
pub fn layer(settings: LogSettings) -> Result<(LibvirtLayer, LogHandle), LogError> {
    let state = Arc::new(RwLock::new(State::build(settings)?));
    Ok((
        LibvirtLayer {
            state: state.clone(),
        },
        LogHandle { state },
    ))
}

/// Resolves the settings, prepares the default log file's directory and installs the
/// logging: what a daemon does once at start-up.
pub fn setup(inputs: &LogInputs) -> Result<LogHandle, LogError> {
    let settings = LogSettings::resolve(inputs)?;
    create_default_log_dir(inputs, &settings)?;
    install(settings)
}

/// A session daemon's default log file lives in `~/.cache/libvirt`, which a fresh
/// account does not have: 9.0 creates that directory (and its parents) with mode 0700
/// whenever its default output is that file, so `-d` works on a fresh account. The
/// system daemon's `/var/log/libvirt` belongs to the package and is never created.
pub fn create_default_log_dir(inputs: &LogInputs, settings: &LogSettings) -> Result<(), LogError> {
    if inputs.mode != Mode::Session {
        return Ok(());
    }
    let Destination::File(path) = &settings.default_output.dest else {
        return Ok(());
    };
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            LogError(format!(
                "Could not create log directory {}: {}",
                dir.display(),
                crate::config::strerror(&e)
            ))
        })
}

/// Installs the logging as the global default subscriber.
pub fn install(settings: LogSettings) -> Result<LogHandle, LogError> {
    use tracing_subscriber::layer::SubscriberExt;
    let (layer, handle) = layer(settings)?;
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| LogError(format!("cannot install logging: {e}")))?;
    Ok(handle)
}

impl LogHandle {
    fn update(
        &self,
        f: impl FnOnce(&mut LogSettings) -> Result<(), LogError>,
    ) -> Result<(), LogError> {
        let mut settings = match self.state.read() {
            Ok(g) => g.settings.clone(),
            Err(p) => p.into_inner().settings.clone(),
        };
        f(&mut settings)?;
        let new_state = State::build(settings)?;
        match self.state.write() {
            Ok(mut g) => *g = new_state,
            Err(p) => *p.into_inner() = new_state,
        }
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }

    /// Replaces the filters; an empty string clears them.
    pub fn set_filters(&self, src: &str) -> Result<(), LogError> {
        let filters = parse_filters(src)?;
        self.update(|s| {
            s.filters = filters;
            Ok(())
        })
    }

    /// Replaces the outputs; an empty string restores the default output.
    pub fn set_outputs(&self, src: &str) -> Result<(), LogError> {
        let outputs = parse_outputs(src)?;
        self.update(|s| {
            s.outputs = outputs;
            Ok(())
        })
    }

    /// Current filters, libvirt's admin format (trailing space; "" if none).
    pub fn filters(&self) -> String {
        self.read(|s| format_filters(&s.settings.filters))
    }

    /// Number of filters.
    pub fn filter_count(&self) -> usize {
        self.read(|s| s.settings.filters.len())
    }

    /// Current outputs, space separated (the default output if none set).
    pub fn outputs(&self) -> String {
        self.read(|s| format_outputs(&s.settings.effective_outputs()))
    }

    /// Number of outputs in effect.
    pub fn output_count(&self) -> usize {
        self.read(|s| s.outputs.len())
    }

    /// A copy of the current settings.
    pub fn settings(&self) -> LogSettings {
        self.read(|s| s.settings.clone())
    }
}

struct MsgVisitor {
    message: String,
    fields: String,
}

impl tracing::field::Visit for MsgVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm+0000` in UTC.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

fn journald_field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(key.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

impl<S: Subscriber> Layer<S> for LibvirtLayer {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        let on = match self.state.read() {
            Ok(g) => g.enabled(meta),
            Err(p) => p.into_inner().enabled(meta),
        };
        if on {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        match self.state.read() {
            Ok(g) => g.enabled(meta),
            Err(p) => p.into_inner().enabled(meta),
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.state.read() {
            Ok(g) => g.max_level(),
            Err(p) => p.into_inner().max_level(),
        })
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Ok(state) = self.state.read() else {
            return;
        };
        let meta = event.metadata();
        if !state.enabled(meta) {
            return;
        }
        let prio = Priority::of_level(meta.level());
        let mut v = MsgVisitor {
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut v);
        let msg = format!("{}{}", v.message, v.fields);
        let tid = nix::unistd::gettid().as_raw();
        let line = meta.line().unwrap_or(0);
        let target = meta.target();
        let mut text: Option<String> = None;
        for out in &state.outputs {
            if prio < out.spec.priority {
                continue;
            }
            match &out.sink {
                Sink::Stderr | Sink::File(_) => {
                    let ts = timestamp();
                    let mut s = String::new();
                    if !out.started.swap(true, Ordering::Relaxed) {
                        let _ =
                            writeln!(s, "{ts}: {tid}: info : libvirt version: {LIBVIRT_VERSION}");
                        let _ = writeln!(s, "{ts}: {tid}: info : hostname: {}", state.hostname);
                    }
                    let _ = writeln!(s, "{ts}: {tid}: {} : {target}:{line} : {msg}", prio.name());
                    let _ = match &out.sink {
                        Sink::File(f) => (&*f).write_all(s.as_bytes()),
                        _ => io::stderr().lock().write_all(s.as_bytes()),
                    };
                }
                Sink::Journald(sock) => {
                    let mut buf = Vec::new();
                    journald_field(&mut buf, "MESSAGE", msg.as_bytes());
                    journald_field(&mut buf, "PRIORITY", prio.syslog().to_string().as_bytes());
                    journald_field(
                        &mut buf,
                        "SYSLOG_IDENTIFIER",
                        state.settings.ident.as_bytes(),
                    );
                    journald_field(&mut buf, "LIBVIRT_SOURCE", b"file");
                    if let Some(f) = meta.file() {
                        journald_field(&mut buf, "CODE_FILE", f.as_bytes());
                    }
                    journald_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
                    journald_field(&mut buf, "CODE_FUNC", target.as_bytes());
                    let _ = sock.send(&buf);
                }
                Sink::Syslog => {
                    let t = text.get_or_insert_with(|| {
                        format!("{tid}: {} : {target}:{line} : {msg}", prio.name())
                            .replace('\0', " ")
                    });
                    if let Ok(c) = std::ffi::CString::new(t.as_str()) {
                        // SAFETY: both arguments are valid NUL-terminated
                        // strings and the format consumes exactly one %s.
                        unsafe { libc::syslog(prio.syslog(), c"%s".as_ptr(), c.as_ptr()) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn inputs() -> LogInputs {
        LogInputs {
            daemon: DaemonKind::Logd,
            mode: Mode::System,
            default_log_file: PathBuf::from("/var/log/libvirt/virtlogd.log"),
            log_level: 0,
            log_filters: None,
            log_outputs: None,
            env_debug: None,
            env_filters: None,
            env_outputs: None,
            verbose: false,
            daemonize: false,
            stdin_is_tty: true,
            journald_available: false,
        }
    }

    /// `virtlogd -d` on a fresh account: no `~/.cache` at all. The directory of the
    /// default log file is created 0700; the system daemon's never is.
    #[test]
    fn session_default_log_dir_is_created_0700() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("home/.cache/libvirt");
        let mut inp = inputs();
        inp.mode = Mode::Session;
        inp.daemonize = true;
        inp.default_log_file = dir.join("virtlogd.log");
        let s = LogSettings::resolve(&inp).unwrap();
        assert_eq!(
            s.default_output.dest,
            Destination::File(inp.default_log_file.clone())
        );
        create_default_log_dir(&inp, &s).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        // 0700 less the umask (never applied to owner bits in practice): nobody else
        // may look in.
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        assert_eq!(mode & 0o700, 0o700, "mode {mode:o}");
        // An existing directory is fine.
        create_default_log_dir(&inp, &s).unwrap();

        // Not daemonized (stderr), or system mode: nothing is created.
        let other = tmp.path().join("other/libvirt");
        inp.default_log_file = other.join("virtlogd.log");
        inp.daemonize = false;
        create_default_log_dir(&inp, &LogSettings::resolve(&inp).unwrap()).unwrap();
        inp.daemonize = true;
        inp.mode = Mode::System;
        create_default_log_dir(&inp, &LogSettings::resolve(&inp).unwrap()).unwrap();
        assert!(!other.exists());
    }

    #[test]
    fn filter_parsing_and_format() {
        let f = parse_filters("  1:rpc 3:+util.file  4:*json* ").unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].pattern, "util.file");
        assert_eq!(format_filters(&f), "1:rpc 3:util.file 4:*json* ");
        assert_eq!(format_filters(&[]), "");
        let e = |s: &str| parse_filters(s).unwrap_err().to_string();
        assert_eq!(
            e("x:foo"),
            "invalid argument: Invalid priority 'x' for filter 'x:foo'"
        );
        assert_eq!(
            e("5:foo"),
            "invalid argument: Invalid priority '5' for filter '5:foo'"
        );
        assert_eq!(e("1"), "invalid argument: Malformed format for filter '1'");
        assert_eq!(e("1:+"), "invalid argument: Invalid match string '+'");
        // Extra ':' fields are ignored, as in libvirt.
        assert_eq!(parse_filters("1:a:b").unwrap()[0].pattern, "a");
    }

    #[test]
    fn filter_matching() {
        let f = |p: &str| Filter {
            priority: Priority::Debug,
            pattern: p.into(),
        };
        assert!(f("rpc").matches("rpc.netserver"));
        assert!(f("server").matches("vh_common.server"));
        assert!(f("util.r*file").matches("util.rotatingfile"));
        assert!(f("ut?l").matches("util"));
        assert!(!f("lock").matches("logging"));
        assert_eq!(category("vh_common::server"), "vh_common.server");
        let s = LogSettings {
            default_priority: Priority::Warning,
            filters: parse_filters("1:rpc 4:rpc.x").unwrap(),
            outputs: vec![],
            default_output: Output {
                priority: Priority::Debug,
                dest: Destination::Stderr,
            },
            ident: "x".into(),
        };
        // First match wins.
        assert_eq!(s.category_priority("rpc.x"), Priority::Debug);
        assert_eq!(s.category_priority("other"), Priority::Warning);
    }

    #[test]
    fn output_parsing_and_format() {
        let o =
            parse_outputs("1:stderr 3:journald 2:syslog:virtlogd 4:file:/var/log/x.log").unwrap();
        assert_eq!(
            format_outputs(&o),
            "1:stderr 3:journald 2:syslog:virtlogd 4:file:/var/log/x.log"
        );
        // A later duplicate replaces the earlier one (moving to the end).
        let o = parse_outputs("1:stderr 2:file:/a 3:stderr").unwrap();
        assert_eq!(format_outputs(&o), "2:file:/a 3:stderr");
        // Relative file paths are made absolute.
        let o = parse_outputs("1:file:rel.log").unwrap();
        let Destination::File(p) = &o[0].dest else {
            panic!()
        };
        assert!(p.is_absolute() && p.ends_with("rel.log"));
        let e = |s: &str| parse_outputs(s).unwrap_err().to_string();
        assert_eq!(
            e("1:bogus"),
            "invalid argument: Invalid log destination 'bogus' for log output '1:bogus'"
        );
        assert_eq!(
            e("0:stderr"),
            "invalid argument: Invalid log priority '0' for log output '0:stderr'"
        );
        assert_eq!(
            e("stderr"),
            "invalid argument: Malformed format for log output 'stderr'"
        );
        assert_eq!(
            e("1:file"),
            "invalid argument: Log output '1:file' does not meet the format requirements for destination type 'file'"
        );
        assert_eq!(
            e("1:stderr:x"),
            "invalid argument: Log output '1:stderr:x' does not meet the format requirements for destination type 'stderr'"
        );
    }

    #[test]
    fn level_errors() {
        assert_eq!(
            Priority::from_log_level(9).unwrap_err().to_string(),
            "invalid argument: Failed to set logging priority, argument '9' is invalid"
        );
        assert_eq!(Priority::from_log_level(1), Ok(Priority::Debug));
        assert_eq!(Priority::from_env_str("warning"), Ok(Priority::Warning));
        let mut i = inputs();
        i.log_level = 9;
        assert!(LogSettings::resolve(&i).is_err());
        let mut i = inputs();
        i.log_outputs = Some("1:bogus".into());
        assert!(LogSettings::resolve(&i).is_err());
    }

    #[test]
    fn precedence_and_defaults() {
        let s = LogSettings::resolve(&inputs()).unwrap();
        assert_eq!(s.default_priority, Priority::Warning);
        assert_eq!(s.default_output.to_string(), "3:stderr");

        let mut i = inputs();
        i.log_level = 4;
        i.log_filters = Some("1:a".into());
        i.log_outputs = Some("1:stderr".into());
        i.env_debug = Some("3".into());
        i.env_filters = Some("2:b".into());
        i.verbose = true;
        let s = LogSettings::resolve(&i).unwrap();
        assert_eq!(s.default_priority, Priority::Info); // env 3, then -v → 2
        assert_eq!(format_filters(&s.filters), "2:b ");
        assert_eq!(format_outputs(&s.outputs), "1:stderr"); // config, env unset

        // -v never raises the level.
        let mut i = inputs();
        i.log_level = 1;
        i.verbose = true;
        assert_eq!(
            LogSettings::resolve(&i).unwrap().default_priority,
            Priority::Debug
        );

        // -d without journald: the mode's log file.
        let mut i = inputs();
        i.daemonize = true;
        assert_eq!(
            LogSettings::resolve(&i).unwrap().default_output.to_string(),
            "3:file:/var/log/libvirt/virtlogd.log"
        );
        // -d with journald, debug capped to info.
        i.journald_available = true;
        i.log_level = 1;
        assert_eq!(
            LogSettings::resolve(&i).unwrap().default_output.to_string(),
            "2:journald"
        );
        // Foreground, no tty, journald: journald; with a tty: stderr.
        let mut i = inputs();
        i.journald_available = true;
        i.stdin_is_tty = false;
        assert_eq!(
            LogSettings::resolve(&i).unwrap().default_output.to_string(),
            "3:journald"
        );
        i.stdin_is_tty = true;
        assert_eq!(
            LogSettings::resolve(&i).unwrap().default_output.to_string(),
            "3:stderr"
        );
    }

    #[test]
    fn layer_writes_and_reconfigures() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.log");
        let b = dir.path().join("b.log");
        let mut i = inputs();
        i.log_outputs = Some(format!("1:file:{}", a.display()));
        i.log_filters = Some("1:vh_test_dbg".into());
        let settings = LogSettings::resolve(&i).unwrap();
        let (layer, handle) = layer(settings).unwrap();
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "vh_test_dbg", "dbg-visible {}", 1);
            tracing::debug!(target: "other", "dbg-hidden");
            tracing::info!(target: "other", "info-hidden");
            tracing::warn!(target: "other", key = 5, "warn-visible");

            assert_eq!(handle.filters(), "1:vh_test_dbg ");
            assert_eq!(handle.filter_count(), 1);
            assert_eq!(handle.outputs(), format!("1:file:{}", a.display()));
            handle.set_filters("").unwrap();
            assert_eq!(handle.filters(), "");
            handle
                .set_outputs(&format!("2:file:{}", b.display()))
                .unwrap();
            tracing::debug!(target: "vh_test_dbg", "dbg-after-clear");
            tracing::warn!(target: "other", "warn-b");
            assert!(handle.set_outputs("1:bogus").is_err());
            // Failed set leaves the old outputs.
            assert_eq!(handle.outputs(), format!("2:file:{}", b.display()));
            handle.set_outputs("").unwrap();
            assert_eq!(handle.outputs(), "3:stderr");
            assert_eq!(handle.output_count(), 1);
        });
        let a_text = std::fs::read_to_string(&a).unwrap();
        assert!(
            a_text.contains(": info : libvirt version: 11.3.0\n"),
            "{a_text}"
        );
        assert!(a_text.contains(": debug : vh_test_dbg:"), "{a_text}");
        assert!(a_text.contains(" : dbg-visible 1\n"), "{a_text}");
        assert!(a_text.contains(" : warn-visible key=5\n"), "{a_text}");
        assert!(!a_text.contains("hidden"), "{a_text}");
        let b_text = std::fs::read_to_string(&b).unwrap();
        assert!(b_text.contains("warn-b"));
        assert!(!b_text.contains("dbg-after-clear"));
        let line = a_text.lines().last().unwrap();
        // 2024-01-02 03:04:05.678+0000: <tid>: warning : other:<n> : warn-visible key=5
        assert_eq!(&line[10..11], " ");
        assert_eq!(&line[23..30], "+0000: ");
        assert!(line.contains(": warning : other:"));
    }

    #[test]
    fn timestamp_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 28, "{t}");
        assert!(t.ends_with("+0000"));
        assert!(t.starts_with("20"));
    }

    #[test]
    fn journald_encoding() {
        let mut b = Vec::new();
        journald_field(&mut b, "MESSAGE", b"a\nb");
        assert_eq!(b, b"MESSAGE\n\x03\0\0\0\0\0\0\0a\nb\n");
    }
}
