//! The re-exec state documents: virtlogd's and virtlockd's, in every shape libvirt
//! 9.0 and 11.3 write. Whatever parses must write back to a document that parses to
//! the same state.

use virtlockd::state::LockdState;
use virtlogd::state::{LogdState, StateDocument};
use vh_common::restart;

pub fn parse(data: &[u8]) {
    // The daemons read the file as UTF-8 and refuse anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = restart::scan_magic(text);
    if let Ok(doc) = LogdState::parse(text) {
        let again = LogdState::parse(&doc.to_json_string());
        assert_eq!(again.as_ref().ok(), Some(&doc), "virtlogd state round trip");
    }
    if let Ok(doc) = LockdState::parse(text) {
        let again = LockdState::parse(&doc.to_json_string());
        assert_eq!(
            again.as_ref().ok(),
            Some(&doc),
            "virtlockd state round trip"
        );
    }
}
