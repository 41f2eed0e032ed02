//! virtlogd's part of the re-exec state document (libvirt keeps its
//! `virLogHandlerPreExecRestart` beside the log handler for the same reason): the
//! `handler` object with the open log files, and the whole document
//! `{ daemon, magic, handler }`. The shared parts (servers, services, sockets,
//! clients, the framing and the file's I/O) are `vh_common::restart`'s.
//!
//! Writing is serde's derive: field order is libvirt's key order, and the 9.0 and 11.3
//! fixtures come back byte for byte. Reading has two paths. The common one is serde's
//! derive too, straight into these types (a `Value` tree of a thousand logs costs about
//! a millisecond of re-exec downtime to build and another to walk). A document it
//! refuses goes through the shared walker (`vh_common::restart::Obj`), which stays
//! hand-written: its messages name the key and where it sat ("Missing domuuid data in
//! JSON document (in handler.files[1])"), which the daemon logs and the tests check,
//! and serde's own ("missing field `domuuid` at line 40 column 5") are not those; it
//! also takes the older shapes libvirt takes (`servers` as an array, or absent).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::os::unix::io::RawFd;
use uuid::Uuid;
// Whole-document calls (`parse`, `to_json_string`, ...) are the trait's, and so are one
// object's (`parse`, `from_value`).
use vh_common::restart::{self, magic_of, root, DaemonState, Obj, RestartError, COUNTERS_KEY};
pub use vh_common::restart::{FromObj, StateDocument};

type Result<T> = std::result::Result<T, RestartError>;

/// Name of virtlogd's own server in the `servers` object.
pub const VIRTLOGD_SERVER: &str = "virtlogd";

/// One open domain log: the read end of its pipe and where it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFileState {
    pub pipefd: RawFd,
    pub path: String,
    pub driver: String,
    pub domname: String,
    #[serde(with = "restart::uuid_text")]
    pub domuuid: Uuid,
}

impl FromObj for LogFileState {
    const NAME: &'static str = "file";

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

/// virtlogd's `handler`: the open log files.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogHandlerState {
    pub files: Vec<LogFileState>,
    /// Ours only (`pumpfd`, which libvirt ignores): the log pump's epoll set, with every
    /// pipe of `files` still registered under the token `pipefd + 1`. Handing it over
    /// spares the old image tearing down, and the new one rebuilding, one registration
    /// per log inside the re-exec pause. A C image that gets it only holds one idle fd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pumpfd: Option<RawFd>,
}

impl FromObj for LogHandlerState {
    const NAME: &'static str = "handler";

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let files = o.each("files", LogFileState::parse)?;
        let pumpfd = if o.has("pumpfd") {
            Some(o.i32("pumpfd")?)
        } else {
            None
        };
        Ok(LogHandlerState { files, pumpfd })
    }
}

/// virtlogd's whole state document: `{ daemon, magic, handler }`.
///
/// Written by serde's derive, in libvirt's key order (the order of the fields).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogdState {
    pub daemon: DaemonState,
    /// The writer's pid as a decimal string.
    pub magic: String,
    pub handler: LogHandlerState,
    /// Our daemons' own counters (operator metrics), under [`COUNTERS_KEY`]; libvirt 9.0
    /// reads only the keys it knows, so the C daemon ignores it. Written by images
    /// before [`LogdState::log_counters`]; still read from them.
    #[serde(rename = "vhCounters", skip_serializing_if = "Option::is_none")]
    pub counters: Option<Value>,
    /// Ours only, under [`LOG_COUNTERS_KEY`]: each log's counters (written, dropped,
    /// rotations), one row per entry of `handler.files`, in the same order. Rows of
    /// numbers rather than an object keyed by path: with ten thousand logs the object
    /// was a tree of 40,000 JSON values to build and drop in the old image and to
    /// parse in the new one, about as much of the re-exec pause as all the rest.
    #[serde(rename = "vhLogCounters", skip_serializing_if = "Option::is_none")]
    pub log_counters: Option<Vec<[u64; 3]>>,
    /// Ours only, under [`LOG_FILES_KEY`], and only when the next image is ours (see
    /// `LogDaemon::next_image_is_ours`): each log's open file, one fd per entry of
    /// `handler.files`, in the same order, -1 for a log whose file is not handed over
    /// (the next image reopens it by path, as always). libvirt's C daemons neither
    /// write nor keep it; a key that is not a list of numbers counts as absent.
    #[serde(rename = "vhLogFiles", skip_serializing_if = "Option::is_none")]
    pub log_files: Option<Vec<RawFd>>,
}

/// [`LogdState`] as a re-exec writes it, borrowing each log's strings from the log
/// table instead of copying three of them per log inside the pause. Its text is the
/// owned document's (with `vhCounters` absent, which the hand-off never writes).
#[derive(Debug, Serialize)]
pub struct LogdStateRef<'a> {
    pub daemon: DaemonState,
    pub magic: String,
    pub handler: LogHandlerStateRef<'a>,
    #[serde(rename = "vhLogCounters", skip_serializing_if = "Option::is_none")]
    pub log_counters: Option<Vec<[u64; 3]>>,
    #[serde(rename = "vhLogFiles", skip_serializing_if = "Option::is_none")]
    pub log_files: Option<Vec<RawFd>>,
}

/// [`LogHandlerState`], borrowed (see [`LogdStateRef`]).
#[derive(Debug, Serialize)]
pub struct LogHandlerStateRef<'a> {
    pub files: Vec<LogFileStateRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pumpfd: Option<RawFd>,
}

/// [`LogFileState`], borrowed (see [`LogdStateRef`]).
#[derive(Debug, Serialize)]
pub struct LogFileStateRef<'a> {
    pub pipefd: RawFd,
    pub path: &'a str,
    pub driver: &'a str,
    pub domname: &'a str,
    #[serde(with = "restart::uuid_text")]
    pub domuuid: Uuid,
}

/// Top-level key of [`LogdState::log_files`].
pub const LOG_FILES_KEY: &str = "vhLogFiles";

/// [`LogdState::log_files`] as read: anything but a list of fd numbers is no list.
fn lenient_fds<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<RawFd>>, D::Error> {
    Ok(fds_of(&Value::deserialize(d)?))
}

fn fds_of(v: &Value) -> Option<Vec<RawFd>> {
    v.as_array()?
        .iter()
        .map(|n| n.as_i64().and_then(|n| RawFd::try_from(n).ok()))
        .collect()
}

/// Top-level key of the rows of [`LogdState::log_counters`] (ignored by libvirt, as
/// [`COUNTERS_KEY`] is).
pub const LOG_COUNTERS_KEY: &str = "vhLogCounters";

impl StateDocument for LogdState {
    /// The file list grows with the guests, and a `Value` tree of a thousand entries
    /// costs about a millisecond of re-exec downtime to build and another to walk.
    /// A bad UUID also gives `None` (see [`StateDocument::parse_fast`]).
    fn parse_fast(text: &str) -> Option<Self> {
        // The `daemon` object is the shared walker's (its old shapes and its checks).
        #[derive(Deserialize)]
        struct Doc {
            daemon: Value,
            magic: String,
            handler: LogHandlerState,
            #[serde(rename = "vhCounters", default)]
            counters: Option<Value>,
            #[serde(rename = "vhLogCounters", default)]
            log_counters: Option<Vec<[u64; 3]>>,
            #[serde(rename = "vhLogFiles", default, deserialize_with = "lenient_fds")]
            log_files: Option<Vec<RawFd>>,
        }
        let doc: Doc = serde_json::from_str(text).ok()?;
        let daemon = DaemonState::from_value(&doc.daemon, VIRTLOGD_SERVER).ok()?;
        Some(LogdState {
            daemon,
            magic: doc.magic,
            handler: doc.handler,
            counters: doc.counters,
            log_counters: doc.log_counters,
            log_files: doc.log_files,
        })
    }

    fn from_value(value: &Value) -> Result<Self> {
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
            log_files: o.get(LOG_FILES_KEY).and_then(fds_of),
        })
    }
}

impl LogdState {
    /// Every descriptor that must survive the exec: sockets and log pipe read ends.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut out = self.daemon.inherited_fds();
        out.extend(self.handler.files.iter().map(|f| f.pipefd));
        out
    }
}

impl<'de> Deserialize<'de> for LogdState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        restart::deserialize_document(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use vh_common::restart::test_support::{
        assert_fast_parse_agrees, assert_missing, assert_round_trips_like_fixture, remove,
        server_json, set, value, SERVER_KEYS,
    };
    // Whole-document calls (`parse`, `to_json_string`, ...) are the trait's.
    pub use vh_common::restart::StateDocument;
    use vh_common::restart::{
        parse_text, take_state_file, tmp_path, write_state_file, SocketState,
    };

    const LOGD_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlogd-9.0-restart-exec.json"
    ));

    // ---- libvirt 11.3 (Debian 13) ------------------------------------------------------

    const LOGD_11_3: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlogd-11.3-restart-exec.json"
    ));

    fn logd_doc_with_daemon(daemon: Value) -> Value {
        json!({ "daemon": daemon, "magic": "42", "handler": { "files": [] } })
    }

    // ---- fixtures -------------------------------------------------------------------

    /// The typed fast path and the `Value` walk agree; what the fast path cannot take
    /// still gets the walk's precise error.
    #[test]
    fn logd_fast_parse_agrees_with_value_walk() {
        assert_fast_parse_agrees::<LogdState>(LOGD_FIXTURE);
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
    }

    /// Our open files' key: read by both paths, written only when present, and a key
    /// that is not a list of fd numbers counts as absent rather than refusing the
    /// document (libvirt's documents never have it).
    #[test]
    fn log_files_key_round_trips_and_a_bad_one_is_absent() {
        let plain = LogdState::parse(LOGD_FIXTURE).unwrap();
        assert_eq!(plain.log_files, None);
        assert!(!plain.to_json_string().contains(LOG_FILES_KEY));
        let mut doc = plain.clone();
        doc.log_files = Some(vec![17, -1]);
        let text = doc.to_json_string();
        assert!(text.contains(LOG_FILES_KEY));
        assert_eq!(LogdState::parse_fast(&text), Some(doc.clone()));
        let walk = LogdState::from_value(&parse_text(&text).unwrap()).unwrap();
        assert_eq!(walk, doc);
        for bad in ["\"x\"", "[1, \"2\"]", "[1.5]", "[4294967296]", "{}", "null"] {
            let mut v = value(&text);
            v[LOG_FILES_KEY] = serde_json::from_str(bad).unwrap();
            let t = v.to_string();
            assert_eq!(LogdState::parse(&t).unwrap().log_files, None, "{bad}");
            assert_eq!(LogdState::parse_fast(&t).unwrap().log_files, None, "{bad}");
        }
    }

    /// The hand-off writes borrowed views; its text is the owned document's, byte for
    /// byte, compact and pretty, with and without our keys.
    #[test]
    fn borrowed_document_writes_the_owned_text() {
        for (fixture, ours) in [
            (LOGD_FIXTURE, false),
            (LOGD_FIXTURE, true),
            (LOGD_11_3, true),
        ] {
            let mut st = LogdState::parse(fixture).unwrap();
            if ours {
                st.handler.pumpfd = Some(99);
                st.log_counters = Some(vec![[1, 2, 3]; st.handler.files.len()]);
                st.log_files = Some((0..st.handler.files.len() as i32).map(|i| 40 + i).collect());
            }
            let borrowed = LogdStateRef {
                daemon: st.daemon.clone(),
                magic: st.magic.clone(),
                handler: LogHandlerStateRef {
                    files: st
                        .handler
                        .files
                        .iter()
                        .map(|f| LogFileStateRef {
                            pipefd: f.pipefd,
                            path: &f.path,
                            driver: &f.driver,
                            domname: &f.domname,
                            domuuid: f.domuuid,
                        })
                        .collect(),
                    pumpfd: st.handler.pumpfd,
                },
                log_counters: st.log_counters.clone(),
                log_files: st.log_files.clone(),
            };
            assert_eq!(
                vh_common::restart::compact_doc(&borrowed),
                vh_common::restart::compact_doc(&st)
            );
            assert_eq!(
                vh_common::restart::pretty_doc(&borrowed),
                st.to_json_string()
            );
        }
    }

    #[test]
    fn virtlogd_fixture_round_trips_with_same_values_and_key_order() {
        let st = assert_round_trips_like_fixture::<LogdState>(LOGD_FIXTURE);
        // serde's writing entry point agrees with the hand-written one too.
        assert_eq!(serde_json::to_value(&st).unwrap(), value(LOGD_FIXTURE));
    }

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
    fn written_document_uses_libvirt_types_and_layout() {
        let logd = LogdState::parse(LOGD_FIXTURE).unwrap().to_value();
        let top: Vec<&String> = logd.as_object().unwrap().keys().collect();
        assert_eq!(top, ["daemon", "magic", "handler"]);
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
    fn no_admin_server_is_fine() {
        let mut doc = value(LOGD_FIXTURE);
        remove(&mut doc, "/daemon/servers", "admin");
        let st = LogdState::from_value(&doc).unwrap();
        assert!(st.daemon.server("admin").is_none());
        assert!(st.daemon.server("virtlogd").is_some());
    }

    // ---- required keys ---------------------------------------------------------------

    fn assert_missing_logd(pointer: &str, key: &str) {
        assert_missing::<LogdState>(LOGD_FIXTURE, pointer, key);
    }

    #[test]
    fn missing_required_keys_are_named() {
        for key in SERVER_KEYS {
            assert_missing_logd("/daemon/servers/virtlogd", key);
        }
        for key in ["auth", "readonly", "nrequests_client_max", "socks"] {
            assert_missing_logd("/daemon/servers/virtlogd/services/0", key);
        }
        for key in ["fd", "pid", "errfd", "isClient"] {
            assert_missing_logd("/daemon/servers/admin/services/0/socks/0", key);
        }
        for key in ["pipefd", "path", "driver", "domname", "domuuid"] {
            assert_missing_logd("/handler/files/1", key);
        }
        assert_missing_logd("", "daemon");
        assert_missing_logd("", "handler");
        assert_missing_logd("/handler", "files");
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
}
