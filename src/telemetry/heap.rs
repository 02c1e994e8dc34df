//! The allocator's own view of the heap, for `/metrics` and the soak (`scripts/soak.sh`).
//!
//! The binary runs on jemalloc (see `Cargo.toml`); its statistics tell apart what a growing
//! RSS is made of: `allocated` is what the program holds now (a leak grows it), `active` the
//! pages those allocations occupy (fragmentation is `active − allocated`), `resident` an
//! upper bound of what the allocator has in RAM (it counts freed pages not yet returned, and
//! pages handed out but never touched: in the soak it reads above the process's whole RSS),
//! `mapped` and `retained` its address space. Read at scrape time (one `epoch` refresh, a few `mallctl` reads: some
//! microseconds), never on the request path.
//!
//! Built without jemalloc (musl, other systems) the family is absent. In the library's own
//! tests jemalloc is linked but not the global allocator, so the figures are jemalloc's own
//! few pages: true, only not the program's.

use std::fmt::Write as _;

/// One reading of the allocator's statistics, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
    pub metadata: u64,
}

/// The allocator's statistics now, refreshed first; `None` without jemalloc or when a read
/// fails (the scrape then simply has no heap family).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
pub fn read() -> Option<HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance().ok()?;
    let r = |v: Result<usize, tikv_jemalloc_ctl::Error>| v.ok().map(|b| b as u64);
    Some(HeapStats {
        allocated: r(stats::allocated::read())?,
        active: r(stats::active::read())?,
        resident: r(stats::resident::read())?,
        mapped: r(stats::mapped::read())?,
        retained: r(stats::retained::read())?,
        metadata: r(stats::metadata::read())?,
    })
}

/// Without jemalloc there is nothing to read.
#[cfg(not(all(target_os = "linux", not(target_env = "musl"))))]
pub fn read() -> Option<HeapStats> {
    None
}

/// Appends `modelgate_heap_bytes{kind=...}` for `stats` (nothing for `None`).
pub fn render(out: &mut String, stats: Option<HeapStats>) {
    let Some(s) = stats else { return };
    super::header(
        out,
        "modelgate_heap_bytes",
        "The allocator's heap (jemalloc): allocated = held by the program, active = pages those allocations occupy, resident = upper bound of its pages in RAM (freed pages not yet returned included), mapped and retained = address space, metadata = the allocator's own.",
        "gauge",
    );
    for (kind, v) in [
        ("allocated", s.allocated),
        ("active", s.active),
        ("resident", s.resident),
        ("mapped", s.mapped),
        ("retained", s.retained),
        ("metadata", s.metadata),
    ] {
        let _ = writeln!(out, "modelgate_heap_bytes{{kind=\"{kind}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_kind_and_nothing_without_stats() {
        let mut out = String::new();
        render(&mut out, None);
        assert_eq!(out, "");
        render(
            &mut out,
            Some(HeapStats {
                allocated: 1,
                active: 2,
                resident: 3,
                mapped: 4,
                retained: 5,
                metadata: 6,
            }),
        );
        assert!(out.starts_with("# HELP modelgate_heap_bytes "));
        for line in [
            "modelgate_heap_bytes{kind=\"allocated\"} 1\n",
            "modelgate_heap_bytes{kind=\"active\"} 2\n",
            "modelgate_heap_bytes{kind=\"resident\"} 3\n",
            "modelgate_heap_bytes{kind=\"mapped\"} 4\n",
            "modelgate_heap_bytes{kind=\"retained\"} 5\n",
            "modelgate_heap_bytes{kind=\"metadata\"} 6\n",
        ] {
            assert!(out.contains(line), "{line:?} in {out}");
        }
    }

    /// jemalloc is linked into the library too (not as its global allocator in this test
    /// binary): its statistics read, and are self-consistent.
    #[cfg(all(target_os = "linux", not(target_env = "musl")))]
    #[test]
    fn jemalloc_statistics_read_and_are_ordered() {
        let s = read().expect("jemalloc statistics");
        assert!(s.active >= s.allocated, "{s:?}");
        assert!(s.mapped >= s.active, "{s:?}");
        assert!(s.metadata > 0, "{s:?}");
    }
}
