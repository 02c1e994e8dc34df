//! Which replica a request goes to, as pure functions: the least loaded usable one (fewest
//! requests outstanding, ties to the one picked longest ago, i.e. in turn), or the one a
//! conversation is mapped to by rendezvous (highest-random-weight) hashing when the model is
//! balanced by affinity and that replica is usable.
//!
//! Owns only the rules; never touches slots, health or the network (`fair` and `forward` call
//! in with what they see). No allocation: the loads are read through a closure.
//!
//! Rendezvous hashing needs no state per conversation: every replica gets a weight from the
//! conversation's hash and the replica's name, the highest weight wins. A replica that leaves
//! (ejected, removed) moves only the conversations it held, each to its next-highest replica;
//! the others stay where their prompt cache is.

/// What the balancer sees of one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Healthy (or allowed anyway) with a free slot.
    pub usable: bool,
    /// Requests outstanding there now.
    pub outstanding: u64,
    /// When it was last picked (a counter; smaller is longer ago).
    pub last_pick: u64,
}

/// The candidate to use among `n` (`load(i)` describes the i-th): `preferred` if it is usable,
/// else the usable one with the fewest outstanding requests, ties broken in turn (the one
/// picked longest ago, then the first). `None` when none is usable.
pub fn pick(n: usize, load: impl Fn(usize) -> Load, preferred: Option<usize>) -> Option<usize> {
    if let Some(p) = preferred.filter(|&p| p < n && load(p).usable) {
        return Some(p);
    }
    let mut best: Option<(usize, Load)> = None;
    for i in 0..n {
        let l = load(i);
        if !l.usable {
            continue;
        }
        let better = match &best {
            None => true,
            Some((_, b)) => (l.outstanding, l.last_pick) < (b.outstanding, b.last_pick),
        };
        if better {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

/// A 64-bit mix (splitmix64's finaliser): spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a of a replica's name: its stable identity for rendezvous (names survive reloads).
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The rendezvous weight of replica `replica` (its [`name_hash`]) for `conversation`.
pub fn weight(conversation: u64, replica: u64) -> u64 {
    mix(conversation ^ mix(replica))
}

/// The index among `replicas` (their name hashes; `None` for one that may not be chosen now)
/// that `conversation` maps to: the highest weight. `None` when none may be chosen.
pub fn rendezvous(
    conversation: u64,
    replicas: impl IntoIterator<Item = Option<u64>>,
) -> Option<usize> {
    replicas
        .into_iter()
        .enumerate()
        .filter_map(|(i, h)| h.map(|h| (weight(conversation, h), i)))
        .max()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(usable: bool, outstanding: u64, last_pick: u64) -> Load {
        Load {
            usable,
            outstanding,
            last_pick,
        }
    }

    #[test]
    fn least_loaded_usable_wins_ties_go_in_turn() {
        let loads = [load(true, 3, 1), load(true, 1, 9), load(true, 2, 0)];
        assert_eq!(pick(3, |i| loads[i], None), Some(1), "fewest outstanding");
        // Saturated or ejected candidates are never picked, however idle.
        let loads = [load(false, 0, 0), load(true, 5, 0), load(false, 0, 0)];
        assert_eq!(pick(3, |i| loads[i], None), Some(1));
        let none = [load(false, 0, 0); 2];
        assert_eq!(pick(2, |i| none[i], None), None);
        assert_eq!(pick(0, |_| unreachable!(), None), None);

        // Ties: the one picked longest ago. Simulate sequential requests (each ends before the
        // next starts) over three idle replicas: strict rotation.
        let mut last = [0u64; 3];
        let mut order = Vec::new();
        for n in 1..=9 {
            let i = pick(3, |i| load(true, 0, last[i]), None).unwrap();
            last[i] = n;
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn preferred_wins_only_while_usable() {
        let loads = [load(true, 0, 0), load(true, 7, 0)];
        assert_eq!(
            pick(2, |i| loads[i], Some(1)),
            Some(1),
            "affinity over load"
        );
        let loads = [load(true, 0, 0), load(false, 1, 0)];
        assert_eq!(
            pick(2, |i| loads[i], Some(1)),
            Some(0),
            "saturated: least loaded"
        );
        assert_eq!(
            pick(2, |i| loads[i], Some(5)),
            Some(0),
            "out of range ignored"
        );
    }

    /// Concurrent requests (none ends) spread evenly: the outstanding count leads.
    #[test]
    fn concurrent_load_spreads_evenly() {
        let mut out = [0u64; 3];
        let mut last = [0u64; 3];
        for n in 1..=300 {
            let i = pick(3, |i| load(true, out[i], last[i]), None).unwrap();
            out[i] += 1;
            last[i] = n;
        }
        assert_eq!(out, [100, 100, 100]);
    }

    /// Rendezvous: stable for a conversation, spread over replicas, and losing a replica moves
    /// only the conversations it held.
    #[test]
    fn rendezvous_is_stable_and_moves_only_the_lost_replicas_conversations() {
        let names = ["vllm-a", "vllm-b", "vllm-c"].map(name_hash);
        let all = |c: u64| rendezvous(c, names.iter().map(|h| Some(*h))).unwrap();
        let mut count = [0usize; 3];
        let mut moved = 0;
        for c in 0..3000u64 {
            let conversation = mix(c);
            let home = all(conversation);
            assert_eq!(home, all(conversation), "same conversation, same replica");
            count[home] += 1;
            // vllm-b is ejected: only its conversations move, and never to it.
            let without_b = rendezvous(
                conversation,
                names
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (i != 1).then_some(*h)),
            )
            .unwrap();
            if home == 1 {
                assert_ne!(without_b, 1);
                moved += 1;
            } else {
                assert_eq!(without_b, home, "conversation {c} moved needlessly");
            }
        }
        for n in count {
            assert!((800..=1200).contains(&n), "uneven spread {count:?}");
        }
        assert_eq!(moved, count[1]);
        assert_eq!(rendezvous(1, [None, None]), None);
        // The weight depends on both inputs.
        assert_ne!(weight(1, names[0]), weight(2, names[0]));
        assert_ne!(weight(1, names[0]), weight(1, names[1]));
    }
}
