//! The command line shared by both daemons, parsed the way glibc's
//! `getopt_long(argc, argv, "df:p:t:vVh", ...)` does: short options may be
//! clustered (`-dv`), option arguments may be attached (`-t5`,
//! `--timeout=5`) or separate (`-t 5`, `--timeout 5`), long options may be
//! abbreviated to any unambiguous prefix, options and positional arguments
//! may be mixed (positionals are ignored) and `--` ends option parsing.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::paths::{DaemonKind, Mode};

/// The libvirt release we present ourselves as (see [`crate::admin::LIB_VERSION`] for
/// why 11.3.0 on both Debian 12 and 13).
pub const LIBVIRT_VERSION: &str = "11.3.0";

/// Everything the command line can set for a daemon run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `argv[0]` as given (used by `--version`, `--help` and re-exec).
    pub argv0: OsString,
    /// `-d` / `--daemon`.
    pub daemon: bool,
    /// `-v` / `--verbose`.
    pub verbose: bool,
    /// `-f` / `--config FILE`; `None` means the implicit default path.
    pub config: Option<PathBuf>,
    /// `-p` / `--pid-file FILE`; `None` means the default path.
    pub pid_file: Option<PathBuf>,
    /// `-t` / `--timeout SECS`; 0 (the default) disables auto-shutdown.
    pub timeout: u32,
}

/// What `main` should do after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliAction {
    /// Start the daemon with these options.
    Run(Options),
    /// Print `stdout` and `stderr` verbatim, then exit with `code`
    /// (`--help`, `--version`, unknown options).
    Exit {
        /// Process exit status.
        code: i32,
        /// Text for standard output.
        stdout: String,
        /// Text for standard error.
        stderr: String,
    },
}

/// An error libvirt reports through its logging (`VIR_ERROR`) before exiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// `-t` value not a decimal in 0..=INT_MAX/1000.
    #[error("Invalid value for timeout")]
    InvalidTimeout,
}

impl CliError {
    /// The exit status libvirt uses (EXIT_FAILURE).
    pub fn exit_code(&self) -> i32 {
        1
    }
}

/// The largest accepted timeout: INT_MAX / 1000.
pub const MAX_TIMEOUT: u32 = (i32::MAX / 1000) as u32;

/// Parses `args` (including `argv[0]`) for the current process's mode.
pub fn parse(daemon: DaemonKind, args: &[OsString]) -> Result<CliAction, CliError> {
    parse_with_mode(daemon, Mode::current(), args)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Opt {
    Daemon,
    Config,
    PidFile,
    Timeout,
    Verbose,
    Version,
    Help,
}

impl Opt {
    fn from_short(c: u8) -> Option<Opt> {
        Some(match c {
            b'd' => Opt::Daemon,
            b'f' => Opt::Config,
            b'p' => Opt::PidFile,
            b't' => Opt::Timeout,
            b'v' => Opt::Verbose,
            b'V' => Opt::Version,
            b'h' => Opt::Help,
            _ => return None,
        })
    }

    fn takes_arg(self) -> bool {
        matches!(self, Opt::Config | Opt::PidFile | Opt::Timeout)
    }
}

/// Long options in the order libvirt declares them.
const LONG: &[(&str, Opt)] = &[
    ("verbose", Opt::Verbose),
    ("daemon", Opt::Daemon),
    ("config", Opt::Config),
    ("timeout", Opt::Timeout),
    ("pid-file", Opt::PidFile),
    ("version", Opt::Version),
    ("help", Opt::Help),
];

/// Parses `args` (including `argv[0]`); `mode` selects the default paths
/// listed by `--help`.
pub fn parse_with_mode(
    daemon: DaemonKind,
    mode: Mode,
    args: &[OsString],
) -> Result<CliAction, CliError> {
    let argv0 = args
        .first()
        .cloned()
        .unwrap_or_else(|| daemon.name().into());
    let prog = argv0.to_string_lossy().into_owned();
    let mut opts = Options {
        argv0: argv0.clone(),
        ..Options::default()
    };
    let bad = |msg: String| CliAction::Exit {
        code: 1,
        stdout: String::new(),
        stderr: format!("{msg}{}", usage(daemon, mode, &prog)),
    };

    let mut i = 1;
    while i < args.len() {
        let arg = args[i].as_bytes();
        i += 1;
        if arg == b"--" {
            break;
        }
        if let Some(body) = arg.strip_prefix(b"--") {
            let (name, inline) = match body.iter().position(|&b| b == b'=') {
                Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
                None => (body, None),
            };
            let name_s = String::from_utf8_lossy(name).into_owned();
            let exact = LONG.iter().find(|(n, _)| n.as_bytes() == name);
            let (long_name, opt) = match exact {
                Some(&(n, o)) => (n, o),
                None => {
                    let cands: Vec<&(&str, Opt)> = LONG
                        .iter()
                        .filter(|(n, _)| n.as_bytes().starts_with(name))
                        .collect();
                    match cands.as_slice() {
                        [] => {
                            return Ok(bad(format!("{prog}: unrecognized option '--{name_s}'\n")))
                        }
                        [&(n, o)] => (n, o),
                        many => {
                            let list: Vec<String> =
                                many.iter().map(|(n, _)| format!(" '--{n}'")).collect();
                            return Ok(bad(format!(
                                "{prog}: option '--{name_s}' is ambiguous; possibilities:{}\n",
                                list.concat()
                            )));
                        }
                    }
                }
            };
            let value = if opt.takes_arg() {
                match inline {
                    Some(v) => Some(OsStr::from_bytes(v).to_os_string()),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => {
                        return Ok(bad(format!(
                            "{prog}: option '--{long_name}' requires an argument\n"
                        )))
                    }
                }
            } else {
                if inline.is_some() {
                    return Ok(bad(format!(
                        "{prog}: option '--{long_name}' doesn't allow an argument\n"
                    )));
                }
                None
            };
            if let Some(exit) = apply(daemon, mode, &mut opts, opt, value, &prog)? {
                return Ok(exit);
            }
            continue;
        }
        if arg.len() > 1 && arg[0] == b'-' {
            let mut j = 1;
            while j < arg.len() {
                let c = arg[j];
                j += 1;
                let Some(opt) = Opt::from_short(c) else {
                    return Ok(bad(format!(
                        "{prog}: invalid option -- '{}'\n",
                        String::from_utf8_lossy(&[c])
                    )));
                };
                let mut value = None;
                if opt.takes_arg() {
                    if j < arg.len() {
                        value = Some(OsStr::from_bytes(&arg[j..]).to_os_string());
                        j = arg.len();
                    } else if i < args.len() {
                        value = Some(args[i].clone());
                        i += 1;
                    } else {
                        return Ok(bad(format!(
                            "{prog}: option requires an argument -- '{}'\n",
                            c as char
                        )));
                    }
                }
                if let Some(exit) = apply(daemon, mode, &mut opts, opt, value, &prog)? {
                    return Ok(exit);
                }
            }
            continue;
        }
        // Positional argument (including a lone "-"): ignored, as libvirt does.
    }
    Ok(CliAction::Run(opts))
}

fn apply(
    daemon: DaemonKind,
    mode: Mode,
    opts: &mut Options,
    opt: Opt,
    value: Option<OsString>,
    prog: &str,
) -> Result<Option<CliAction>, CliError> {
    let value = value.unwrap_or_default();
    match opt {
        Opt::Daemon => opts.daemon = true,
        Opt::Verbose => opts.verbose = true,
        Opt::Config => opts.config = Some(PathBuf::from(value)),
        Opt::PidFile => opts.pid_file = Some(PathBuf::from(value)),
        Opt::Timeout => opts.timeout = parse_timeout(value.as_bytes())?,
        Opt::Version => {
            return Ok(Some(CliAction::Exit {
                code: 0,
                stdout: format!("{prog} (libvirt) {LIBVIRT_VERSION}\n"),
                stderr: String::new(),
            }))
        }
        Opt::Help => {
            return Ok(Some(CliAction::Exit {
                code: 0,
                stdout: String::new(),
                stderr: usage(daemon, mode, prog),
            }))
        }
    }
    Ok(None)
}

/// libvirt parses the timeout with `strtol` semantics through
/// `virStrToLong_i` with an end pointer: leading white space and a sign are
/// accepted, at least one digit is required, trailing text is ignored, and
/// the value must fit an `int` and lie in 0..=INT_MAX/1000.
pub fn parse_timeout(s: &[u8]) -> Result<u32, CliError> {
    let mut k = 0;
    while k < s.len() && matches!(s[k], b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r') {
        k += 1;
    }
    let mut neg = false;
    if k < s.len() && (s[k] == b'+' || s[k] == b'-') {
        neg = s[k] == b'-';
        k += 1;
    }
    let digits = s[k..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(CliError::InvalidTimeout);
    }
    let mut v: i64 = 0;
    for &d in &s[k..k + digits] {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(d - b'0')))
            .ok_or(CliError::InvalidTimeout)?;
    }
    if neg {
        v = -v;
    }
    if !(0..=i64::from(MAX_TIMEOUT)).contains(&v) {
        return Err(CliError::InvalidTimeout);
    }
    Ok(v as u32)
}

/// The `--help` text (printed to stderr), modelled on libvirt 9.0's.
pub fn usage(daemon: DaemonKind, mode: Mode, argv0: &str) -> String {
    let name = daemon.name();
    // The options come from the manual's table, which also writes the man pages.
    let mut s = format!("\nUsage:\n  {argv0} [options]\n\nOptions:\n");
    for o in crate::manual::DAEMON_OPTIONS {
        s.push_str(&format!("  {:<23}{}\n", o.spelling(), o.help));
    }
    s.push_str(&format!("\n{}:\n", daemon.description()));
    match mode {
        Mode::System => s.push_str(&format!(
            "\n  Default paths:\n\n\
             \x20   Configuration file (unless overridden by -f):\n\
             \x20     /etc/libvirt/{name}.conf\n\n\
             \x20   Sockets:\n\
             \x20     /run/libvirt/{name}-sock\n\n\
             \x20   PID file (unless overridden by -p):\n\
             \x20     /run/{name}.pid\n\n"
        )),
        Mode::Session => s.push_str(&format!(
            "\n  Default paths:\n\n\
             \x20   Configuration file (unless overridden by -f):\n\
             \x20     $XDG_CONFIG_HOME/libvirt/{name}.conf\n\n\
             \x20   Sockets:\n\
             \x20     $XDG_RUNTIME_DIR/libvirt/{name}-sock\n\n\
             \x20   PID file:\n\
             \x20     $XDG_RUNTIME_DIR/libvirt/{name}.pid\n\n"
        )),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn run(v: &[&str]) -> Options {
        match parse_with_mode(DaemonKind::Logd, Mode::System, &args(v)) {
            Ok(CliAction::Run(o)) => o,
            other => panic!("{v:?}: {other:?}"),
        }
    }

    fn exit(v: &[&str]) -> (i32, String, String) {
        match parse_with_mode(DaemonKind::Logd, Mode::System, &args(v)) {
            Ok(CliAction::Exit {
                code,
                stdout,
                stderr,
            }) => (code, stdout, stderr),
            other => panic!("{v:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let o = run(&["virtlogd"]);
        assert_eq!(
            o,
            Options {
                argv0: "virtlogd".into(),
                ..Options::default()
            }
        );
    }

    #[test]
    fn short_forms() {
        let o = run(&["x", "-dv", "-t5", "-f", "/a.conf", "-p/b.pid"]);
        assert!(o.daemon && o.verbose);
        assert_eq!(o.timeout, 5);
        assert_eq!(o.config, Some(PathBuf::from("/a.conf")));
        assert_eq!(o.pid_file, Some(PathBuf::from("/b.pid")));
        // Option argument taken from the rest of a cluster, and a value that
        // looks like an option is still a value.
        let o = run(&["x", "-vt", "7", "-f", "-d"]);
        assert_eq!(o.timeout, 7);
        assert_eq!(o.config, Some(PathBuf::from("-d")));
        assert!(!o.daemon);
        let o = run(&["x", "-dt10"]);
        assert!(o.daemon);
        assert_eq!(o.timeout, 10);
    }

    #[test]
    fn long_forms() {
        let o = run(&[
            "x",
            "--timeout=5",
            "--daemon",
            "--config",
            "/c",
            "--pid-file=/p",
            "--verbose",
        ]);
        assert!(o.daemon && o.verbose);
        assert_eq!(o.timeout, 5);
        assert_eq!(o.config, Some(PathBuf::from("/c")));
        assert_eq!(o.pid_file, Some(PathBuf::from("/p")));
        assert_eq!(run(&["x", "--timeout", "120"]).timeout, 120);
        // Unambiguous abbreviations.
        assert_eq!(run(&["x", "--time=3"]).timeout, 3);
        assert!(run(&["x", "--verb"]).verbose);
        assert_eq!(
            run(&["x", "--conf", "/z"]).config,
            Some(PathBuf::from("/z"))
        );
        // Later values override earlier ones.
        assert_eq!(run(&["x", "-t1", "-t2"]).timeout, 2);
    }

    #[test]
    fn positionals_ignored() {
        let o = run(&["x", "foo", "-d", "bar", "-", "--", "-v"]);
        assert!(o.daemon);
        assert!(!o.verbose);
    }

    #[test]
    fn timeout_values() {
        assert_eq!(run(&["x", "-t", "0"]).timeout, 0);
        assert_eq!(run(&["x", "-t", "2147483"]).timeout, 2147483);
        // strtol semantics with an end pointer: whitespace, '+' and trailing junk pass.
        assert_eq!(run(&["x", "-t", " +9s"]).timeout, 9);
        assert_eq!(run(&["x", "-t", "-0"]).timeout, 0);
        for bad in ["2147484", "-1", "abc", "", "99999999999999999999", "+"] {
            assert_eq!(
                parse_with_mode(DaemonKind::Logd, Mode::System, &args(&["x", "-t", bad])),
                Err(CliError::InvalidTimeout),
                "{bad:?}"
            );
        }
        assert_eq!(
            CliError::InvalidTimeout.to_string(),
            "Invalid value for timeout"
        );
        assert_eq!(CliError::InvalidTimeout.exit_code(), 1);
    }

    #[test]
    fn version_and_help() {
        let (c, out, err) = exit(&["/usr/sbin/virtlogd", "-V"]);
        assert_eq!(
            (c, out.as_str(), err.as_str()),
            (0, "/usr/sbin/virtlogd (libvirt) 11.3.0\n", "")
        );
        let (c, out, _) = exit(&["virtlogd", "--version"]);
        assert_eq!((c, out.as_str()), (0, "virtlogd (libvirt) 11.3.0\n"));
        // Options after -V are not looked at.
        assert_eq!(exit(&["v", "-V", "--bogus"]).0, 0);

        let (c, out, err) = exit(&["virtlogd", "-h"]);
        assert_eq!(c, 0);
        assert!(out.is_empty());
        assert!(err.starts_with("\nUsage:\n  virtlogd [options]\n"));
        assert!(err.contains("libvirt log management daemon:\n"));
        assert!(err.contains("      /etc/libvirt/virtlogd.conf\n"));
        assert!(err.contains("      /run/libvirt/virtlogd-sock\n"));
        assert!(err.contains("    PID file (unless overridden by -p):\n      /run/virtlogd.pid\n"));

        let a = args(&["virtlockd", "--help"]);
        let Ok(CliAction::Exit { code, stderr, .. }) =
            parse_with_mode(DaemonKind::Lockd, Mode::Session, &a)
        else {
            panic!()
        };
        assert_eq!(code, 0);
        assert!(stderr.contains("libvirt lock management daemon:\n"));
        assert!(stderr.contains("      $XDG_CONFIG_HOME/libvirt/virtlockd.conf\n"));
        assert!(stderr.contains("      $XDG_RUNTIME_DIR/libvirt/virtlockd-sock\n"));
        assert!(stderr.contains("    PID file:\n      $XDG_RUNTIME_DIR/libvirt/virtlockd.pid\n"));
    }

    #[test]
    fn unknown_options() {
        let u = usage(DaemonKind::Logd, Mode::System, "x");
        assert_eq!(
            exit(&["x", "-z"]),
            (1, String::new(), format!("x: invalid option -- 'z'\n{u}"))
        );
        assert_eq!(
            exit(&["x", "--bogus"]),
            (
                1,
                String::new(),
                format!("x: unrecognized option '--bogus'\n{u}")
            )
        );
        assert_eq!(
            exit(&["x", "-t"]).2,
            format!("x: option requires an argument -- 't'\n{u}")
        );
        assert_eq!(
            exit(&["x", "--config"]).2,
            format!("x: option '--config' requires an argument\n{u}")
        );
        assert_eq!(
            exit(&["x", "--daemon=1"]).2,
            format!("x: option '--daemon' doesn't allow an argument\n{u}")
        );
        assert_eq!(
            exit(&["x", "--ver"]).2,
            format!("x: option '--ver' is ambiguous; possibilities: '--verbose' '--version'\n{u}")
        );
        // Errors in earlier options win over later -h.
        assert_eq!(exit(&["x", "-z", "-h"]).0, 1);
        // Invalid UTF-8 in values is kept as-is.
        use std::os::unix::ffi::OsStringExt;
        let a = vec![
            OsString::from("x"),
            OsString::from("-f"),
            OsString::from_vec(vec![0xff, b'a']),
        ];
        let Ok(CliAction::Run(o)) = parse_with_mode(DaemonKind::Logd, Mode::System, &a) else {
            panic!()
        };
        assert_eq!(o.config.unwrap().as_os_str().as_bytes(), &[0xff, b'a']);
    }
}
