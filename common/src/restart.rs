//! The exec-restart state file (SIGUSR1), in libvirt 9.0's JSON format.
//!
//! On SIGUSR1 the daemon describes its servers, services, listening sockets, clients and
//! its own handler state (virtlogd's open log pipes, virtlockd's lockspaces) in one JSON
//! document, clears close-on-exec on every descriptor named in it, writes the document to
//! the state file and execs itself with the original argv. The new image (same pid) reads
//! the file back, unlinks it and adopts the descriptors.
//!
//! The format must be exactly libvirt's, in both directions: when a C daemon is replaced by
//! ours, the C process writes the file and execs us; when ours is rolled back, we write it
//! and exec the C binary. See `rpc-wire.md` §6, `virtlogd.md` §7 and `virtlockd.md` §6.
//!
//! Reading tolerates every older shape libvirt itself tolerates (servers as an object, as an
//! array, or absent; virtlockd's pre-2015 `server` key; optional `max_anonymous_clients`,
//! `next_client_id`, client `id`, `auth_pending`, `conn_time`, socket `unlinkUNIX`).
//! A missing required key is reported by name together with where it was expected.
//!
//! Writing produces 11.3's text byte for byte (its empty arrays are `[]`; 9.0 wrote
//! `[`, a blank line, `]`: both daemons parse either) and libvirt's key order and JSON
//! types, the same in 9.0 and 11.3: `magic` is a decimal string,
//! booleans are JSON booleans, `keepaliveInterval` −1 is written as 4294967295,
//! `conn_time` is left out when 0, and the servers object is sorted by name, so `"admin"`
//! comes before the daemon's own server.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Largest state file the new image accepts (libvirt reads at most 10 MiB).
pub const STATE_FILE_MAX_LEN: u64 = 10 * 1024 * 1024;

/// Name of the admin server in the `servers` object.
pub const ADMIN_SERVER: &str = "admin";
/// Name of virtlogd's own server.
pub const VIRTLOGD_SERVER: &str = "virtlogd";
/// Name of virtlockd's own server.
pub const VIRTLOCKD_SERVER: &str = "virtlockd";

/// Mode the state file is created with (before the umask), as libvirt does.
pub const STATE_FILE_MODE: u32 = 0o700;

/// `VIR_NET_SERVER_SERVICE_AUTH_NONE`: the only auth method these daemons use.
pub const AUTH_NONE: i32 = 0;

/// Lockspace resource flags: the protocol's ACQUIRE flags, as the state file records them.
pub use vh_proto::lock::{
    ACQUIRE_AUTOCREATE as RESOURCE_AUTOCREATE, ACQUIRE_SHARED as RESOURCE_SHARED,
};

/// Why a state file could not be read or a state document could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// Opening or reading the state file failed.
    #[error("Unable to read restart state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file is larger than [`STATE_FILE_MAX_LEN`].
    #[error("Restart state file {path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    /// The document is not JSON (or not UTF-8).
    #[error("Unable to parse restart state JSON: {0}")]
    Parse(String),
    /// The top-level `magic` string is absent (or not a string).
    #[error("Missing magic data in JSON document")]
    MissingMagic,
    /// A required key is absent.
    #[error("Missing {key} data in JSON document (in {at})")]
    Missing { key: String, at: String },
    /// A key is present with the wrong JSON type or an out-of-range value.
    #[error("Malformed {key} data in JSON document (in {at}): expected {expected}")]
    Malformed {
        key: String,
        at: String,
        expected: &'static str,
    },
    /// The document is well-formed but not acceptable (limits, server names, ...).
    #[error("Invalid restart state (in {at}): {reason}")]
    Invalid { at: String, reason: String },
}

impl RestartError {
    /// The key the error is about, for `Missing` and `Malformed`.
    pub fn key(&self) -> Option<&str> {
        match self {
            RestartError::Missing { key, .. } | RestartError::Malformed { key, .. } => Some(key),
            RestartError::MissingMagic => Some("magic"),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, RestartError>;

/// The `magic` value for a process: its pid as a decimal string.
pub fn restart_magic(pid: u32) -> String {
    pid.to_string()
}

// ---------------------------------------------------------------------------------------
// Reading helpers: typed access to one JSON object, with the object's location for errors.
// ---------------------------------------------------------------------------------------

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

fn display_at(at: &str) -> String {
    if at.is_empty() {
        "top level".to_string()
    } else {
        at.to_string()
    }
}

fn missing(key: &str, at: &str) -> RestartError {
    RestartError::Missing {
        key: key.to_string(),
        at: display_at(at),
    }
}

fn malformed(key: &str, at: &str, expected: &'static str) -> RestartError {
    RestartError::Malformed {
        key: key.to_string(),
        at: display_at(at),
        expected,
    }
}

fn invalid(at: &str, reason: impl Into<String>) -> RestartError {
    RestartError::Invalid {
        at: display_at(at),
        reason: reason.into(),
    }
}

/// One JSON object being read, and where it sits in the document (`daemon.servers.admin`).
struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: String,
}

impl<'a> Obj<'a> {
    /// `value` must be an object; `key` names it in the error if it is not.
    fn new(value: &'a Value, key: &str, at: String) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj { map, at }),
            _ => {
                // Report against the parent location, naming the offending key.
                let parent = at
                    .rsplit_once('.')
                    .map(|(p, _)| p.to_string())
                    .unwrap_or_default();
                Err(malformed(key, &parent, "an object"))
            }
        }
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn req(&self, key: &str) -> Result<&'a Value> {
        self.map.get(key).ok_or_else(|| missing(key, &self.at))
    }

    fn bad(&self, key: &str, expected: &'static str) -> RestartError {
        malformed(key, &self.at, expected)
    }

    fn child_at(&self, key: &str) -> String {
        join(&self.at, key)
    }

    fn u32(&self, key: &str) -> Result<u32> {
        let v = self.req(key)?;
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.bad(key, "an unsigned 32-bit integer"))
    }

    fn u64(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        v.as_u64()
            .ok_or_else(|| self.bad(key, "an unsigned 64-bit integer"))
    }

    fn i32(&self, key: &str) -> Result<i32> {
        let v = self.req(key)?;
        v.as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| self.bad(key, "a signed 32-bit integer"))
    }

    fn i64(&self, key: &str) -> Result<i64> {
        let v = self.req(key)?;
        v.as_i64()
            .ok_or_else(|| self.bad(key, "a signed 64-bit integer"))
    }

    fn bool(&self, key: &str) -> Result<bool> {
        let v = self.req(key)?;
        v.as_bool().ok_or_else(|| self.bad(key, "a boolean"))
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| self.bad(key, "a string"))
    }

    fn uuid(&self, key: &str) -> Result<Uuid> {
        let s = self.str(key)?;
        Uuid::parse_str(s).map_err(|_| self.bad(key, "a UUID string"))
    }

    fn array(&self, key: &str) -> Result<&'a Vec<Value>> {
        let v = self.req(key)?;
        v.as_array().ok_or_else(|| self.bad(key, "an array"))
    }

    fn object(&self, key: &str) -> Result<Obj<'a>> {
        let v = self.req(key)?;
        Obj::new(v, key, self.child_at(key))
    }
}

/// Elements of an array that must all be objects.
fn objects<'a>(items: &'a [Value], key: &str, at: &str) -> Result<Vec<Obj<'a>>> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(map) => Ok(Obj {
                map,
                at: index(at, i),
            }),
            _ => Err(malformed(&format!("{key}[{i}]"), at, "an object")),
        })
        .collect()
}

fn root(value: &Value) -> Result<Obj<'_>> {
    match value {
        Value::Object(map) => Ok(Obj {
            map,
            at: String::new(),
        }),
        _ => Err(malformed("document", "", "a JSON object")),
    }
}

fn parse_text(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| RestartError::Parse(e.to_string()))
}

/// libvirt's layout (two-space pretty printing, final newline), written straight from
/// the typed document.
fn pretty_doc<T: Serialize>(doc: &T) -> String {
    // Cannot fail: every map key is a string and every value a plain JSON type.
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// Serialize/Deserialize through `serde_json::Value`, using the hand-written rules.
macro_rules! serde_via_value {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                self.to_value().serialize(serializer)
            }
        }

        deserialize_via_value!($ty);
    };
}

/// For the types whose lists grow with what the daemon holds (log files, resources):
/// they implement `Serialize` directly (building a `Value` per entry would cost a
/// millisecond per thousand entries of re-exec downtime); `to_value` goes through it and
/// Deserialize through `Value`.
macro_rules! serialized_directly {
    ($ty:ty) => {
        impl $ty {
            /// The document as a `Value` (same keys and order as the text).
            pub fn to_value(&self) -> Value {
                // Cannot fail: every map key is a string.
                serde_json::to_value(self).unwrap_or(Value::Null)
            }
        }

        deserialize_via_value!($ty);
    };
}

/// Deserialize through `serde_json::Value`, using the hand-written rules.
macro_rules! deserialize_via_value {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                let value = Value::deserialize(deserializer)?;
                Self::from_value(&value).map_err(serde::de::Error::custom)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// SOCKET
// ---------------------------------------------------------------------------------------

/// One `virNetSocket`: a listening socket of a service or the connection of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketState {
    pub fd: RawFd,
    /// Always −1 here (only command-backed sockets have one).
    pub errfd: RawFd,
    /// Always 0 here (only command-backed sockets have one).
    pub pid: i32,
    /// true for accepted connections, false for listening sockets.
    pub is_client: bool,
    /// true if the daemon bound the socket itself and must unlink its path on close;
    /// false for sockets from systemd and for connections.
    pub unlink_unix: bool,
}

impl SocketState {
    /// A listening socket (`unlink_unix`: whether we bound it ourselves).
    pub fn listener(fd: RawFd, unlink_unix: bool) -> Self {
        SocketState {
            fd,
            errfd: -1,
            pid: 0,
            is_client: false,
            unlink_unix,
        }
    }

    /// An accepted connection.
    pub fn connection(fd: RawFd) -> Self {
        SocketState {
            fd,
            errfd: -1,
            pid: 0,
            is_client: true,
            unlink_unix: false,
        }
    }

    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "sock", String::from("sock"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let fd = o.i32("fd")?;
        let pid = o.i32("pid")?;
        let errfd = o.i32("errfd")?;
        let is_client = o.bool("isClient")?;
        // libvirt falls back to the default both when the key is absent and when it is
        // not a boolean.
        let unlink_unix = o
            .get("unlinkUNIX")
            .and_then(Value::as_bool)
            .unwrap_or(!is_client);
        Ok(SocketState {
            fd,
            errfd,
            pid,
            is_client,
            unlink_unix,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("fd".into(), self.fd.into());
        m.insert("errfd".into(), self.errfd.into());
        m.insert("pid".into(), self.pid.into());
        m.insert("isClient".into(), self.is_client.into());
        m.insert("unlinkUNIX".into(), self.unlink_unix.into());
        Value::Object(m)
    }

    fn push_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.fd);
        if self.errfd != -1 {
            out.push(self.errfd);
        }
    }
}

serde_via_value!(SocketState);

// ---------------------------------------------------------------------------------------
// SERVICE
// ---------------------------------------------------------------------------------------

/// One `virNetServerService`: a set of listening sockets sharing auth settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub auth: i32,
    pub readonly: bool,
    pub nrequests_client_max: u32,
    pub socks: Vec<SocketState>,
}

impl ServiceState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "service", String::from("service"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let auth = o.i32("auth")?;
        let readonly = o.bool("readonly")?;
        let nrequests_client_max = o.u32("nrequests_client_max")?;
        let socks_at = o.child_at("socks");
        let socks = objects(o.array("socks")?, "socks", &o.at)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SocketState::parse(&Obj {
                    map: s.map,
                    at: index(&socks_at, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ServiceState {
            auth,
            readonly,
            nrequests_client_max,
            socks,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("auth".into(), self.auth.into());
        m.insert("readonly".into(), self.readonly.into());
        m.insert(
            "nrequests_client_max".into(),
            self.nrequests_client_max.into(),
        );
        m.insert(
            "socks".into(),
            Value::Array(self.socks.iter().map(SocketState::to_value).collect()),
        );
        Value::Object(m)
    }
}

serde_via_value!(ServiceState);

// ---------------------------------------------------------------------------------------
// CLIENT
// ---------------------------------------------------------------------------------------

/// One connected `virNetServerClient`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientState {
    pub id: u64,
    pub auth: i32,
    pub auth_pending: bool,
    pub readonly: bool,
    pub nrequests_max: u32,
    /// Connect time in epoch seconds; 0 = unknown (then not written).
    pub conn_time: i64,
    pub sock: SocketState,
    /// Daemon-specific data: `{}` for virtlogd and the admin servers, a
    /// [`LockClientPrivate`] for virtlockd's main server.
    pub private_data: Value,
    /// Our own key: I/O the client had half done at hand-off. libvirt looks up the
    /// keys it knows by name and never sees this one.
    pub carry: Option<ClientCarry>,
}

/// Key of [`ClientCarry`] in a CLIENT object.
pub const CARRY_KEY: &str = "virtHelpersCarry";

/// A client's half-done I/O at hand-off (`"virtHelpersCarry"`): the bytes live in a
/// memory file handed over like the sockets, so the state document stays small
/// whatever a slow peer left half sent or half read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCarry {
    /// The memory file: `input` bytes, then `output` bytes.
    pub fd: RawFd,
    /// Bytes of a request read so far (length word included).
    pub input: u64,
    /// Fds received with that request.
    pub input_fds: Vec<RawFd>,
    /// Bytes of a reply not yet written.
    pub output: u64,
    /// Fds of that reply not yet sent.
    pub output_fds: Vec<RawFd>,
}

impl ClientCarry {
    fn parse(o: &Obj<'_>) -> Result<Self> {
        let fds = |key: &str| -> Result<Vec<RawFd>> {
            o.array(key)?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_i64()
                        .and_then(|n| RawFd::try_from(n).ok())
                        .ok_or_else(|| malformed(&format!("{key}[{i}]"), &o.at, "an fd number"))
                })
                .collect()
        };
        Ok(ClientCarry {
            fd: o.i32("fd")?,
            input: o.u64("input")?,
            input_fds: fds("inputFds")?,
            output: o.u64("output")?,
            output_fds: fds("outputFds")?,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("fd".into(), self.fd.into());
        m.insert("input".into(), self.input.into());
        m.insert("inputFds".into(), self.input_fds.clone().into());
        m.insert("output".into(), self.output.into());
        m.insert("outputFds".into(), self.output_fds.clone().into());
        Value::Object(m)
    }

    fn push_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.fd);
        out.extend(&self.input_fds);
        out.extend(&self.output_fds);
    }
}

impl ClientState {
    /// Reads a client; a client without `id` gets `*next_client_id`, which is advanced
    /// (libvirt allocates a fresh id from the server in that case).
    fn parse(o: &Obj<'_>, next_client_id: &mut u64) -> Result<Self> {
        let auth = o.i32("auth")?;
        let auth_pending = if o.has("auth_pending") {
            let pending = o.bool("auth_pending")?;
            if pending && auth == AUTH_NONE {
                return Err(invalid(
                    &o.at,
                    "Invalid auth_pending and auth combination in JSON state document",
                ));
            }
            pending
        } else {
            // Only AUTH_NONE implies an authenticated client.
            auth != AUTH_NONE
        };
        let readonly = o.bool("readonly")?;
        let nrequests_max = o.u32("nrequests_max")?;
        let sock = o.object("sock")?;
        let id = if o.has("id") {
            o.u64("id")?
        } else {
            let id = *next_client_id;
            *next_client_id = next_client_id.saturating_add(1);
            id
        };
        let conn_time = if o.has("conn_time") {
            o.i64("conn_time")?
        } else {
            0
        };
        let sock = SocketState::parse(&sock)?;
        let private_data = o.req("privateData")?.clone();
        let carry = if o.has(CARRY_KEY) {
            Some(ClientCarry::parse(&o.object(CARRY_KEY)?)?)
        } else {
            None
        };
        Ok(ClientState {
            id,
            auth,
            auth_pending,
            readonly,
            nrequests_max,
            conn_time,
            sock,
            private_data,
            carry,
        })
    }

    /// Reads a client on its own; a missing `id` becomes 1.
    pub fn from_value(value: &Value) -> Result<Self> {
        let mut next = 1;
        Self::parse(
            &Obj::new(value, "client", String::from("client"))?,
            &mut next,
        )
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), self.id.into());
        m.insert("auth".into(), self.auth.into());
        m.insert("auth_pending".into(), self.auth_pending.into());
        m.insert("readonly".into(), self.readonly.into());
        m.insert("nrequests_max".into(), self.nrequests_max.into());
        if self.conn_time != 0 {
            m.insert("conn_time".into(), self.conn_time.into());
        }
        m.insert("sock".into(), self.sock.to_value());
        m.insert("privateData".into(), self.private_data.clone());
        if let Some(c) = &self.carry {
            m.insert(CARRY_KEY.into(), c.to_value());
        }
        Value::Object(m)
    }

    /// virtlockd's private data of this client.
    pub fn lock_private(&self) -> Result<LockClientPrivate> {
        LockClientPrivate::from_value(&self.private_data)
    }
}

serde_via_value!(ClientState);

// ---------------------------------------------------------------------------------------
// SERVER
// ---------------------------------------------------------------------------------------

/// One `virNetServer` ("admin", "virtlogd" or "virtlockd").
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub min_workers: u32,
    pub max_workers: u32,
    pub priority_workers: u32,
    pub max_clients: u32,
    /// At most `max_clients`.
    pub max_anonymous_clients: u32,
    /// −1 = keepalive disabled (what these daemons use); written as 4294967295.
    pub keepalive_interval: i64,
    pub keepalive_count: u32,
    /// Next client id to hand out (≥ 1).
    pub next_client_id: u64,
    pub services: Vec<ServiceState>,
    pub clients: Vec<ClientState>,
}

impl ServerState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "server", String::from("server"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let min_workers = o.u32("min_workers")?;
        let max_workers = o.u32("max_workers")?;
        let priority_workers = o.u32("priority_workers")?;
        let max_clients = o.u32("max_clients")?;
        let max_anonymous_clients = if o.has("max_anonymous_clients") {
            let n = o.u32("max_anonymous_clients")?;
            if n > max_clients {
                return Err(invalid(
                    &o.at,
                    format!(
                        "max_anonymous_clients ({n}) must not exceed max_clients ({max_clients})"
                    ),
                ));
            }
            n
        } else {
            max_clients
        };
        let keepalive_interval = keepalive_interval(o)?;
        let keepalive_count = o.u32("keepaliveCount")?;
        let mut next_client_id = match o.get("next_client_id").and_then(Value::as_u64) {
            Some(n) => n,
            None => {
                tracing::warn!(
                    "Missing next_client_id data in JSON document (in {}), using 1",
                    display_at(&o.at)
                );
                1
            }
        };

        let services_at = o.child_at("services");
        let services = objects(o.array("services")?, "services", &o.at)?
            .iter()
            .enumerate()
            .map(|(i, s)| {
                ServiceState::parse(&Obj {
                    map: s.map,
                    at: index(&services_at, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let clients_at = o.child_at("clients");
        let mut clients = Vec::new();
        for (i, c) in objects(o.array("clients")?, "clients", &o.at)?
            .iter()
            .enumerate()
        {
            let c = Obj {
                map: c.map,
                at: index(&clients_at, i),
            };
            clients.push(ClientState::parse(&c, &mut next_client_id)?);
        }

        Ok(ServerState {
            min_workers,
            max_workers,
            priority_workers,
            max_clients,
            max_anonymous_clients,
            keepalive_interval,
            keepalive_count,
            next_client_id,
            services,
            clients,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("min_workers".into(), self.min_workers.into());
        m.insert("max_workers".into(), self.max_workers.into());
        m.insert("priority_workers".into(), self.priority_workers.into());
        m.insert("max_clients".into(), self.max_clients.into());
        m.insert(
            "max_anonymous_clients".into(),
            self.max_anonymous_clients.into(),
        );
        // libvirt stores an int and writes it as unsigned: −1 becomes 4294967295.
        m.insert(
            "keepaliveInterval".into(),
            (self.keepalive_interval as u32).into(),
        );
        m.insert("keepaliveCount".into(), self.keepalive_count.into());
        m.insert("next_client_id".into(), self.next_client_id.into());
        m.insert(
            "services".into(),
            Value::Array(self.services.iter().map(ServiceState::to_value).collect()),
        );
        m.insert(
            "clients".into(),
            Value::Array(self.clients.iter().map(ClientState::to_value).collect()),
        );
        Value::Object(m)
    }

    /// Every descriptor that must survive the exec: listening sockets, client sockets,
    /// and their `errfd`s when set.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut out = Vec::new();
        for svc in &self.services {
            for s in &svc.socks {
                s.push_fds(&mut out);
            }
        }
        for c in &self.clients {
            c.sock.push_fds(&mut out);
            if let Some(carry) = &c.carry {
                carry.push_fds(&mut out);
            }
        }
        out
    }
}

/// `keepaliveInterval` is read as unsigned and used as an int: 4294967295 means −1.
/// A negative number (what a signed writer would produce) is accepted as well.
fn keepalive_interval(o: &Obj<'_>) -> Result<i64> {
    let key = "keepaliveInterval";
    let v = o.req(key)?;
    if let Some(n) = v.as_u64() {
        if let Ok(n) = u32::try_from(n) {
            return Ok(i64::from(n as i32));
        }
    } else if let Some(n) = v.as_i64() {
        if let Ok(n) = i32::try_from(n) {
            return Ok(i64::from(n));
        }
    }
    Err(o.bad(key, "a 32-bit integer"))
}

serde_via_value!(ServerState);

// ---------------------------------------------------------------------------------------
// DAEMON
// ---------------------------------------------------------------------------------------

/// `virNetDaemon`: the servers by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DaemonState {
    /// In document order when read; written sorted by name.
    pub servers: Vec<(String, ServerState)>,
}

impl DaemonState {
    /// Reads the `daemon` object (or virtlockd's older `server` object). `own_name` is the
    /// daemon's main server ("virtlogd"/"virtlockd"): the name given to a server stored
    /// without one (no `servers` key, or `servers` as an array). Only `own_name` and
    /// "admin" are accepted, and `own_name` must be present.
    pub fn from_value(value: &Value, own_name: &str) -> Result<Self> {
        let o = Obj::new(value, "daemon", String::from("daemon"))?;
        Self::parse(&o, own_name)
    }

    fn parse(o: &Obj<'_>, own_name: &str) -> Result<Self> {
        let mut servers = Vec::new();
        match o.get("servers") {
            // Very old state: the object itself is the one server.
            None => servers.push((own_name.to_string(), ServerState::parse(o)?)),
            Some(Value::Object(map)) => {
                let at = o.child_at("servers");
                for (name, v) in map {
                    if name != own_name && name != ADMIN_SERVER {
                        return Err(invalid(
                            &at,
                            format!("Unexpected server name '{name}' during restart"),
                        ));
                    }
                    let so = Obj::new(v, name, join(&at, name))?;
                    servers.push((name.clone(), ServerState::parse(&so)?));
                }
            }
            Some(Value::Array(items)) => {
                let at = o.child_at("servers");
                // The list of default names holds only the daemon's own server.
                if items.len() > 1 {
                    return Err(invalid(
                        &at,
                        format!(
                            "Server count {} greater than default name count 1",
                            items.len()
                        ),
                    ));
                }
                for so in objects(items, "servers", &o.at)? {
                    servers.push((own_name.to_string(), ServerState::parse(&so)?));
                }
            }
            Some(_) => return Err(o.bad("servers", "an object or an array")),
        }
        if !servers.iter().any(|(n, _)| n == own_name) {
            return Err(invalid(
                &o.at,
                format!("No server named '{own_name}' in JSON document"),
            ));
        }
        Ok(DaemonState { servers })
    }

    /// `{ "servers": { name: SERVER, ... } }`, names sorted (so "admin" comes first).
    pub fn to_value(&self) -> Value {
        let mut sorted: Vec<&(String, ServerState)> = self.servers.iter().collect();
        sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut servers = Map::new();
        for (name, srv) in sorted {
            servers.insert(name.clone(), srv.to_value());
        }
        let mut m = Map::new();
        m.insert("servers".into(), Value::Object(servers));
        Value::Object(m)
    }

    /// The server called `name`.
    pub fn server(&self, name: &str) -> Option<&ServerState> {
        self.servers.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// The server called `name`, mutably.
    pub fn server_mut(&mut self, name: &str) -> Option<&mut ServerState> {
        self.servers
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Descriptors of every server (see [`ServerState::inherited_fds`]).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        self.servers
            .iter()
            .flat_map(|(_, s)| s.inherited_fds())
            .collect()
    }
}

impl Serialize for DaemonState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

// ---------------------------------------------------------------------------------------
// virtlockd client private data
// ---------------------------------------------------------------------------------------

/// `privateData` of a client of virtlockd's main server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockClientPrivate {
    pub restricted: bool,
    pub owner_pid: u32,
    pub owner_id: u32,
    /// Empty for a client that has not registered (libvirt cannot save such a client;
    /// we write "").
    pub owner_name: String,
    /// Nil for a client that has not registered.
    pub owner_uuid: Uuid,
}

impl LockClientPrivate {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(
            value,
            "privateData",
            String::from("privateData"),
        )?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        Ok(LockClientPrivate {
            restricted: o.bool("restricted")?,
            owner_pid: o.u32("ownerPid")?,
            owner_id: o.u32("ownerId")?,
            owner_name: o.str("ownerName")?.to_string(),
            owner_uuid: o.uuid("ownerUUID")?,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("restricted".into(), self.restricted.into());
        m.insert("ownerPid".into(), self.owner_pid.into());
        m.insert("ownerId".into(), self.owner_id.into());
        m.insert("ownerName".into(), self.owner_name.clone().into());
        m.insert(
            "ownerUUID".into(),
            self.owner_uuid.hyphenated().to_string().into(),
        );
        Value::Object(m)
    }
}

serde_via_value!(LockClientPrivate);

// ---------------------------------------------------------------------------------------
// virtlogd: log handler
// ---------------------------------------------------------------------------------------

/// One open domain log: the read end of its pipe and where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFileState {
    pub pipefd: RawFd,
    pub path: String,
    pub driver: String,
    pub domname: String,
    pub domuuid: Uuid,
}

impl LogFileState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "file", String::from("file"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let path = o.str("path")?.to_string();
        let driver = o.str("driver")?.to_string();
        let domname = o.str("domname")?.to_string();
        let domuuid = o.uuid("domuuid")?;
        let pipefd = o.i32("pipefd")?;
        Ok(LogFileState {
            pipefd,
            path,
            driver,
            domname,
            domuuid,
        })
    }
}

impl Serialize for LogFileState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(Some(5))?;
        m.serialize_entry("pipefd", &self.pipefd)?;
        m.serialize_entry("path", &self.path)?;
        m.serialize_entry("driver", &self.driver)?;
        m.serialize_entry("domname", &self.domname)?;
        let mut buf = Uuid::encode_buffer();
        m.serialize_entry(
            "domuuid",
            self.domuuid.hyphenated().encode_lower(&mut buf) as &str,
        )?;
        m.end()
    }
}

serialized_directly!(LogFileState);

/// virtlogd's `handler`: the open log files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogHandlerState {
    pub files: Vec<LogFileState>,
    /// Ours only (`pumpfd`, which libvirt ignores): the log pump's epoll set, with every
    /// pipe of `files` still registered under the token `pipefd + 1`. Handing it over
    /// spares the old image tearing down, and the new one rebuilding, one registration
    /// per log inside the re-exec pause. A C image that gets it only holds one idle fd.
    pub pumpfd: Option<RawFd>,
}

impl LogHandlerState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "handler", String::from("handler"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let at = o.child_at("files");
        let files = objects(o.array("files")?, "files", &o.at)?
            .iter()
            .enumerate()
            .map(|(i, f)| {
                LogFileState::parse(&Obj {
                    map: f.map,
                    at: index(&at, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pumpfd = if o.has("pumpfd") {
            Some(o.i32("pumpfd")?)
        } else {
            None
        };
        Ok(LogHandlerState { files, pumpfd })
    }
}

impl Serialize for LogHandlerState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(Some(1 + usize::from(self.pumpfd.is_some())))?;
        m.serialize_entry("files", &self.files)?;
        if let Some(fd) = self.pumpfd {
            m.serialize_entry("pumpfd", &fd)?;
        }
        m.end()
    }
}

serialized_directly!(LogHandlerState);

// ---------------------------------------------------------------------------------------
// virtlockd: lockspaces
// ---------------------------------------------------------------------------------------

/// One held resource of a lockspace: the open, fcntl-locked file and its owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceState {
    pub name: String,
    pub path: String,
    pub fd: RawFd,
    pub lock_held: bool,
    /// [`RESOURCE_SHARED`] | [`RESOURCE_AUTOCREATE`].
    pub flags: u32,
    /// Owner pids; duplicates are possible.
    pub owners: Vec<u64>,
}

impl ResourceState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "resource", String::from("resource"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let name = o.str("name")?.to_string();
        let path = o.str("path")?.to_string();
        let fd = o.i32("fd")?;
        let lock_held = o.bool("lockHeld")?;
        let flags = o.u32("flags")?;
        let owners = o
            .array("owners")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .ok_or_else(|| malformed(&format!("owners[{i}]"), &o.at, "an unsigned integer"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ResourceState {
            name,
            path,
            fd,
            lock_held,
            flags,
            owners,
        })
    }
}

impl Serialize for ResourceState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(Some(6))?;
        m.serialize_entry("name", &self.name)?;
        m.serialize_entry("path", &self.path)?;
        m.serialize_entry("fd", &self.fd)?;
        m.serialize_entry("lockHeld", &self.lock_held)?;
        m.serialize_entry("flags", &self.flags)?;
        m.serialize_entry("owners", &self.owners)?;
        m.end()
    }
}

serialized_directly!(ResourceState);

/// One lockspace: the default one (no directory) or a directory lockspace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockspaceState {
    /// None for the default lockspace (the key is then not written).
    pub directory: Option<String>,
    pub resources: Vec<ResourceState>,
}

impl LockspaceState {
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, "lockspace", String::from("lockspace"))?)
    }

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let directory = if o.has("directory") {
            Some(o.str("directory")?.to_string())
        } else {
            None
        };
        let at = o.child_at("resources");
        let resources = objects(o.array("resources")?, "resources", &o.at)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ResourceState::parse(&Obj {
                    map: r.map,
                    at: index(&at, i),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LockspaceState {
            directory,
            resources,
        })
    }
}

impl Serialize for LockspaceState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        if let Some(dir) = &self.directory {
            m.serialize_entry("directory", dir)?;
        }
        m.serialize_entry("resources", &self.resources)?;
        m.end()
    }
}

serialized_directly!(LockspaceState);

// ---------------------------------------------------------------------------------------
// Top-level documents
// ---------------------------------------------------------------------------------------

fn magic_of(o: &Obj<'_>) -> Result<String> {
    o.get("magic")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(RestartError::MissingMagic)
}

/// virtlogd's whole state document: `{ daemon, magic, handler }`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogdState {
    pub daemon: DaemonState,
    /// The writer's pid as a decimal string.
    pub magic: String,
    pub handler: LogHandlerState,
    /// Our daemons' own counters (operator metrics), under [`COUNTERS_KEY`]; libvirt 9.0
    /// reads only the keys it knows, so the C daemon ignores it. Written by images
    /// before [`LogdState::log_counters`]; still read from them.
    pub counters: Option<Value>,
    /// Ours only, under [`LOG_COUNTERS_KEY`]: each log's counters (written, dropped,
    /// rotations), one row per entry of `handler.files`, in the same order. Rows of
    /// numbers rather than an object keyed by path: with ten thousand logs the object
    /// was a tree of 40,000 JSON values to build and drop in the old image and to
    /// parse in the new one, about as much of the re-exec pause as all the rest.
    pub log_counters: Option<Vec<[u64; 3]>>,
}

/// Top-level key of the rows of [`LogdState::log_counters`] (ignored by libvirt, as
/// [`COUNTERS_KEY`] is).
pub const LOG_COUNTERS_KEY: &str = "vhLogCounters";

/// Top-level key of the re-exec document holding our counters (see
/// [`LogdState::counters`]). libvirt 9.0 looks its keys up by name and never lists an
/// object's keys, so a document carrying it still restores into the C daemons.
pub const COUNTERS_KEY: &str = "vhCounters";

impl LogdState {
    /// Parses a state document's text.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(doc) = Self::parse_fast(text) {
            return Ok(doc);
        }
        Self::from_value(&parse_text(text)?)
    }

    /// The common case, read straight into typed rows: the file list grows with the
    /// guests, and a `Value` tree of a thousand entries costs about a millisecond of
    /// re-exec downtime to build and another to walk. Anything unusual (a wrong type, a
    /// duplicate key, a bad UUID) gives `None`, and the `Value` walk then reports it
    /// precisely; a document both paths accept gives the same result from either.
    fn parse_fast(text: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Doc {
            daemon: Value,
            magic: String,
            handler: Handler,
            #[serde(rename = "vhCounters", default)]
            counters: Option<Value>,
            #[serde(rename = "vhLogCounters", default)]
            log_counters: Option<Vec<[u64; 3]>>,
        }
        #[derive(Deserialize)]
        struct Handler {
            files: Vec<File>,
            #[serde(default)]
            pumpfd: Option<i32>,
        }
        #[derive(Deserialize)]
        struct File {
            pipefd: i32,
            path: String,
            driver: String,
            domname: String,
            domuuid: String,
        }
        let doc: Doc = serde_json::from_str(text).ok()?;
        let daemon = Obj::new(&doc.daemon, "daemon", String::from("daemon")).ok()?;
        let daemon = DaemonState::parse(&daemon, VIRTLOGD_SERVER).ok()?;
        let files = doc
            .handler
            .files
            .into_iter()
            .map(|f| {
                Some(LogFileState {
                    pipefd: f.pipefd,
                    path: f.path,
                    driver: f.driver,
                    domname: f.domname,
                    domuuid: Uuid::parse_str(&f.domuuid).ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(LogdState {
            daemon,
            magic: doc.magic,
            handler: LogHandlerState {
                files,
                pumpfd: doc.handler.pumpfd,
            },
            counters: doc.counters,
            log_counters: doc.log_counters,
        })
    }

    pub fn from_value(value: &Value) -> Result<Self> {
        let o = root(value)?;
        let magic = magic_of(&o)?;
        let daemon = o.object("daemon")?;
        let daemon = DaemonState::parse(&daemon, VIRTLOGD_SERVER)?;
        let handler = LogHandlerState::parse(&o.object("handler")?)?;
        // Metrics only: rows that are not rows of three numbers are dropped, never
        // a reason to refuse the document.
        let log_counters = o
            .get(LOG_COUNTERS_KEY)
            .and_then(|v| serde_json::from_value::<Vec<[u64; 3]>>(v.clone()).ok());
        Ok(LogdState {
            daemon,
            magic,
            handler,
            counters: o.get(COUNTERS_KEY).cloned(),
            log_counters,
        })
    }

    /// The document as libvirt writes it: pretty-printed, keys in libvirt's order.
    pub fn to_json_string(&self) -> String {
        pretty_doc(self)
    }

    /// Every descriptor that must survive the exec: sockets and log pipe read ends.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut out = self.daemon.inherited_fds();
        out.extend(self.handler.files.iter().map(|f| f.pipefd));
        out
    }
}

impl Serialize for LogdState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let extra = usize::from(self.counters.is_some()) + usize::from(self.log_counters.is_some());
        let mut m = serializer.serialize_map(Some(3 + extra))?;
        m.serialize_entry("daemon", &self.daemon)?;
        m.serialize_entry("magic", &self.magic)?;
        m.serialize_entry("handler", &self.handler)?;
        if let Some(c) = &self.counters {
            m.serialize_entry(COUNTERS_KEY, c)?;
        }
        if let Some(rows) = &self.log_counters {
            m.serialize_entry(LOG_COUNTERS_KEY, rows)?;
        }
        m.end()
    }
}

serialized_directly!(LogdState);

/// virtlockd's whole state document: `{ daemon, defaultLockspace, lockspaces, magic }`.
#[derive(Debug, Clone, PartialEq)]
pub struct LockdState {
    pub daemon: DaemonState,
    pub default_lockspace: LockspaceState,
    pub lockspaces: Vec<LockspaceState>,
    /// The writer's pid as a decimal string.
    pub magic: String,
    /// Our counters (see [`LogdState::counters`]).
    pub counters: Option<Value>,
}

impl LockdState {
    /// Parses a state document's text.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(doc) = Self::parse_fast(text) {
            return Ok(doc);
        }
        Self::from_value(&parse_text(text)?)
    }

    /// The common case, read straight into typed rows (as [`LogdState::parse_fast`]):
    /// a `Value` tree of 10,000 leases cost about 15 ms of the re-exec pause to build,
    /// walk and free. Anything unusual (a wrong type, a duplicate key, the pre-2015
    /// `server` key) gives `None`, and the `Value` walk then reports it precisely; a
    /// document both paths accept gives the same result from either.
    fn parse_fast(text: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Doc {
            daemon: Value,
            magic: String,
            #[serde(rename = "defaultLockspace")]
            default_lockspace: Space,
            lockspaces: Vec<Space>,
            #[serde(rename = "vhCounters", default)]
            counters: Option<Value>,
        }
        #[derive(Deserialize)]
        struct Space {
            directory: Option<String>,
            resources: Vec<Res>,
        }
        #[derive(Deserialize)]
        struct Res {
            name: String,
            path: String,
            fd: i32,
            #[serde(rename = "lockHeld")]
            lock_held: bool,
            flags: u32,
            owners: Vec<u64>,
        }
        let doc: Doc = serde_json::from_str(text).ok()?;
        let space = |s: Space| LockspaceState {
            directory: s.directory,
            resources: s
                .resources
                .into_iter()
                .map(|r| ResourceState {
                    name: r.name,
                    path: r.path,
                    fd: r.fd,
                    lock_held: r.lock_held,
                    flags: r.flags,
                    owners: r.owners,
                })
                .collect(),
        };
        if doc.lockspaces.iter().any(|l| l.directory.is_none()) {
            return None;
        }
        let daemon = Obj::new(&doc.daemon, "daemon", String::from("daemon")).ok()?;
        let daemon = DaemonState::parse(&daemon, VIRTLOCKD_SERVER).ok()?;
        Self::check_clients(&daemon).ok()?;
        Some(LockdState {
            daemon,
            default_lockspace: space(doc.default_lockspace),
            lockspaces: doc.lockspaces.into_iter().map(space).collect(),
            magic: doc.magic,
            counters: doc.counters,
        })
    }

    /// The lock server's clients must carry a complete owner record.
    fn check_clients(daemon: &DaemonState) -> Result<()> {
        if let Some(srv) = daemon.server(VIRTLOCKD_SERVER) {
            for (i, c) in srv.clients.iter().enumerate() {
                let v = &c.private_data;
                let po = Obj::new(
                    v,
                    "privateData",
                    format!("daemon.servers.{VIRTLOCKD_SERVER}.clients[{i}].privateData"),
                )?;
                LockClientPrivate::parse(&po)?;
            }
        }
        Ok(())
    }

    pub fn from_value(value: &Value) -> Result<Self> {
        let o = root(value)?;
        let magic = magic_of(&o)?;
        let default_lockspace = LockspaceState::parse(&o.object("defaultLockspace")?)?;

        let at = o.child_at("lockspaces");
        let mut lockspaces = Vec::new();
        for (i, l) in objects(o.array("lockspaces")?, "lockspaces", &o.at)?
            .iter()
            .enumerate()
        {
            let lo = Obj {
                map: l.map,
                at: index(&at, i),
            };
            let ls = LockspaceState::parse(&lo)?;
            if ls.directory.is_none() {
                return Err(missing("directory", &lo.at));
            }
            lockspaces.push(ls);
        }

        // Pre-2015 daemons wrote one `server` object instead of `daemon`.
        let daemon = if o.has("daemon") {
            o.object("daemon")?
        } else if o.has("server") {
            o.object("server")?
        } else {
            return Err(missing("daemon", &o.at));
        };
        let daemon = DaemonState::parse(&daemon, VIRTLOCKD_SERVER)?;
        Self::check_clients(&daemon)?;

        Ok(LockdState {
            daemon,
            default_lockspace,
            lockspaces,
            magic,
            counters: o.get(COUNTERS_KEY).cloned(),
        })
    }

    /// The document as libvirt writes it: pretty-printed, keys in libvirt's order.
    pub fn to_json_string(&self) -> String {
        pretty_doc(self)
    }

    /// Every descriptor that must survive the exec: sockets and locked resource files.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut out = self.daemon.inherited_fds();
        for ls in std::iter::once(&self.default_lockspace).chain(self.lockspaces.iter()) {
            out.extend(ls.resources.iter().map(|r| r.fd));
        }
        out
    }
}

impl Serialize for LockdState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(Some(4 + usize::from(self.counters.is_some())))?;
        m.serialize_entry("daemon", &self.daemon)?;
        m.serialize_entry("defaultLockspace", &self.default_lockspace)?;
        m.serialize_entry("lockspaces", &self.lockspaces)?;
        m.serialize_entry("magic", &self.magic)?;
        if let Some(c) = &self.counters {
            m.serialize_entry(COUNTERS_KEY, c)?;
        }
        m.end()
    }
}

serialized_directly!(LockdState);

// ---------------------------------------------------------------------------------------
// Files and descriptors
// ---------------------------------------------------------------------------------------

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes the state file.
///
/// libvirt opens the file itself with O_WRONLY|O_CREAT|O_TRUNC, mode 0700. We create
/// `<path>.tmp` the same way (after removing a stale one, and exclusively, so a leftover
/// file's mode or a planted symlink is never reused), write, fsync, and rename it over
/// `path`, so a failed write never leaves a half-written state file. Nothing is
/// fsynced: the only reader is this same process right after exec, through the page
/// cache, and a machine crash ends the process whose fds the document describes.
pub fn write_state_file(path: &Path, json: &str) -> io::Result<()> {
    let tmp = tmp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(STATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(json.as_bytes())?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

fn unlink_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(
                "Unable to remove restart state file {}: {}",
                path.display(),
                e
            );
        }
    }
}

/// Reads and removes the state file; `None` if there is none. Whether it is meant for
/// this process (its magic) is for the caller to check on the parsed document (see
/// [`magic_matches`]), so the document is read once.
pub fn read_state_file(path: &Path) -> Result<Option<String>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            unlink_quietly(path);
            return Err(RestartError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    // Sized once from the file (`take` hides the size from read_to_end, which would
    // otherwise grow the buffer by doubling through a document of a thousand entries).
    let hint = file
        .metadata()
        .map_or(0, |m| m.len().min(STATE_FILE_MAX_LEN + 1));
    let mut bytes = Vec::with_capacity(hint as usize + 1);
    let read = file.take(STATE_FILE_MAX_LEN + 1).read_to_end(&mut bytes);
    unlink_quietly(path);
    if let Err(e) = read {
        return Err(RestartError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    if bytes.len() as u64 > STATE_FILE_MAX_LEN {
        return Err(RestartError::TooLarge {
            path: path.to_path_buf(),
            limit: STATE_FILE_MAX_LEN,
        });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| RestartError::Parse(format!("state file is not UTF-8: {e}")))?;
    Ok(Some(text))
}

/// Whether a document's magic (`None`: it has none) is the one this process wants. A
/// stale file, another pid's (a crash between writing it and exec, say), is ignored
/// with libvirt's warning: the daemon then starts afresh.
pub fn magic_matches(got: Option<&str>, my_pid: u32) -> Result<bool> {
    let got = got.ok_or(RestartError::MissingMagic)?;
    let want = restart_magic(my_pid);
    if got != want {
        tracing::warn!(
            "Found restart exec file with old magic {} vs wanted {}",
            got,
            want
        );
        return Ok(false);
    }
    Ok(true)
}

/// The magic of a document, by a typed scan that skips everything else. For documents
/// the full parse refused: a stale file is ignored whatever else is wrong with it.
pub fn scan_magic(text: &str) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct MagicOnly {
        magic: Option<Value>,
    }
    let doc: MagicOnly =
        serde_json::from_str(text).map_err(|e| RestartError::Parse(e.to_string()))?;
    Ok(doc
        .magic
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned))
}

/// Consumes the state file in one step ([`read_state_file`], then [`scan_magic`]):
///
/// * no file: `Ok(None)` (normal start);
/// * otherwise the file is read (at most [`STATE_FILE_MAX_LEN`] bytes) and unlinked at
///   once, whatever the outcome;
/// * a read error, an oversized file, invalid JSON or a missing `magic` is an error;
/// * a `magic` other than `my_pid` is a stale file: a warning is logged and `Ok(None)`
///   returned (normal start);
/// * otherwise the document's text is returned.
///
/// The daemon itself reads the file and checks the magic of the parsed document
/// instead, so that the document is parsed once (see `daemon::main`).
pub fn take_state_file(path: &Path, my_pid: u32) -> Result<Option<String>> {
    let Some(text) = read_state_file(path)? else {
        return Ok(None);
    };
    let magic = scan_magic(&text)?;
    Ok(magic_matches(magic.as_deref(), my_pid)?.then_some(text))
}

fn update_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // FD_CLOEXEC is the only fd flag Linux has, so no F_GETFD first: one syscall per fd
    // matters at re-exec with thousands of pipes and clients. It also fails (EBADF) on
    // an fd that is not open.
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Lets `fd` survive exec (clears FD_CLOEXEC).
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    update_cloexec(fd, false)
}

/// Closes `fd` on exec (sets FD_CLOEXEC), as is done again after restoring.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    update_cloexec(fd, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::AsRawFd;

    const LOGD_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlogd-9.0-restart-exec.json"
    ));
    const LOCKD_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlockd-9.0-restart-exec.json"
    ));

    fn value(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    /// Every object key with its path, in document order.
    fn key_order(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = format!("{at}/{k}");
                    out.push(p.clone());
                    key_order(child, &p, out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    key_order(child, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    fn keys(v: &Value) -> Vec<String> {
        let mut out = Vec::new();
        key_order(v, "", &mut out);
        out
    }

    fn remove(doc: &mut Value, pointer: &str, key: &str) {
        doc.pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("no object at {pointer}"))
            .shift_remove(key)
            .unwrap_or_else(|| panic!("no key {key} at {pointer}"));
    }

    fn set(doc: &mut Value, pointer: &str, key: &str, v: Value) {
        doc.pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("no object at {pointer}"))
            .insert(key.to_string(), v);
    }

    fn server_json() -> Value {
        json!({
            "min_workers": 0, "max_workers": 0, "priority_workers": 0,
            "max_clients": 1024, "max_anonymous_clients": 1024,
            "keepaliveInterval": 4294967295u64, "keepaliveCount": 0,
            "next_client_id": 5,
            "services": [ { "auth": 0, "readonly": false, "nrequests_client_max": 1,
                "socks": [ { "fd": 3, "errfd": -1, "pid": 0, "isClient": false,
                             "unlinkUNIX": false } ] } ],
            "clients": [ { "id": 4, "auth": 0, "auth_pending": false, "readonly": false,
                "nrequests_max": 1, "conn_time": 1717000123,
                "sock": { "fd": 11, "errfd": -1, "pid": 0, "isClient": true,
                          "unlinkUNIX": false },
                "privateData": {} } ]
        })
    }

    fn logd_doc_with_daemon(daemon: Value) -> Value {
        json!({ "daemon": daemon, "magic": "42", "handler": { "files": [] } })
    }

    // ---- fixtures -------------------------------------------------------------------

    /// The typed fast path and the `Value` walk agree; what the fast path cannot take
    /// still gets the walk's precise error.
    #[test]
    fn logd_fast_parse_agrees_with_value_walk() {
        let walk = LogdState::from_value(&parse_text(LOGD_FIXTURE).unwrap()).unwrap();
        assert_eq!(LogdState::parse_fast(LOGD_FIXTURE), Some(walk.clone()));
        let text = walk.to_json_string();
        assert_eq!(LogdState::parse_fast(&text), Some(walk));
        let bad = LOGD_FIXTURE.replacen("\"domuuid\": \"", "\"domuuid\": \"x", 1);
        assert!(LogdState::parse_fast(&bad).is_none());
        let e = LogdState::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("domuuid"), "{e}");
    }

    /// Our `pumpfd` key: absent from libvirt's documents (None, and not written back),
    /// carried by both parsers when present.
    #[test]
    fn logd_pumpfd_is_optional_and_round_trips() {
        let st = LogdState::parse(LOGD_FIXTURE).unwrap();
        assert_eq!(st.handler.pumpfd, None);
        assert!(!st.to_json_string().contains("pumpfd"));
        let mut with = st.clone();
        with.handler.pumpfd = Some(17);
        let text = with.to_json_string();
        assert!(text.contains("pumpfd"), "{text}");
        assert_eq!(LogdState::parse_fast(&text), Some(with.clone()));
        assert_eq!(
            LogdState::from_value(&parse_text(&text).unwrap()).unwrap(),
            with
        );
        let mut bad = parse_text(&text).unwrap();
        bad["handler"]["pumpfd"] = json!("x");
        assert!(LogdState::from_value(&bad).is_err());
    }

    /// virtlockd's typed fast path agrees with the `Value` walk on libvirt's documents
    /// and on what we write; a document it cannot take still gets the walk's error.
    #[test]
    fn lockd_fast_parse_agrees_with_value_walk() {
        for fixture in [LOCKD_FIXTURE, LOCKD_11_3] {
            let walk = LockdState::from_value(&parse_text(fixture).unwrap()).unwrap();
            assert_eq!(LockdState::parse_fast(fixture), Some(walk.clone()));
            let text = walk.to_json_string();
            assert_eq!(LockdState::parse_fast(&text), Some(walk));
        }
        let mut bad = parse_text(LOCKD_FIXTURE).unwrap();
        bad["lockspaces"] = json!([{ "resources": [] }]);
        let text = bad.to_string();
        assert!(LockdState::parse_fast(&text).is_none());
        let e = LockdState::parse(&text).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }

    #[test]
    fn parses_virtlogd_fixture() {
        let st = LogdState::parse(LOGD_FIXTURE).unwrap();
        assert_eq!(st.magic, "3412");
        let names: Vec<&str> = st.daemon.servers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["admin", "virtlogd"]);

        let admin = st.daemon.server("admin").unwrap();
        assert_eq!(admin.max_clients, 5000);
        assert_eq!(admin.max_anonymous_clients, 5000);
        assert_eq!(admin.next_client_id, 1);
        assert_eq!(admin.services[0].socks[0], SocketState::listener(7, true));

        let main = st.daemon.server("virtlogd").unwrap();
        assert_eq!(main.min_workers, 0);
        assert_eq!(main.max_workers, 0);
        assert_eq!(main.priority_workers, 0);
        assert_eq!(main.max_clients, 1024);
        assert_eq!(main.keepalive_interval, -1);
        assert_eq!(main.keepalive_count, 0);
        assert_eq!(main.next_client_id, 3);
        assert_eq!(main.services.len(), 1);
        assert_eq!(main.services[0].auth, 0);
        assert!(!main.services[0].readonly);
        assert_eq!(main.services[0].nrequests_client_max, 1);
        assert_eq!(main.services[0].socks, vec![SocketState::listener(6, true)]);
        assert!(main.clients.is_empty());

        let uuid = Uuid::parse_str("15a86c6d-fcf3-40f8-b104-5c2672d633a0").unwrap();
        assert_eq!(
            st.handler.files,
            vec![
                LogFileState {
                    pipefd: 12,
                    path: "/var/log/libvirt/qemu/t1-serial.log".into(),
                    driver: "qemu".into(),
                    domname: "t1".into(),
                    domuuid: uuid,
                },
                LogFileState {
                    pipefd: 13,
                    path: "/var/log/libvirt/qemu/t1.log".into(),
                    driver: "qemu".into(),
                    domname: "t1".into(),
                    domuuid: uuid,
                },
            ]
        );
        assert_eq!(st.inherited_fds(), vec![7, 6, 12, 13]);
    }

    /// Our counters ride in their own top-level key: both parse paths keep it, the
    /// document without it (libvirt's) has none, and writing puts it back.
    #[test]
    fn counters_key_round_trips() {
        let plain = LogdState::parse(LOGD_FIXTURE).unwrap();
        assert_eq!(plain.counters, None);
        let mut doc = plain.clone();
        doc.counters = Some(serde_json::json!({"logs": {"/x": {"written": 5}}}));
        let text = doc.to_json_string();
        assert!(text.contains(COUNTERS_KEY));
        assert_eq!(LogdState::parse_fast(&text), Some(doc.clone()));
        let walk = LogdState::from_value(&parse_text(&text).unwrap()).unwrap();
        assert_eq!(walk, doc);
        // The rows, one per file, by both paths; rows that are not rows are dropped.
        doc.log_counters = Some(vec![[1, 2, 3], [4, 0, u64::MAX]]);
        let text = doc.to_json_string();
        assert!(text.contains(LOG_COUNTERS_KEY));
        assert_eq!(LogdState::parse_fast(&text), Some(doc.clone()));
        let walk = LogdState::from_value(&parse_text(&text).unwrap()).unwrap();
        assert_eq!(walk, doc);
        let bad = text.replace("18446744073709551615", "\"x\"");
        assert_eq!(LogdState::parse(&bad).unwrap().log_counters, None);
        let mut lockd = LockdState::parse(LOCKD_FIXTURE).unwrap();
        assert_eq!(lockd.counters, None);
        lockd.counters = Some(serde_json::json!({"leaseLosses": 3}));
        assert_eq!(LockdState::parse(&lockd.to_json_string()).unwrap(), lockd);
    }

    #[test]
    fn parses_virtlockd_fixture() {
        let st = LockdState::parse(LOCKD_FIXTURE).unwrap();
        assert_eq!(st.magic, "3415");
        let names: Vec<&str> = st.daemon.servers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["admin", "virtlockd"]);
        let main = st.daemon.server("virtlockd").unwrap();
        assert_eq!(main.next_client_id, 4);
        assert_eq!(main.keepalive_interval, -1);
        assert_eq!(main.clients.len(), 1);
        let c = &main.clients[0];
        assert_eq!(c.id, 2);
        assert_eq!(c.auth, 0);
        assert!(!c.auth_pending);
        assert!(!c.readonly);
        assert_eq!(c.nrequests_max, 1);
        assert_eq!(c.conn_time, 1795262512);
        assert_eq!(c.sock, SocketState::connection(5));
        assert_eq!(
            c.lock_private().unwrap(),
            LockClientPrivate {
                restricted: true,
                owner_pid: 3814,
                owner_id: 1,
                owner_name: "t1".into(),
                owner_uuid: Uuid::parse_str("15a86c6d-fcf3-40f8-b104-5c2672d633a0").unwrap(),
            }
        );
        assert_eq!(st.default_lockspace, LockspaceState::default());
        assert_eq!(st.lockspaces.len(), 1);
        let ls = &st.lockspaces[0];
        assert_eq!(
            ls.directory.as_deref(),
            Some("/var/lib/libvirt/lockd/files")
        );
        let name = "20f42391204f34f43592e926bc8e16a511cf0e227a6bc4f2dc6e2796c6079d45";
        assert_eq!(
            ls.resources,
            vec![ResourceState {
                name: name.into(),
                path: format!("/var/lib/libvirt/lockd/files/{name}"),
                fd: 13,
                lock_held: true,
                flags: RESOURCE_AUTOCREATE,
                owners: vec![3814],
            }]
        );
        assert_eq!(st.inherited_fds(), vec![7, 6, 5, 13]);
    }

    #[test]
    fn virtlogd_fixture_round_trips_with_same_values_and_key_order() {
        let st = LogdState::parse(LOGD_FIXTURE).unwrap();
        let written = st.to_json_string();
        assert_eq!(LogdState::parse(&written).unwrap(), st);
        let ours = value(&written);
        let theirs = value(LOGD_FIXTURE);
        assert_eq!(ours, theirs);
        assert_eq!(keys(&ours), keys(&theirs));
        // serde entry points agree with the hand-written ones.
        let via_serde: LogdState = serde_json::from_str(LOGD_FIXTURE).unwrap();
        assert_eq!(via_serde, st);
        assert_eq!(serde_json::to_value(&st).unwrap(), theirs);
    }

    #[test]
    fn virtlockd_fixture_round_trips_with_same_values_and_key_order() {
        let st = LockdState::parse(LOCKD_FIXTURE).unwrap();
        let written = st.to_json_string();
        assert_eq!(LockdState::parse(&written).unwrap(), st);
        let ours = value(&written);
        let theirs = value(LOCKD_FIXTURE);
        assert_eq!(ours, theirs);
        assert_eq!(keys(&ours), keys(&theirs));
        let via_serde: LockdState = serde_json::from_str(LOCKD_FIXTURE).unwrap();
        assert_eq!(via_serde, st);
    }

    // ---- libvirt 11.3 (Debian 13) ------------------------------------------------------

    const LOGD_11_3: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlogd-11.3-restart-exec.json"
    ));
    const LOCKD_11_3: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlockd-11.3-restart-exec.json"
    ));

    /// 11.3's virtlogd document (empty arrays as `[]`, the QEMU driver's "QEMU" name)
    /// restores, and what we write from it is 11.3's text byte for byte: serde_json's
    /// pretty layout is json-c's `PRETTY | SPACED` one for these documents.
    #[test]
    fn virtlogd_11_3_fixture_restores_and_is_written_back_identically() {
        let st = LogdState::parse(LOGD_11_3).unwrap();
        assert_eq!(st.magic, "28453");
        assert_eq!(
            LogdState::from_value(&parse_text(LOGD_11_3).unwrap()).unwrap(),
            st
        );
        let main = st.daemon.server("virtlogd").unwrap();
        assert_eq!(main.next_client_id, 9);
        assert!(main.clients.is_empty());
        assert_eq!(main.services[0].socks, vec![SocketState::listener(4, true)]);
        let drivers: Vec<(&str, i32)> = st
            .handler
            .files
            .iter()
            .map(|f| (f.driver.as_str(), f.pipefd))
            .collect();
        assert_eq!(drivers, [("qemu", 11), ("QEMU", 12)]);
        assert_eq!(st.inherited_fds(), vec![5, 4, 11, 12]);
        assert_eq!(st.to_json_string(), LOGD_11_3);
    }

    #[test]
    fn virtlockd_11_3_fixture_restores_and_is_written_back_identically() {
        let st = LockdState::parse(LOCKD_11_3).unwrap();
        assert_eq!(st.magic, "28456");
        let main = st.daemon.server("virtlockd").unwrap();
        assert_eq!(main.clients.len(), 1);
        let p = main.clients[0].lock_private().unwrap();
        assert_eq!((p.owner_pid, p.owner_name.as_str()), (28533, "g1"));
        assert!(st.default_lockspace.resources.is_empty());
        assert_eq!(st.lockspaces[0].resources[0].fd, 12);
        assert_eq!(st.lockspaces[0].resources[0].owners, vec![28533]);
        assert_eq!(st.to_json_string(), LOCKD_11_3);
    }

    /// 9.0 writes an empty array as `[` newline newline indent `]`, 11.3 as `[]`: both
    /// parse, and both daemons' parsers (9.0's yajl, 11.3's strict json-c) take what we
    /// write, which is 11.3's form.
    #[test]
    fn empty_arrays_in_either_form() {
        assert!(LOCKD_FIXTURE.contains("\"resources\": [\n\n    ]"));
        let nine = LockdState::parse(LOCKD_FIXTURE).unwrap();
        let text = nine.to_json_string();
        assert!(text.contains("\"resources\": []"));
        assert!(!text.contains("[\n\n"));
        assert_eq!(LockdState::parse(&text).unwrap(), nine);
    }

    #[test]
    fn written_document_uses_libvirt_types_and_layout() {
        let mut st = LockdState::parse(LOCKD_FIXTURE).unwrap();
        // Whatever order we hold the servers in, "admin" is written first.
        st.daemon.servers.reverse();
        let text = st.to_json_string();
        assert!(text.starts_with("{\n  \"daemon\": {\n    \"servers\": {\n      \"admin\": {"));
        assert!(text.ends_with("}\n"));
        let v = value(&text);
        assert_eq!(v["magic"], json!("3415"));
        let srv = &v["daemon"]["servers"]["virtlockd"];
        assert_eq!(srv["keepaliveInterval"], json!(4294967295u64));
        assert_eq!(srv["clients"][0]["sock"]["isClient"], json!(true));
        assert_eq!(srv["clients"][0]["privateData"]["restricted"], json!(true));
        let top: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(top, ["daemon", "defaultLockspace", "lockspaces", "magic"]);
        assert!(v["defaultLockspace"].get("directory").is_none());

        let logd = LogdState::parse(LOGD_FIXTURE).unwrap().to_value();
        let top: Vec<&String> = logd.as_object().unwrap().keys().collect();
        assert_eq!(top, ["daemon", "magic", "handler"]);
    }

    #[test]
    fn lock_private_uuid_is_written_lowercase() {
        let p = LockClientPrivate::from_value(&json!({
            "restricted": false, "ownerPid": 1, "ownerId": 2, "ownerName": "vm",
            "ownerUUID": "C7A5FDBD-CDAF-9455-926A-D65C16DB1809"
        }))
        .unwrap();
        assert_eq!(
            p.to_value()["ownerUUID"],
            json!("c7a5fdbd-cdaf-9455-926a-d65c16db1809")
        );
        let bad = LockClientPrivate::from_value(&json!({
            "restricted": false, "ownerPid": 1, "ownerId": 2, "ownerName": "vm",
            "ownerUUID": "not-a-uuid"
        }))
        .unwrap_err();
        assert!(matches!(bad, RestartError::Malformed { ref key, .. } if key == "ownerUUID"));
    }

    // ---- compatibility paths ---------------------------------------------------------

    #[test]
    fn servers_as_array_maps_to_own_name() {
        let doc = logd_doc_with_daemon(json!({ "servers": [ server_json() ] }));
        let st = LogdState::from_value(&doc).unwrap();
        assert_eq!(st.daemon.servers.len(), 1);
        assert_eq!(st.daemon.servers[0].0, "virtlogd");
        assert_eq!(st.daemon.servers[0].1.next_client_id, 5);
        // Written back in the current shape.
        let v = st.to_value();
        assert!(v["daemon"]["servers"]["virtlogd"].is_object());
    }

    #[test]
    fn servers_array_with_two_elements_is_an_error() {
        let doc = logd_doc_with_daemon(json!({ "servers": [ server_json(), server_json() ] }));
        let e = LogdState::from_value(&doc).unwrap_err();
        assert!(matches!(e, RestartError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("Server count 2"), "{e}");
    }

    #[test]
    fn servers_missing_means_daemon_is_the_server() {
        let doc = logd_doc_with_daemon(server_json());
        let st = LogdState::from_value(&doc).unwrap();
        assert_eq!(st.daemon.servers.len(), 1);
        assert_eq!(st.daemon.servers[0].0, "virtlogd");
        assert_eq!(st.daemon.server("virtlogd").unwrap().clients[0].id, 4);
        assert!(st.daemon.server("admin").is_none());
    }

    #[test]
    fn servers_with_wrong_type_or_unknown_name_is_an_error() {
        let doc = logd_doc_with_daemon(json!({ "servers": null }));
        let e = LogdState::from_value(&doc).unwrap_err();
        assert!(matches!(e, RestartError::Malformed { ref key, .. } if key == "servers"));

        let doc = logd_doc_with_daemon(json!({ "servers": {
            "virtlogd": server_json(), "libvirtd": server_json() } }));
        let e = LogdState::from_value(&doc).unwrap_err();
        assert!(
            e.to_string().contains("Unexpected server name 'libvirtd'"),
            "{e}"
        );

        // virtlockd's name is not acceptable to virtlogd.
        let doc = logd_doc_with_daemon(json!({ "servers": { "virtlockd": server_json() } }));
        assert!(LogdState::from_value(&doc).is_err());

        // Only an admin server: the daemon's own is missing.
        let doc = logd_doc_with_daemon(json!({ "servers": { "admin": server_json() } }));
        let e = LogdState::from_value(&doc).unwrap_err();
        assert!(e.to_string().contains("No server named 'virtlogd'"), "{e}");
    }

    #[test]
    fn virtlockd_old_server_key_is_accepted() {
        let mut doc = value(LOCKD_FIXTURE);
        let main = doc["daemon"]["servers"]["virtlockd"].clone();
        let obj = doc.as_object_mut().unwrap();
        obj.shift_remove("daemon");
        obj.insert("server".into(), main);
        let st = LockdState::from_value(&doc).unwrap();
        assert_eq!(st.daemon.servers.len(), 1);
        assert_eq!(st.daemon.servers[0].0, "virtlockd");
        assert_eq!(st.daemon.servers[0].1.clients[0].id, 2);
        // Written back with `daemon`, not `server`.
        let v = st.to_value();
        assert!(v.get("server").is_none());
        assert!(v["daemon"]["servers"]["virtlockd"].is_object());

        // Neither key: an error naming `daemon`.
        let mut doc = value(LOCKD_FIXTURE);
        remove(&mut doc, "", "daemon");
        let e = LockdState::from_value(&doc).unwrap_err();
        assert_eq!(e.key(), Some("daemon"));
    }

    #[test]
    fn missing_next_client_id_defaults_to_one_and_feeds_missing_client_ids() {
        let mut srv = server_json();
        srv.as_object_mut().unwrap().shift_remove("next_client_id");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.next_client_id, 1);
        assert_eq!(s.clients[0].id, 4);

        // Clients without ids get fresh ones from the server's counter.
        let mut srv = server_json();
        let c = srv["clients"][0].clone();
        srv["clients"] = json!([c.clone(), c]);
        remove(&mut srv, "/clients/0", "id");
        remove(&mut srv, "/clients/1", "id");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.clients[0].id, 5);
        assert_eq!(s.clients[1].id, 6);
        assert_eq!(s.next_client_id, 7);
        // A non-number counts as missing.
        set(&mut srv, "", "next_client_id", json!("9"));
        assert_eq!(ServerState::from_value(&srv).unwrap().next_client_id, 3);
    }

    #[test]
    fn unlink_unix_defaults_to_not_is_client() {
        let listener =
            SocketState::from_value(&json!({ "fd": 3, "errfd": -1, "pid": 0, "isClient": false }))
                .unwrap();
        assert!(listener.unlink_unix);
        let conn =
            SocketState::from_value(&json!({ "fd": 9, "errfd": -1, "pid": 0, "isClient": true }))
                .unwrap();
        assert!(!conn.unlink_unix);
        // Explicit values win, including the systemd case.
        let activated = SocketState::from_value(
            &json!({ "fd": 3, "errfd": -1, "pid": 0, "isClient": false, "unlinkUNIX": false }),
        )
        .unwrap();
        assert!(!activated.unlink_unix);
        // Always written.
        assert_eq!(conn.to_value()["unlinkUNIX"], json!(false));
    }

    #[test]
    fn max_anonymous_clients_defaults_and_is_bounded() {
        let mut srv = server_json();
        remove(&mut srv, "", "max_anonymous_clients");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.max_anonymous_clients, 1024);
        assert_eq!(s.to_value()["max_anonymous_clients"], json!(1024));

        let mut srv = server_json();
        set(&mut srv, "", "max_anonymous_clients", json!(1024));
        assert!(ServerState::from_value(&srv).is_ok());
        set(&mut srv, "", "max_anonymous_clients", json!(1025));
        let e = ServerState::from_value(&srv).unwrap_err();
        assert!(matches!(e, RestartError::Invalid { .. }), "{e}");
        set(&mut srv, "", "max_anonymous_clients", json!("12"));
        let e = ServerState::from_value(&srv).unwrap_err();
        assert_eq!(e.key(), Some("max_anonymous_clients"));
    }

    #[test]
    fn keepalive_interval_unsigned_minus_one() {
        let mut srv = server_json();
        assert_eq!(
            ServerState::from_value(&srv).unwrap().keepalive_interval,
            -1
        );
        set(&mut srv, "", "keepaliveInterval", json!(-1));
        assert_eq!(
            ServerState::from_value(&srv).unwrap().keepalive_interval,
            -1
        );
        set(&mut srv, "", "keepaliveInterval", json!(5));
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.keepalive_interval, 5);
        assert_eq!(s.to_value()["keepaliveInterval"], json!(5));
        set(&mut srv, "", "keepaliveInterval", json!(4294967296u64));
        assert!(ServerState::from_value(&srv).is_err());
        set(&mut srv, "", "keepaliveInterval", json!(1.5));
        assert!(ServerState::from_value(&srv).is_err());

        let mut s = ServerState::from_value(&server_json()).unwrap();
        s.keepalive_interval = -1;
        assert_eq!(s.to_value()["keepaliveInterval"], json!(4294967295u64));
    }

    #[test]
    fn conn_time_optional_and_omitted_when_zero() {
        let mut srv = server_json();
        remove(&mut srv, "/clients/0", "conn_time");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.clients[0].conn_time, 0);
        let v = s.clients[0].to_value();
        assert!(v.get("conn_time").is_none());
        let order: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            order,
            [
                "id",
                "auth",
                "auth_pending",
                "readonly",
                "nrequests_max",
                "sock",
                "privateData"
            ]
        );
        let s = ServerState::from_value(&server_json()).unwrap();
        assert_eq!(s.clients[0].to_value()["conn_time"], json!(1717000123));
    }

    #[test]
    fn auth_pending_is_derived_and_checked() {
        let mut c = server_json()["clients"][0].clone();
        remove(&mut c, "", "auth_pending");
        assert!(!ClientState::from_value(&c).unwrap().auth_pending);
        set(&mut c, "", "auth", json!(1));
        assert!(ClientState::from_value(&c).unwrap().auth_pending);
        set(&mut c, "", "auth", json!(0));
        set(&mut c, "", "auth_pending", json!(true));
        let e = ClientState::from_value(&c).unwrap_err();
        assert!(e.to_string().contains("auth_pending"), "{e}");
    }

    #[test]
    fn no_admin_server_is_fine() {
        let mut doc = value(LOGD_FIXTURE);
        remove(&mut doc, "/daemon/servers", "admin");
        let st = LogdState::from_value(&doc).unwrap();
        assert!(st.daemon.server("admin").is_none());
        assert!(st.daemon.server("virtlogd").is_some());
    }

    #[test]
    fn unknown_keys_from_older_writers_are_ignored() {
        let mut srv = server_json();
        set(&mut srv, "", "keepaliveRequired", json!(false));
        set(&mut srv, "", "mdnsGroupName", json!("x"));
        assert!(ServerState::from_value(&srv).is_ok());
    }

    #[test]
    fn carried_io_round_trips_and_names_its_fds() {
        let mut srv = server_json();
        set(
            &mut srv,
            "/clients/0",
            CARRY_KEY,
            json!({ "fd": 20, "input": 6, "inputFds": [21], "output": 900, "outputFds": [] }),
        );
        let parsed = ServerState::from_value(&srv).unwrap();
        let carry = parsed.clients[0].carry.clone().unwrap();
        assert_eq!(
            carry,
            ClientCarry {
                fd: 20,
                input: 6,
                input_fds: vec![21],
                output: 900,
                output_fds: vec![],
            }
        );
        assert_eq!(parsed.inherited_fds(), vec![3, 11, 20, 21]);
        assert_eq!(ServerState::from_value(&parsed.to_value()).unwrap(), parsed);
        // Absent unless there is something to carry.
        let plain = ServerState::from_value(&server_json()).unwrap();
        assert!(plain.clients[0].carry.is_none());
        assert!(plain.to_value()["clients"][0].get(CARRY_KEY).is_none());
        // Our own key: a malformed one is reported.
        set(&mut srv, "/clients/0", CARRY_KEY, json!({ "fd": 20 }));
        assert!(ServerState::from_value(&srv).is_err());
    }

    // ---- required keys ---------------------------------------------------------------

    fn assert_missing_logd(pointer: &str, key: &str) {
        let mut doc = value(LOGD_FIXTURE);
        remove(&mut doc, pointer, key);
        let e = LogdState::from_value(&doc).unwrap_err();
        assert!(
            matches!(e, RestartError::Missing { key: ref k, .. } if k == key),
            "{pointer} {key}: {e:?}"
        );
        assert!(e.to_string().contains(key), "{e}");
    }

    fn assert_missing_lockd(pointer: &str, key: &str) {
        let mut doc = value(LOCKD_FIXTURE);
        remove(&mut doc, pointer, key);
        let e = LockdState::from_value(&doc).unwrap_err();
        assert!(
            matches!(e, RestartError::Missing { key: ref k, .. } if k == key),
            "{pointer} {key}: {e:?}"
        );
        assert!(e.to_string().contains(key), "{e}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        for key in [
            "min_workers",
            "max_workers",
            "priority_workers",
            "max_clients",
            "keepaliveInterval",
            "keepaliveCount",
            "services",
            "clients",
        ] {
            assert_missing_logd("/daemon/servers/virtlogd", key);
            assert_missing_lockd("/daemon/servers/admin", key);
        }
        for key in ["auth", "readonly", "nrequests_client_max", "socks"] {
            assert_missing_logd("/daemon/servers/virtlogd/services/0", key);
        }
        for key in ["fd", "pid", "errfd", "isClient"] {
            assert_missing_logd("/daemon/servers/admin/services/0/socks/0", key);
            assert_missing_lockd("/daemon/servers/virtlockd/clients/0/sock", key);
        }
        for key in ["auth", "readonly", "nrequests_max", "sock", "privateData"] {
            assert_missing_lockd("/daemon/servers/virtlockd/clients/0", key);
        }
        for key in [
            "restricted",
            "ownerPid",
            "ownerId",
            "ownerName",
            "ownerUUID",
        ] {
            assert_missing_lockd("/daemon/servers/virtlockd/clients/0/privateData", key);
        }
        for key in ["pipefd", "path", "driver", "domname", "domuuid"] {
            assert_missing_logd("/handler/files/1", key);
        }
        assert_missing_logd("", "daemon");
        assert_missing_logd("", "handler");
        assert_missing_logd("/handler", "files");
        assert_missing_lockd("", "defaultLockspace");
        assert_missing_lockd("", "lockspaces");
        assert_missing_lockd("/defaultLockspace", "resources");
        assert_missing_lockd("/lockspaces/0", "resources");
        assert_missing_lockd("/lockspaces/0", "directory");
        for key in ["name", "path", "fd", "lockHeld", "flags", "owners"] {
            assert_missing_lockd("/lockspaces/0/resources/0", key);
        }
    }

    #[test]
    fn missing_key_error_says_where() {
        let mut doc = value(LOGD_FIXTURE);
        remove(
            &mut doc,
            "/daemon/servers/virtlogd/services/0/socks/0",
            "isClient",
        );
        let e = LogdState::from_value(&doc).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Missing isClient data in JSON document \
             (in daemon.servers.virtlogd.services[0].socks[0])"
        );
    }

    #[test]
    fn missing_or_non_string_magic() {
        let mut doc = value(LOGD_FIXTURE);
        remove(&mut doc, "", "magic");
        assert!(matches!(
            LogdState::from_value(&doc),
            Err(RestartError::MissingMagic)
        ));
        let mut doc = value(LOCKD_FIXTURE);
        set(&mut doc, "", "magic", json!(3415));
        let e = LockdState::from_value(&doc).unwrap_err();
        assert!(matches!(e, RestartError::MissingMagic));
        assert_eq!(e.to_string(), "Missing magic data in JSON document");
    }

    #[test]
    fn wrong_types_are_malformed() {
        let cases: &[(&str, &str, Value)] = &[
            (
                "/daemon/servers/virtlogd/services/0/socks/0",
                "isClient",
                json!(0),
            ),
            (
                "/daemon/servers/virtlogd/services/0/socks/0",
                "fd",
                json!("6"),
            ),
            (
                "/daemon/servers/virtlogd/services/0",
                "readonly",
                json!("false"),
            ),
            ("/daemon/servers/virtlogd", "max_clients", json!(-1)),
            ("/daemon/servers/virtlogd", "services", json!({})),
            ("/handler/files/0", "domuuid", json!("xyz")),
            ("/handler/files/0", "pipefd", json!(4294967296u64)),
            ("/handler", "files", json!(null)),
        ];
        for (pointer, key, bad) in cases {
            let mut doc = value(LOGD_FIXTURE);
            set(&mut doc, pointer, key, bad.clone());
            let e = LogdState::from_value(&doc).unwrap_err();
            assert!(
                matches!(e, RestartError::Malformed { key: ref k, .. } if k == key),
                "{pointer} {key}: {e:?}"
            );
        }
        assert!(LogdState::parse("[]").is_err());
        assert!(matches!(LogdState::parse("{"), Err(RestartError::Parse(_))));
    }

    // ---- files ------------------------------------------------------------------------

    #[test]
    fn take_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlogd-restart-exec.json");
        assert!(take_state_file(&p, 1).unwrap().is_none());
    }

    #[test]
    fn take_matching_magic_returns_text_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlogd-restart-exec.json");
        fs::write(&p, LOGD_FIXTURE).unwrap();
        let text = take_state_file(&p, 3412).unwrap().unwrap();
        assert_eq!(text, LOGD_FIXTURE);
        assert!(!p.exists());
        assert!(LogdState::parse(&text).is_ok());
    }

    #[test]
    fn take_stale_magic_is_none_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlockd-restart-exec.json");
        fs::write(&p, LOCKD_FIXTURE).unwrap();
        assert!(take_state_file(&p, 9999).unwrap().is_none());
        assert!(!p.exists());
    }

    #[test]
    fn take_without_magic_or_bad_json_is_an_error_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, r#"{"daemon": {}}"#).unwrap();
        let e = take_state_file(&p, 1).unwrap_err();
        assert!(matches!(e, RestartError::MissingMagic));
        assert!(!p.exists());

        fs::write(&p, "{not json").unwrap();
        assert!(matches!(
            take_state_file(&p, 1),
            Err(RestartError::Parse(_))
        ));
        assert!(!p.exists());

        fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(take_state_file(&p, 1).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn take_enforces_ten_mib_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        // Exactly 10 MiB of valid JSON is accepted.
        let head = r#"{"magic": "77", "pad": ""#;
        let tail = "\"}";
        let pad = STATE_FILE_MAX_LEN as usize - head.len() - tail.len();
        let doc = format!("{head}{}{tail}", "x".repeat(pad));
        assert_eq!(doc.len() as u64, STATE_FILE_MAX_LEN);
        fs::write(&p, &doc).unwrap();
        assert_eq!(
            take_state_file(&p, 77).unwrap().map(|t| t.len()),
            Some(doc.len())
        );
        assert!(!p.exists());

        // One byte more is refused, and the file is still removed.
        let doc = format!("{head}{}{tail}", "x".repeat(pad + 1));
        fs::write(&p, &doc).unwrap();
        let e = take_state_file(&p, 77).unwrap_err();
        assert!(matches!(e, RestartError::TooLarge { .. }), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn write_state_file_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlogd-restart-exec.json");
        fs::write(&p, "old contents that are longer than the new ones").unwrap();
        fs::write(tmp_path(&p), "stale tmp").unwrap();
        fs::set_permissions(tmp_path(&p), fs::Permissions::from_mode(0o666)).unwrap();

        let st = LogdState::parse(LOGD_FIXTURE).unwrap();
        write_state_file(&p, &st.to_json_string()).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), st.to_json_string());
        assert!(!tmp_path(&p).exists());
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        assert_eq!(mode & !0o700, 0, "mode {mode:o}");

        // And the new image takes it back.
        let text = take_state_file(&p, 3412).unwrap().unwrap();
        assert_eq!(LogdState::parse(&text).unwrap(), st);
    }

    #[test]
    fn write_state_file_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no-such-dir").join("state.json");
        assert!(write_state_file(&p, "{}").is_err());
    }

    #[test]
    fn cloexec_can_be_cleared_and_set() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let is_set = |fd| {
            let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
        };
        assert!(is_set(fd));
        clear_cloexec(fd).unwrap();
        assert!(!is_set(fd));
        set_cloexec(fd).unwrap();
        assert!(is_set(fd));
        assert!(clear_cloexec(-1).is_err());
    }

    #[test]
    fn magic_is_decimal_pid() {
        assert_eq!(restart_magic(3412), "3412");
    }
}
