//! Hop 9 (a shared store only): the daemon reaches its PostgreSQL store. While it does not, the
//! appliance keeps serving with the last key set and spools usage locally; the hop says since
//! when, what failed, and how much usage waits.

use crate::control::StatusReport;
use crate::doctor::{Hop, HopResult};

pub(in crate::doctor) fn store_hop(s: &StatusReport) -> HopResult {
    let Some(st) = &s.store else {
        return HopResult::skip(
            Hop::Store,
            "skipped: the daemon reports no store (older version?)",
        );
    };
    if !st.degraded {
        return HopResult::pass(
            Hop::Store,
            format!("{} reachable; spool empty", st.location),
        );
    }
    let mut what = Vec::new();
    if let (Some(since), Some(p)) = (&st.keys_degraded_since, &st.keys_problem) {
        what.push(format!(
            "key reloads failing since {since} ({p}); the last key set stays in service"
        ));
    }
    if let (Some(since), Some(p)) = (&st.usage_degraded_since, &st.usage_problem) {
        what.push(format!(
            "usage writes failing since {since} ({p}); {} rows spooled locally",
            st.spooled_rows
        ));
    } else if st.spooled_rows > 0 {
        what.push(format!(
            "{} spooled usage rows not yet sent",
            st.spooled_rows
        ));
    }
    HopResult::fail(
        Hop::Store,
        format!("{}: DEGRADED: {}", st.location, what.join("; ")),
        "check that PostgreSQL runs and this appliance reaches it (`psql` with [store] url from here), its password_file and ca_file; usage is sent from the spool when it is back, never twice",
    )
}
