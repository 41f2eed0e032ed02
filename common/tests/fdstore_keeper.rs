//! The keeper's ordering against a stand-in notify socket (its own process: the keeper's
//! hooks are process-wide).

// In a cfg(test) module, where the workspace allows unwrap (a panic is the report).
#[cfg(test)]
mod keeper_order {
    /// The keeper's hooks are process-wide: one test at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use vh_common::fdstore::{parse_snapshot, FdStore};
    use vh_common::fdstore_keeper::{self as keeper, FdKind, Keeper};

    /// The messages the store received so far: (text, number of fds).
    fn drain(rx: &UnixDatagram) -> Vec<(String, usize)> {
        rx.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        while let Ok((text, fds)) = vh_testkit::recv_notify(rx) {
            out.push((text, fds.len()));
        }
        out
    }

    fn name_of(msg: &str) -> &str {
        msg.lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("")
    }

    fn table(k: &Keeper) -> std::collections::HashMap<String, RawFd> {
        parse_snapshot(&k.latest().unwrap().1).unwrap().0
    }

    #[test]
    fn stored_before_named_removed_after_dropped_and_reused_numbers_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let k = Keeper::start(FdStore::at(path.as_os_str()), None).unwrap();
        // The slots are stored with the first snapshot, not before: a start that dies
        // before it leaves nothing, not slots without a document.
        assert!(drain(&rx).is_empty());
        assert!(keeper::active());

        // Nothing is written before `go`.
        let (a, _aw) = nix::unistd::pipe().unwrap();
        assert_eq!(
            k.write(&[(a.as_raw_fd(), FdKind::Log)], "early").unwrap(),
            0
        );
        assert!(k.latest().is_none());
        k.go();
        assert!(k.due());

        let (b, _bw) = nix::unistd::pipe().unwrap();
        let fds = [(a.as_raw_fd(), FdKind::Log), (b.as_raw_fd(), FdKind::Lease)];
        assert_eq!(k.write(&fds, "doc1").unwrap(), 2);
        let mut m = drain(&rx);
        let slots: Vec<_> = m.drain(..2).collect();
        assert!(
            slots.iter().all(|(t, n)| t.contains("FDPOLL=0")
                && name_of(t).starts_with("vh-state-")
                && *n == 1),
            "the slots first: {slots:?}"
        );
        assert_eq!(m.len(), 2, "one FDSTORE per new fd: {m:?}");
        let (a_name, b_name) = (name_of(&m[0].0).to_string(), name_of(&m[1].0).to_string());
        assert!(a_name.starts_with("vh-log-") && b_name.starts_with("vh-lease-"));
        assert_eq!(table(&k)[&b_name], b.as_raw_fd());
        assert!(!k.due(), "written");

        // Nothing changed: the same fds are not stored again.
        keeper::touch();
        assert!(k.due());
        assert_eq!(k.write(&fds, "doc1 again").unwrap(), 0);
        assert!(drain(&rx).is_empty());

        // The lease is closed and its number reused by another lease (same kind): only
        // `closing` tells them apart. The new one is stored under a new name, the old name
        // removed after the snapshot without it.
        let b_num = b.as_raw_fd();
        keeper::closing(b_num);
        drop(b);
        let (c, _cw) = nix::unistd::pipe().unwrap();
        let c = if c.as_raw_fd() == b_num {
            c
        } else {
            nix::unistd::dup2(c.as_raw_fd(), b_num).unwrap();
            // SAFETY: dup2 just opened b_num; nothing else owns it.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(b_num) }
        };
        assert_eq!(c.as_raw_fd(), b_num);
        let fds = [(a.as_raw_fd(), FdKind::Log), (c.as_raw_fd(), FdKind::Lease)];
        assert_eq!(k.write(&fds, "doc2").unwrap(), 1);
        let m = drain(&rx);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].0.starts_with("FDSTORE=1") && m[0].1 == 1);
        let c_name = name_of(&m[0].0).to_string();
        assert_ne!(c_name, b_name);
        assert_eq!(m[1].0, format!("FDSTOREREMOVE=1\nFDNAME={b_name}"));
        let t = table(&k);
        assert_eq!(t[&c_name], b_num);
        assert!(!t.contains_key(&b_name));

        // A log gone from the document: removed after the snapshot without it.
        keeper::touch();
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "doc3").unwrap(),
            0
        );
        let m = drain(&rx);
        assert_eq!(m, vec![(format!("FDSTOREREMOVE=1\nFDNAME={a_name}"), 0)]);
        assert_eq!(parse_snapshot(&k.latest().unwrap().1).unwrap().1, "doc3");
        assert_eq!(k.stats().stored, 3, "c and two slots");

        // Before a re-exec: everything out of the store, nothing stored after.
        k.clear().unwrap();
        let m = drain(&rx);
        let removed: Vec<&str> = m.iter().map(|(t, _)| name_of(t)).collect();
        assert_eq!(removed.len(), 3, "{m:?}");
        assert!(removed.contains(&c_name.as_str()));
        assert!(removed.contains(&"vh-state-a") && removed.contains(&"vh-state-b"));
        assert!(!keeper::active());
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "frozen")
                .unwrap(),
            0
        );
        assert!(drain(&rx).is_empty());
        // A failed exec: slots stored again, then everything with the next snapshot.
        k.resume_after_failed_exec();
        assert_eq!(drain(&rx).len(), 2);
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "doc4").unwrap(),
            1
        );
    }

    /// Review finding 2: after a resume, stale names are removed before anything is
    /// stored, and new names (and client ids) start above every passed name, so a new
    /// fd is never stored under a stale name and removed with it.
    #[test]
    fn stale_names_removed_first_and_never_reused() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let (kept, _kw) = nix::unistd::pipe().unwrap();
        let passed =
            std::collections::HashMap::from([("vh-lease-76".to_string(), kept.as_raw_fd())]);
        let stale = vec![
            "vh-lease-77".to_string(),
            "vh-client-virtlockd-9".to_string(),
            "vh-client-admin-2".to_string(),
        ];
        assert_eq!(
            keeper::stale_client_ids(&stale),
            std::collections::HashMap::from([
                ("virtlockd".to_string(), 9),
                ("admin".to_string(), 2)
            ])
        );
        let slots = vh_common::fdstore::StateSlots::create().unwrap();
        let k = Keeper::start(FdStore::at(path.as_os_str()), Some((slots, passed, stale))).unwrap();
        let m = drain(&rx);
        let removed: Vec<&str> = m
            .iter()
            .filter(|(t, n)| t.starts_with("FDSTOREREMOVE=1") && *n == 0)
            .map(|(t, _)| name_of(t))
            .collect();
        assert_eq!(m.len(), 3, "removals only, before any store: {m:?}");
        assert_eq!(
            removed,
            ["vh-lease-77", "vh-client-virtlockd-9", "vh-client-admin-2"]
        );
        k.go();
        let (fresh, _fw) = nix::unistd::pipe().unwrap();
        let fds = [
            (kept.as_raw_fd(), FdKind::Lease),
            (fresh.as_raw_fd(), FdKind::Lease),
        ];
        assert_eq!(k.write(&fds, "doc").unwrap(), 1);
        let m = drain(&rx);
        assert_eq!(
            m.len(),
            1,
            "the resumed slots are in the store already: {m:?}"
        );
        assert_eq!(name_of(&m[0].0), "vh-lease-78", "above the stale 77");
        assert!(!table(&k).contains_key("vh-lease-77"));

        // Review finding 10: removals that fail before a re-exec are reported (the exec
        // is then refused) and sent again with the next snapshot.
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(k.clear(), Err(4), "two fds and two slots");
        let rx = UnixDatagram::bind(&path).unwrap();
        k.resume_after_failed_exec();
        assert_eq!(drain(&rx).len(), 2, "the slots");
        assert_eq!(k.write(&fds, "doc again").unwrap(), 2);
        let m = drain(&rx);
        let removed: Vec<&str> = m
            .iter()
            .filter(|(t, _)| t.starts_with("FDSTOREREMOVE=1"))
            .map(|(t, _)| name_of(t))
            .collect();
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(removed.contains(&"vh-lease-76") && removed.contains(&"vh-lease-78"));
        k.clear().unwrap();
        drain(&rx);
    }

    /// Review finding 3: a number the document names but the store did not give back
    /// is held by a placeholder, which the restore refuses to adopt.
    #[test]
    fn lost_numbers_are_never_adopted() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (r, _w) = nix::unistd::pipe().unwrap();
        let n = r.as_raw_fd();
        drop(r);
        vh_common::fdstore::hold_lost(&[n]).unwrap();
        assert!(vh_common::daemon::adopt_fd(n).is_err());
        let adopted = vh_common::daemon::adopt_inheritable_fds(&[n]);
        assert!(adopted[0].is_err());
        vh_common::fdstore::release_lost();
    }
}
