//! libvirt's `virConf` file syntax and the typed keys both daemons read (`log_*`,
//! `max_clients`, `admin_max_clients`); each daemon declares and validates its own keys
//! in its crate's `config.rs` through [`DaemonKeys`].
//!
//! The parser follows the behaviour of libvirt 9.0 (`virtlogd.md` §5.2) with 11.3's
//! one change: `name = value` statements ended by a newline or `;`, `#` comments,
//! integers with an optional sign, `'...'`, `"..."` and `"""..."""` strings, `[ ... ]`
//! lists with an optional trailing comma. Unknown keys are ignored and the *first*
//! occurrence of a key wins. A number whose digits exceed `i64::MAX` fails the whole file
//! with 11.3's "numeric overflow in conf value" (9.0 silently wrapped it), whatever key
//! it belongs to.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// libvirt reads configuration files with a 10 MiB cap.
pub const MAX_CONFIG_FILE_SIZE: u64 = 10 * 1024 * 1024;

/// One parsed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A number written with a leading `-` (libvirt's `VIR_CONF_LLONG`).
    Signed(i64),
    /// A number written without `-` (libvirt's `VIR_CONF_ULLONG`), at most `i64::MAX`.
    Unsigned(u64),
    /// A quoted string.
    String(String),
    /// A `[ ... ]` list.
    List(Vec<Value>),
}

/// A parsed file: its entries in file order (duplicates kept).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conf {
    /// The name used in error messages (the path as given).
    pub filename: String,
    /// `(name, value)` in file order.
    pub entries: Vec<(String, Value)>,
}

impl Conf {
    /// The first value recorded for `name` (libvirt: first occurrence wins).
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// An unsigned value that must fit in `max`; `Ok(None)` if absent.
    pub fn get_unsigned(&self, name: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Unsigned(v)) if *v <= max => Ok(Some(*v)),
            Some(Value::Unsigned(_)) => Err(ConfigError::Internal(format!(
                "{}: value for '{}' parameter must be in range 0:{}",
                self.filename, name, max
            ))),
            Some(_) => Err(ConfigError::Internal(format!(
                "{}: expected an unsigned integer for '{}' parameter",
                self.filename, name
            ))),
        }
    }

    /// A string value; `Ok(None)` if absent.
    pub fn get_string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ConfigError::Internal(format!(
                "{}: expected a string for '{}' parameter",
                self.filename, name
            ))),
        }
    }
}

/// Errors from reading a configuration file. `Display` gives the libvirt
/// message that follows `Can't load config file: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `configuration file syntax error: <file>:<line>: <what>`.
    Syntax {
        /// File name as given.
        file: String,
        /// 1-based line.
        line: u32,
        /// e.g. `expecting an assignment`.
        what: &'static str,
    },
    /// `internal error: <text>` (type and range errors).
    Internal(String),
    /// `numerical overflow: <file>:<line>: numeric overflow in conf value` (11.3's
    /// `VIR_ERR_OVERFLOW` from the parser).
    Overflow {
        /// File name as given.
        file: String,
        /// 1-based line.
        line: u32,
    },
    /// `Failed to open file '<path>': <strerror>`.
    Open {
        /// Path as given.
        path: String,
        /// e.g. `No such file or directory`.
        reason: String,
    },
    /// `Failed to read file '<path>': <strerror>` (including the size cap).
    Read {
        /// Path as given.
        path: String,
        /// e.g. `Argument list too long`.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { file, line, what } => {
                write!(f, "configuration file syntax error: {file}:{line}: {what}")
            }
            ConfigError::Internal(s) => write!(f, "internal error: {s}"),
            ConfigError::Overflow { file, line } => write!(
                f,
                "numerical overflow: {file}:{line}: numeric overflow in conf value"
            ),
            ConfigError::Open { path, reason } => {
                write!(f, "Failed to open file '{path}': {reason}")
            }
            ConfigError::Read { path, reason } => {
                write!(f, "Failed to read file '{path}': {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// The full line the daemon prints: `Can't load config file: <error>: <file>`.
    pub fn load_failure_message(&self, file: &Path) -> String {
        format!("Can't load config file: {}: {}", self, file.display())
    }
}

/// The C library's text for an errno, without Rust's " (os error N)" suffix.
pub(crate) fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match (e.raw_os_error(), s.rfind(" (os error ")) {
        (Some(_), Some(i)) => s[..i].to_string(),
        _ => s,
    }
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    line: u32,
    filename: &'a str,
}

fn is_blank(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

fn is_eol(c: u8) -> bool {
    c == b'\n' || c == b'\r'
}

impl<'a> Parser<'a> {
    /// The current byte; 0 at the end (libvirt's buffer is NUL terminated).
    fn cur(&self) -> u8 {
        self.buf.get(self.pos).copied().unwrap_or(0)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn next(&mut self) {
        if !self.at_end() {
            self.pos += 1;
        }
    }

    fn err(&self, what: &'static str) -> ConfigError {
        ConfigError::Syntax {
            file: self.filename.to_string(),
            line: self.line,
            what,
        }
    }

    fn skip_blanks(&mut self) {
        while !self.at_end() && is_blank(self.cur()) {
            self.pos += 1;
        }
    }

    fn skip_blanks_and_eol(&mut self) {
        while !self.at_end() && (is_blank(self.cur()) || is_eol(self.cur())) {
            if self.cur() == b'\n' {
                self.line += 1;
            }
            self.pos += 1;
        }
    }

    fn starts_with(&self, s: &[u8]) -> bool {
        self.buf.get(self.pos..).is_some_and(|r| r.starts_with(s))
    }

    fn text(&self, from: usize, to: usize) -> String {
        String::from_utf8_lossy(self.buf.get(from..to).unwrap_or_default()).into_owned()
    }

    fn parse_number(&mut self) -> Result<Value, ConfigError> {
        let neg = self.cur() == b'-';
        if self.cur() == b'-' || self.cur() == b'+' {
            self.next();
        }
        if self.at_end() || !self.cur().is_ascii_digit() {
            return Err(self.err("unterminated number"));
        }
        // The digits accumulate as a positive i64 and the sign comes last, as in 11.3:
        // so `-9223372036854775808` overflows too.
        let mut l: i64 = 0;
        while !self.at_end() && self.cur().is_ascii_digit() {
            let digit = i64::from(self.cur() - b'0');
            l = match l.checked_mul(10).and_then(|v| v.checked_add(digit)) {
                Some(v) => v,
                None => {
                    return Err(ConfigError::Overflow {
                        file: self.filename.to_string(),
                        line: self.line,
                    })
                }
            };
            self.next();
        }
        if neg {
            Ok(Value::Signed(-l))
        } else {
            Ok(Value::Unsigned(l as u64))
        }
    }

    fn parse_string(&mut self) -> Result<String, ConfigError> {
        let quote = self.cur();
        if quote == b'"' && self.pos + 6 < self.buf.len() && self.starts_with(b"\"\"\"") {
            self.pos += 3;
            let base = self.pos;
            while self.pos + 2 < self.buf.len() && !self.starts_with(b"\"\"\"") {
                if self.cur() == b'\n' {
                    self.line += 1;
                }
                self.next();
            }
            if !self.starts_with(b"\"\"\"") {
                return Err(self.err("unterminated string"));
            }
            let s = self.text(base, self.pos);
            self.pos += 3;
            return Ok(s);
        }
        self.next();
        let base = self.pos;
        while !self.at_end() && self.cur() != quote && !is_eol(self.cur()) {
            self.next();
        }
        if self.cur() != quote {
            return Err(self.err("unterminated string"));
        }
        let s = self.text(base, self.pos);
        self.next();
        Ok(s)
    }

    fn parse_value(&mut self, depth: u32) -> Result<Value, ConfigError> {
        self.skip_blanks();
        if self.at_end() {
            return Err(self.err("expecting a value"));
        }
        let c = self.cur();
        if c == b'"' || c == b'\'' {
            Ok(Value::String(self.parse_string()?))
        } else if c == b'[' {
            // libvirt recurses without a bound; cap it so hostile input
            // cannot overflow our stack.
            if depth > 256 {
                return Err(self.err("expecting a value"));
            }
            self.next();
            self.skip_blanks_and_eol();
            let mut items = Vec::new();
            if !self.at_end() && self.cur() != b']' {
                items.push(self.parse_value(depth + 1)?);
                self.skip_blanks_and_eol();
            }
            while !self.at_end() && self.cur() != b']' {
                if self.cur() != b',' {
                    return Err(self.err("expecting a separator in list"));
                }
                self.next();
                self.skip_blanks_and_eol();
                if self.cur() == b']' {
                    break;
                }
                items.push(self.parse_value(depth + 1)?);
                self.skip_blanks_and_eol();
            }
            if self.cur() == b']' {
                self.next();
                Ok(Value::List(items))
            } else {
                Err(self.err("list is not closed with ]"))
            }
        } else if c.is_ascii_digit() || c == b'-' || c == b'+' {
            self.parse_number()
        } else {
            Err(self.err("expecting a value"))
        }
    }

    fn parse_name(&mut self) -> Result<String, ConfigError> {
        self.skip_blanks();
        let base = self.pos;
        if !self.cur().is_ascii_alphabetic() {
            return Err(self.err("expecting a name"));
        }
        while !self.at_end() && (self.cur().is_ascii_alphanumeric() || self.cur() == b'_') {
            self.next();
        }
        Ok(self.text(base, self.pos))
    }

    fn skip_comment(&mut self) {
        // At '#': skip to the end of the line (the EOL itself is left).
        while !self.at_end() && !is_eol(self.cur()) {
            self.next();
        }
    }

    fn parse_statement(&mut self) -> Result<Option<(String, Value)>, ConfigError> {
        self.skip_blanks_and_eol();
        if self.cur() == b'#' {
            self.skip_comment();
            return Ok(None);
        }
        let name = self.parse_name()?;
        self.skip_blanks();
        if self.cur() != b'=' {
            return Err(self.err("expecting an assignment"));
        }
        self.next();
        self.skip_blanks();
        let value = self.parse_value(0)?;
        self.skip_blanks();
        if self.cur() == b'#' {
            self.skip_comment();
        }
        Ok(Some((name, value)))
    }

    fn parse_separator(&mut self) -> Result<(), ConfigError> {
        self.skip_blanks();
        if self.at_end() {
            return Ok(());
        }
        if is_eol(self.cur()) {
            self.skip_blanks_and_eol();
        } else if self.cur() == b';' {
            self.next();
            self.skip_blanks_and_eol();
        } else {
            return Err(self.err("expecting a separator"));
        }
        Ok(())
    }
}

/// Parses configuration text. `filename` is only used in error messages.
pub fn parse(filename: &str, content: &[u8]) -> Result<Conf, ConfigError> {
    let mut p = Parser {
        buf: content,
        pos: 0,
        line: 1,
        filename,
    };
    let mut conf = Conf {
        filename: filename.to_string(),
        entries: Vec::new(),
    };
    while !p.at_end() {
        if let Some(entry) = p.parse_statement()? {
            conf.entries.push(entry);
        }
        p.parse_separator()?;
    }
    Ok(conf)
}

/// Reads and parses a file, with libvirt's 10 MiB cap and error texts.
pub fn read_file(path: &Path) -> Result<Conf, ConfigError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| ConfigError::Open {
        path: shown.clone(),
        reason: strerror(&e),
    })?;
    let mut content = Vec::new();
    file.take(MAX_CONFIG_FILE_SIZE + 1)
        .read_to_end(&mut content)
        .map_err(|e| ConfigError::Read {
            path: shown.clone(),
            reason: strerror(&e),
        })?;
    if content.len() as u64 > MAX_CONFIG_FILE_SIZE {
        return Err(ConfigError::Read {
            path: shown,
            reason: strerror(&io::Error::from_raw_os_error(libc::E2BIG)),
        });
    }
    parse(&shown, &content)
}

/// A daemon's own keys (virtlogd's `max_size` and cleaner keys, virtlockd's lease keys),
/// declared, defaulted and validated in that daemon's crate; common reads only the keys
/// both daemons share and calls this for the rest.
pub trait DaemonKeys: Sized + Default {
    /// Reads the daemon's keys from a parsed file over their defaults, in libvirt's order
    /// (so the first bad key is the one reported). Called after the shared keys: a bad
    /// shared key is reported before a bad daemon key, as libvirt does.
    fn from_conf(conf: &Conf) -> Result<Self, ConfigError>;
}

/// No keys of its own: the shared keys alone.
impl DaemonKeys for () {
    fn from_conf(_conf: &Conf) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// The typed settings of `virtlogd.conf` / `virtlockd.conf`: the keys both daemons read
/// and `K`, the daemon's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig<K = ()> {
    /// 0 = not set (library default 3); 1 debug .. 4 error. Validated by `logging`.
    pub log_level: u32,
    /// `log_filters`, unvalidated.
    pub log_filters: Option<String>,
    /// `log_outputs`, unvalidated.
    pub log_outputs: Option<String>,
    /// Main socket connection limit.
    pub max_clients: u32,
    /// Admin socket connection limit.
    pub admin_max_clients: u32,
    /// The daemon's own keys.
    pub own: K,
}

impl<K: Default> Default for DaemonConfig<K> {
    fn default() -> Self {
        DaemonConfig {
            log_level: 0,
            log_filters: None,
            log_outputs: None,
            max_clients: 1024,
            admin_max_clients: 5000,
            own: K::default(),
        }
    }
}

impl<K: DaemonKeys> DaemonConfig<K> {
    /// Applies the shared keys, then the daemon's own, from a parsed file over the
    /// defaults, in libvirt's order (so the first bad key is the one reported).
    pub fn from_conf(conf: &Conf) -> Result<DaemonConfig<K>, ConfigError> {
        let uint = u64::from(u32::MAX);
        let mut c = DaemonConfig::<()>::default();
        if let Some(v) = conf.get_unsigned("log_level", uint)? {
            c.log_level = v as u32;
        }
        if let Some(v) = conf.get_string("log_filters")? {
            c.log_filters = Some(v);
        }
        if let Some(v) = conf.get_string("log_outputs")? {
            c.log_outputs = Some(v);
        }
        if let Some(v) = conf.get_unsigned("max_clients", uint)? {
            c.max_clients = v as u32;
        }
        if let Some(v) = conf.get_unsigned("admin_max_clients", uint)? {
            c.admin_max_clients = v as u32;
        }
        Ok(c.with_own(K::from_conf(conf)?))
    }
}

impl<K> DaemonConfig<K> {
    /// The same shared keys with other own keys.
    pub fn with_own<O>(self, own: O) -> DaemonConfig<O> {
        DaemonConfig {
            log_level: self.log_level,
            log_filters: self.log_filters,
            log_outputs: self.log_outputs,
            max_clients: self.max_clients,
            admin_max_clients: self.admin_max_clients,
            own,
        }
    }

    /// The shared keys alone (what the front-end keeps).
    pub fn shared(&self) -> DaemonConfig {
        DaemonConfig {
            log_level: self.log_level,
            log_filters: self.log_filters.clone(),
            log_outputs: self.log_outputs.clone(),
            max_clients: self.max_clients,
            admin_max_clients: self.admin_max_clients,
            own: (),
        }
    }
}

/// Loads the daemon configuration. With `explicit == false` (the implicit
/// default path) a missing file yields the defaults; with `explicit == true`
/// (`-f FILE`) a missing file is an error.
pub fn load<K: DaemonKeys>(path: &Path, explicit: bool) -> Result<DaemonConfig<K>, ConfigError> {
    if !explicit {
        // libvirt checks access(R_OK) and only skips on ENOENT.
        if let Err(e) = nix::unistd::access(path, nix::unistd::AccessFlags::R_OK) {
            if e == nix::errno::Errno::ENOENT {
                return Ok(DaemonConfig::default());
            }
        }
    }
    let conf = read_file(path)?;
    DaemonConfig::from_conf(&conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Conf, ConfigError> {
        parse("t.conf", s.as_bytes())
    }

    fn err(s: &str) -> String {
        match p(s) {
            Ok(c) => panic!("expected an error for {s:?}, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn basic_statements() {
        let c = p("a = 1\nb=\"x y\"; c = 'z' # comment\n# full line\n\n  d\t=\t-5\n").unwrap();
        assert_eq!(
            c.entries,
            vec![
                ("a".into(), Value::Unsigned(1)),
                ("b".into(), Value::String("x y".into())),
                ("c".into(), Value::String("z".into())),
                ("d".into(), Value::Signed(-5)),
            ]
        );
        assert_eq!(p("").unwrap().entries, vec![]);
        assert_eq!(p("# only\n").unwrap().entries, vec![]);
        assert_eq!(p("a=1").unwrap().get("a"), Some(&Value::Unsigned(1)));
        assert_eq!(p("a=+7;b=2").unwrap().get("b"), Some(&Value::Unsigned(2)));
        assert_eq!(
            p("a_b9 = 1\r\n").unwrap().get("a_b9"),
            Some(&Value::Unsigned(1))
        );
        assert_eq!(
            p("\n\n# c\n x=1 ;\n").unwrap().get("x"),
            Some(&Value::Unsigned(1))
        );
    }

    #[test]
    fn strings() {
        let c = p("a = \"\"\"line1\nline2 \"quoted\" \"\"\"\nb = 'he said \"hi\"'").unwrap();
        assert_eq!(
            c.get("a"),
            Some(&Value::String("line1\nline2 \"quoted\" ".into()))
        );
        assert_eq!(c.get("b"), Some(&Value::String("he said \"hi\"".into())));
        // No escapes.
        assert_eq!(
            p(r#"a = "x\n""#).unwrap().get("a"),
            Some(&Value::String("x\\n".into()))
        );
        // An empty "" is a normal string (too short for a triple quote).
        assert_eq!(
            p("a = \"\"").unwrap().get("a"),
            Some(&Value::String(String::new()))
        );
        // Line count goes on after a multi-line string.
        assert_eq!(
            err("a = \"\"\"x\ny\"\"\"\nb c"),
            "configuration file syntax error: t.conf:3: expecting an assignment"
        );
    }

    #[test]
    fn lists() {
        let c = p("a = [ 1, \"two\",\n  'three', ]\nb = []\nc = [\n]\nd=[[1],[]]").unwrap();
        assert_eq!(
            c.get("a"),
            Some(&Value::List(vec![
                Value::Unsigned(1),
                Value::String("two".into()),
                Value::String("three".into())
            ]))
        );
        assert_eq!(c.get("b"), Some(&Value::List(vec![])));
        assert_eq!(c.get("c"), Some(&Value::List(vec![])));
        assert_eq!(
            c.get("d"),
            Some(&Value::List(vec![
                Value::List(vec![Value::Unsigned(1)]),
                Value::List(vec![])
            ]))
        );
    }

    /// 11.3 refuses what 9.0 wrapped (the behaviour change of issue 14): any number
    /// beyond `i64::MAX`, under any key, fails the file.
    #[test]
    fn integers_overflow_as_11_3() {
        let c = p("a = 9223372036854775807\nb = -9223372036854775807\nc=-0\nd=+7").unwrap();
        assert_eq!(c.get("a"), Some(&Value::Unsigned(i64::MAX as u64)));
        assert_eq!(c.get("b"), Some(&Value::Signed(-i64::MAX)));
        assert_eq!(c.get("c"), Some(&Value::Signed(0)));
        assert_eq!(c.get("d"), Some(&Value::Unsigned(7)));
        for (text, line) in [
            ("a = 9223372036854775808", 1),
            ("a = 18446744073709551615", 1),
            ("a = 1\n\nunknown_key = 99999999999999999999999", 3),
            ("a = -9223372036854775808", 1),
            ("a = [1, 99999999999999999999]", 1),
        ] {
            assert_eq!(
                err(text),
                format!("numerical overflow: t.conf:{line}: numeric overflow in conf value"),
                "{text}"
            );
        }
    }

    #[test]
    fn syntax_errors() {
        let pre = "configuration file syntax error: t.conf:";
        assert_eq!(err("a 1"), format!("{pre}1: expecting an assignment"));
        assert_eq!(err("\n\na = "), format!("{pre}3: expecting a value"));
        assert_eq!(err("a = x"), format!("{pre}1: expecting a value"));
        assert_eq!(
            err("a = \"abc\nb=1"),
            format!("{pre}1: unterminated string")
        );
        assert_eq!(err("a = 'abc"), format!("{pre}1: unterminated string"));
        assert_eq!(
            err("a = \"\"\"abc\n\n"),
            format!("{pre}1: unterminated string")
        );
        assert_eq!(
            err("a = \"\"\"abc\n\nxyz\n"),
            format!("{pre}3: unterminated string")
        );
        assert_eq!(err("a = -"), format!("{pre}1: unterminated number"));
        assert_eq!(err("a = +x"), format!("{pre}1: unterminated number"));
        assert_eq!(err("a = 1 2"), format!("{pre}1: expecting a separator"));
        assert_eq!(err("a = 12abc"), format!("{pre}1: expecting a separator"));
        assert_eq!(
            err("a = [1, 2"),
            format!("{pre}1: list is not closed with ]")
        );
        assert_eq!(
            err("a = [1\n\n"),
            format!("{pre}3: list is not closed with ]")
        );
        assert_eq!(err("1 = 2"), format!("{pre}1: expecting a name"));
        assert_eq!(err("a=1\n_x = 2"), format!("{pre}2: expecting a name"));
        assert_eq!(
            err("a = [1 2]"),
            format!("{pre}1: expecting a separator in list")
        );
        // A statement must start a line: a blank-only tail after ';' is fine,
        // but a trailing lone ';' without a following statement is not.
        assert_eq!(err("a=1;;"), format!("{pre}1: expecting a name"));
        // Deeply nested lists are refused rather than overflowing the stack.
        let deep = format!("a = {}", "[".repeat(10_000));
        assert!(err(&deep).starts_with(pre));
    }
}
