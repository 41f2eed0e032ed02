//! The daemons' and vhctl's manuals, as data: `--help` and the man pages are both
//! rendered from here, so they cannot drift apart.
//!
//! * [`DAEMON_OPTIONS`] is the daemons' option list: `cli::usage` prints libvirt 9.0's
//!   `--help` from it, [`daemon_page`] the OPTIONS section of virtlogd(8)/virtlockd(8).
//! * [`CONFIG_KEYS`] are the config file's keys, with their defaults (a unit test checks
//!   them against the parsers of `vh_common::config` and `virtlogd::config`).
//! * The deliberate differences from libvirt 9.0 are the README's own list, read at
//!   build time ([`differences`]).
//! * [`Page`] is a man page; [`Page::roff`] renders it for man(1), [`Page::help`] as
//!   plain `--help` text (vhctl's).

use crate::exit;
use crate::paths::DaemonKind;

/// One command-line option of the daemons.
pub struct DaemonOption {
    pub short: char,
    pub long: &'static str,
    pub arg: Option<&'static str>,
    /// The `--help` line, libvirt 9.0's text.
    pub help: &'static str,
    /// The man page's description.
    pub man: &'static str,
}

/// In the order libvirt 9.0's `--help` lists them.
pub const DAEMON_OPTIONS: &[DaemonOption] = &[
    DaemonOption {
        short: 'h',
        long: "help",
        arg: None,
        help: "Display program help:",
        man: "Print the options and the default paths to standard error, and exit 0.",
    },
    DaemonOption {
        short: 'v',
        long: "verbose",
        arg: None,
        help: "Verbose messages.",
        man: "Log at info level to standard error: start-up, client connect and close, \
              limit suspend and resume (libvirt 9.0 prints its object traces instead).",
    },
    DaemonOption {
        short: 'd',
        long: "daemon",
        arg: None,
        help: "Run as a daemon & write PID file.",
        man: "Fork into the background once the sockets are ready and write the PID file.",
    },
    DaemonOption {
        short: 't',
        long: "timeout",
        arg: Some("secs"),
        help: "Exit after timeout period.",
        man: "Exit after this many seconds without clients (and, for a session virtlogd, \
              without open logs). 0, the default, never exits. Session clients start \
              the daemons with --timeout=120.",
    },
    DaemonOption {
        short: 'f',
        long: "config",
        arg: Some("file"),
        help: "Configuration file.",
        man: "Read this configuration file instead of the default one (see FILES).",
    },
    DaemonOption {
        short: 'V',
        long: "version",
        arg: None,
        help: "Display version information.",
        man: "Print the program name and the libvirt version it implements (9.0.0), and exit.",
    },
    DaemonOption {
        short: 'p',
        long: "pid-file",
        arg: Some("file"),
        help: "Change name of PID file.",
        man: "Write the PID file here instead of the default one (see FILES).",
    },
];

impl DaemonOption {
    /// `-t | --timeout <secs>`.
    pub fn spelling(&self) -> String {
        match self.arg {
            Some(a) => format!("-{} | --{} <{a}>", self.short, self.long),
            None => format!("-{} | --{}", self.short, self.long),
        }
    }
}

/// One key of the daemons' config file.
pub struct ConfigKey {
    pub name: &'static str,
    /// Which daemon reads it (`None`: both).
    pub only: Option<DaemonKind>,
    /// The default, as the file would spell it.
    pub default: &'static str,
    pub text: &'static str,
}

pub const CONFIG_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "log_level",
        only: None,
        default: "3",
        text: "The daemon's own logging: 1 debug, 2 info, 3 warning, 4 error.",
    },
    ConfigKey {
        name: "log_filters",
        only: None,
        default: "\"\"",
        text: "Per-module levels, libvirt's syntax (\"1:rpc 3:util\").",
    },
    ConfigKey {
        name: "log_outputs",
        only: None,
        default: "\"3:stderr\"",
        text: "Where the daemon's own log goes, libvirt's syntax (\"3:journald\", \
               \"1:file:/var/log/libvirt/virtlogd.log\", \"3:stderr\"). Without it, the \
               journal when it is stderr under systemd, else standard error.",
    },
    ConfigKey {
        name: "max_clients",
        only: None,
        default: "1024",
        text: "Most connections on the main socket; more wait in the listen queue.",
    },
    ConfigKey {
        name: "admin_max_clients",
        only: None,
        default: "5000",
        text: "Most connections on the admin socket.",
    },
    ConfigKey {
        name: "max_size",
        only: Some(DaemonKind::Logd),
        default: "2097152",
        text: "A log file rolls over when the next write would take it past this many \
               bytes (at a line end when one is near); 0 never rolls over.",
    },
    ConfigKey {
        name: "max_backups",
        only: Some(DaemonKind::Logd),
        default: "3",
        text: "Rolled-over files kept: LOG.0 (newest) to LOG.N-1; at most 32.",
    },
];

/// A paragraph of a man page.
pub enum Block {
    /// Running text.
    Para(String),
    /// A term (an option, a key) and its description.
    Item(String, String),
    /// Lines kept as they are.
    Pre(String),
}

pub struct Section {
    pub title: String,
    pub blocks: Vec<Block>,
}

/// A man page.
pub struct Page {
    pub name: String,
    pub section: u8,
    /// The NAME line's description.
    pub summary: String,
    pub synopsis: Vec<String>,
    pub sections: Vec<Section>,
}

/// Escapes running text for roff, turning `code` spans into bold.
fn roff_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut bold = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '`' => {
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            // Markdown emphasis has no meaning here.
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
            }
            // groff reads its input as Latin-1 unless told otherwise: a character
            // outside ASCII (×, →, ≥ in the README's differences) goes in as its
            // Unicode escape, which every groff output device renders.
            c if !c.is_ascii() => out.push_str(&format!("\\[u{:04X}]", c as u32)),
            c => out.push(c),
        }
    }
    if bold {
        out.push_str("\\fR");
    }
    // A line starting with '.' or '\'' would be a request.
    out.lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Wraps `text` at `width` columns after `indent` spaces; explicit newlines are kept.
fn wrap(text: &str, indent: usize, width: usize) -> String {
    let mut out = String::new();
    for line in text.split('\n') {
        let mut cur = String::new();
        for word in line.split(' ').filter(|w| !w.is_empty()) {
            if !cur.is_empty() && indent + cur.len() + 1 + word.len() > width {
                out.push_str(&format!("{:indent$}{cur}\n", ""));
                cur.clear();
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        out.push_str(&format!("{:indent$}{cur}\n", ""));
    }
    out
}

impl Page {
    /// The page in man(7) macros.
    pub fn roff(&self) -> String {
        let mut s = format!(
            // No hyphenation, ragged right: option names must not break at a hyphen.
            ".TH {} {} \"\" \"virt-helpers {}\" \"virt-helpers\"\n.nh\n.ad l\n.SH NAME\n{} \\- {}\n.SH SYNOPSIS\n",
            self.name.to_uppercase(),
            self.section,
            env!("CARGO_PKG_VERSION"),
            self.name,
            roff_text(&self.summary)
        );
        for (i, syn) in self.synopsis.iter().enumerate() {
            if i > 0 {
                s.push_str(".br\n");
            }
            s.push_str(&format!("\\fB{}\\fR\n", roff_text(syn)));
        }
        for sec in &self.sections {
            s.push_str(&format!(".SH {}\n", sec.title.to_uppercase()));
            for b in &sec.blocks {
                match b {
                    Block::Para(t) => s.push_str(&format!(".PP\n{}\n", roff_text(t))),
                    Block::Item(term, t) => s.push_str(&format!(
                        ".TP\n\\fB{}\\fR\n{}\n",
                        roff_text(term),
                        roff_text(t)
                    )),
                    Block::Pre(t) => {
                        s.push_str(".PP\n.nf\n.RS 4\n");
                        s.push_str(&roff_text(t));
                        s.push_str("\n.RE\n.fi\n");
                    }
                }
            }
        }
        s
    }

    /// The page as `--help` text: synopsis, then each section's items.
    pub fn help(&self) -> String {
        let mut s = format!("{}: {}\n\nUSAGE:\n", self.name, self.summary);
        for syn in &self.synopsis {
            s.push_str(&wrap(syn, 2, 90));
        }
        for sec in &self.sections {
            s.push_str(&format!("\n{}:\n", sec.title.to_uppercase()));
            for (i, b) in sec.blocks.iter().enumerate() {
                match b {
                    Block::Para(t) => s.push_str(&wrap(t, 2, 90)),
                    Block::Item(term, t) => {
                        if i > 0 {
                            s.push('\n');
                        }
                        s.push_str(&format!("  {term}\n"));
                        s.push_str(&wrap(t, 6, 90));
                    }
                    Block::Pre(t) => {
                        for l in t.lines() {
                            s.push_str(&format!("      {l}\n"));
                        }
                    }
                }
            }
        }
        s
    }
}

/// The README's "Deliberate differences from libvirt 9.0", one entry per bullet.
pub fn differences() -> Vec<String> {
    const README: &str = include_str!("../../README.md");
    let mut out: Vec<String> = Vec::new();
    let mut inside = false;
    for line in README.lines() {
        if line.starts_with("## ") {
            inside = line.starts_with("## Deliberate differences");
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(rest) = line.strip_prefix("* ") {
            out.push(rest.trim().to_string());
        } else if let (Some(last), true) = (out.last_mut(), line.starts_with("  ")) {
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    out
}

/// virtlogd(8) or virtlockd(8).
pub fn daemon_page(kind: DaemonKind) -> Page {
    let name = kind.name();
    let item = |t: &str, d: &str| Block::Item(t.to_string(), d.to_string());
    let para = |t: &str| Block::Para(t.to_string());
    let what = match kind {
        DaemonKind::Logd => {
            "holds the pipes QEMU writes its console and log output into, and writes each \
             into a log file capped at max_size and rotated into LOG.0 .. LOG.N-1. Because \
             the daemon, not QEMU, holds the files, a guest's output survives a libvirtd \
             restart, and SIGUSR1 re-executes the daemon without closing a single pipe."
        }
        DaemonKind::Lockd => {
            "holds fcntl leases (byte 0, length 1) on disk images and lockspace files for \
             as long as the QEMU that acquired them lives: if its connection closes while \
             it holds leases, they are released and the process is killed (SIGTERM, then \
             SIGKILL). SIGUSR1 re-executes the daemon without dropping a lease."
        }
    };
    let mut options: Vec<Block> = DAEMON_OPTIONS
        .iter()
        .map(|o| item(&o.spelling(), o.man))
        .collect();
    options.push(para(
        "Short options may be clustered (-dv) and take attached arguments (-t5); long \
         options may be abbreviated to any unambiguous prefix and take --opt=value; \
         positional arguments are ignored; -- ends the options (glibc getopt_long).",
    ));
    let config: Vec<Block> = CONFIG_KEYS
        .iter()
        .filter(|k| k.only.is_none() || k.only == Some(kind))
        .map(|k| item(&format!("{} = {}", k.name, k.default), k.text))
        .chain(std::iter::once(para(
            "libvirt's virConf syntax: name = value, # comments; unknown keys are ignored \
             and the first occurrence of a key wins. A missing default file is not an \
             error; a missing -f file, or one that does not parse or holds a value of the \
             wrong type, stops the daemon (exit 1).",
        )))
        .collect();
    let files = vec![
        item(
            &format!("/etc/libvirt/{name}.conf"),
            "The configuration file (system mode, run as root).",
        ),
        item(
            &format!("$XDG_CONFIG_HOME/libvirt/{name}.conf"),
            "The configuration file in session mode (any other user).",
        ),
        item(
            &format!("/run/libvirt/{name}-sock, /run/libvirt/{name}-admin-sock"),
            "The main socket (libvirt's clients) and the admin socket (virt-admin, vhctl \
             status/metrics/log-show --follow; the daemon's own uid only). Session mode: \
             under $XDG_RUNTIME_DIR/libvirt/.",
        ),
        item(
            &format!("/run/{name}.pid"),
            "The PID file, locked while the daemon runs ($XDG_RUNTIME_DIR/libvirt/ in \
             session mode).",
        ),
        item(
            &format!("/run/{name}-restart-exec.json"),
            "The re-exec state, libvirt 9.0's JSON, written at SIGUSR1 and read by the \
             next image (which may be libvirt's C daemon: our own counters ride in a key \
             it ignores).",
        ),
        item(
            &format!("/usr/lib/systemd/system/{name}.service, {name}.socket, {name}-admin.socket"),
            "The systemd units: `systemctl reload` sends SIGUSR1. Never `restart` \
             virtlockd while guests run (every lease is dropped).",
        ),
        item(
            "the daemon's own log",
            "Standard error, or the journal when started by systemd with stderr on the \
             journal; log_outputs chooses. --verbose adds info lines.",
        ),
    ];
    let signals = vec![
        item(
            "SIGUSR1",
            "Re-execute in place: every client and every held pipe or lease is handed to \
             the new image through the state file (systemctl reload). If the exec fails the \
             daemon keeps running with everything it held.",
        ),
        item(
            "SIGTERM, SIGINT, SIGQUIT",
            match kind {
                DaemonKind::Logd => {
                    "Quit: what QEMU already wrote reaches the files, then the pipes close."
                }
                DaemonKind::Lockd => {
                    "Quit: every lease is released, as the kernel drops the locks of a \
                     closed file."
                }
            },
        ),
    ];
    let exits = vec![
        item(
            "0",
            "Stopped by a signal or the idle --timeout, or --help/--version.",
        ),
        item(
            &exit::PIDFILE.to_string(),
            "Bad option or --timeout value, invalid configuration file, or the PID file \
             is locked (another daemon runs).",
        ),
        item(
            &exit::RUNDIR.to_string(),
            "The runtime directory cannot be made.",
        ),
        item(
            &exit::INIT.to_string(),
            "Start-up or re-exec state restore failed.",
        ),
        item(
            &exit::SIGNAL.to_string(),
            "The signal handlers cannot be set up.",
        ),
        item(
            &exit::NETWORK.to_string(),
            "The sockets cannot be bound or activated.",
        ),
    ];
    let diffs: Vec<Block> = differences().into_iter().map(Block::Para).collect();
    Page {
        name: name.to_string(),
        section: 8,
        summary: kind.description().to_string(),
        synopsis: vec![format!(
            "{name} [-h] [-v] [-d] [-t secs] [-f file] [-V] [-p file]"
        )],
        sections: vec![
            Section {
                title: "Description".into(),
                blocks: vec![
                    Block::Para(format!(
                        "{name} is virt-helpers' drop-in replacement for libvirt 9.0's \
                         daemon of the same name: same sockets, wire protocol, config \
                         file, options, PID file and re-exec state, so libvirtd, its \
                         plugins and virt-admin use it unchanged, and a running C daemon \
                         re-executes into it (and back) in the same process. It {what}"
                    )),
                    para(
                        "Run as root it is the system daemon; as any other user it runs \
                         in session mode, under $XDG_RUNTIME_DIR/libvirt/. vhctl(1) shows \
                         what it holds and its metrics.",
                    ),
                ],
            },
            Section {
                title: "Options".into(),
                blocks: options,
            },
            Section {
                title: "Configuration".into(),
                blocks: config,
            },
            Section {
                title: "Files".into(),
                blocks: files,
            },
            Section {
                title: "Signals".into(),
                blocks: signals,
            },
            Section {
                title: "Exit status".into(),
                blocks: exits,
            },
            Section {
                title: "Differences from libvirt 9.0".into(),
                blocks: diffs,
            },
            Section {
                title: "See also".into(),
                blocks: vec![para(match kind {
                    DaemonKind::Logd => "virtlockd(8), vhctl(1), virt-admin(1), libvirtd(8)",
                    DaemonKind::Lockd => "virtlogd(8), vhctl(1), virt-admin(1), libvirtd(8)",
                })],
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_escapes() {
        assert_eq!(roff_text("a-b `c\\d`"), "a\\-b \\fBc\\ed\\fR");
        assert_eq!(roff_text(".x\n'y"), "\\&.x\n\\&'y");
    }

    #[test]
    fn readme_differences_are_found() {
        let d = differences();
        assert!(d.len() > 5, "{d:?}");
        assert!(d.iter().any(|l| l.contains("re-exec")));
    }

    #[test]
    fn pages_name_everything() {
        for kind in [DaemonKind::Logd, DaemonKind::Lockd] {
            let r = daemon_page(kind).roff();
            for o in DAEMON_OPTIONS {
                assert!(r.contains(&format!("\\-\\-{}", o.long.replace('-', "\\-"))));
            }
            assert!(r.contains("SIGUSR1") && r.contains("max_clients"));
            assert_eq!(r.contains("max_backups"), kind == DaemonKind::Logd);
        }
    }
}
