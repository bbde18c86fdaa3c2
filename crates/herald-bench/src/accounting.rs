//! Delivery accounting: expected deliveries, loss and duplicates per client and room.
//!
//! Offsets count 1, 2, 3… per room, so a room's offsets after a client's join fit a bitmap
//! starting at the join ack's offset. The expected deliveries are, for each message acked
//! `ok`, the members that had joined its room; a delivery is matched when its `(room,
//! offset)` is such a message, a duplicate when the client already saw that `(room, offset)`.

/// Widest span of offsets a set tracks (64 Mi offsets, 8 MiB of bits); offsets beyond it
/// are counted as out of range rather than allocating without bound on a bogus frame.
pub const MAX_SPAN: u64 = 1 << 26;

/// What inserting an offset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// At or below the base: sent before the client joined (a replay).
    Stale,
    OutOfRange,
}

/// A set of offsets above `base`, as a bitmap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetSet {
    base: u64,
    words: Vec<u64>,
    len: u64,
}

impl OffsetSet {
    /// An empty set of offsets greater than `base`.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            words: Vec::new(),
            len: 0,
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn index(&self, offset: u64) -> Option<(usize, u64)> {
        let bit = offset.checked_sub(self.base)?.checked_sub(1)?;
        (bit < MAX_SPAN).then(|| ((bit / 64) as usize, 1u64 << (bit % 64)))
    }

    pub fn insert(&mut self, offset: u64) -> Insert {
        if offset <= self.base {
            return Insert::Stale;
        }
        let Some((word, mask)) = self.index(offset) else {
            return Insert::OutOfRange;
        };
        if word >= self.words.len() {
            self.words.resize((word + 1).next_power_of_two(), 0);
        }
        if self.words[word] & mask != 0 {
            return Insert::Duplicate;
        }
        self.words[word] |= mask;
        self.len += 1;
        Insert::New
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.index(offset)
            .and_then(|(word, mask)| self.words.get(word).map(|w| w & mask != 0))
            .unwrap_or(false)
    }

    /// The offsets in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(move |(i, word)| {
            let base = self.base + 1 + i as u64 * 64;
            (0..64u64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| base + bit)
        })
    }

    /// How many offsets are in both sets, whatever their bases.
    pub fn intersection_len(&self, other: &OffsetSet) -> u64 {
        if self.base == other.base {
            return self
                .words
                .iter()
                .zip(&other.words)
                .map(|(a, b)| u64::from((a & b).count_ones()))
                .sum();
        }
        let (small, large) = if self.len <= other.len {
            (self, other)
        } else {
            (other, self)
        };
        small.iter().filter(|o| large.contains(*o)).count() as u64
    }
}

/// What one client saw in one room it joined.
#[derive(Debug, Clone)]
pub struct Membership {
    pub room: u32,
    pub received: OffsetSet,
}

/// One client's deliveries, for the final tally.
#[derive(Debug, Clone, Default)]
pub struct ClientLedger {
    pub rooms: Vec<Membership>,
    pub duplicates: u64,
    pub stale: u64,
    pub out_of_range: u64,
    /// Deliveries for rooms this client did not join.
    pub foreign: u64,
}

impl ClientLedger {
    /// Records a delivery of `offset` in `room`.
    pub fn record(&mut self, room: u32, offset: u64) -> Insert {
        let Some(membership) = self.rooms.iter_mut().find(|m| m.room == room) else {
            self.foreign += 1;
            return Insert::OutOfRange;
        };
        let insert = membership.received.insert(offset);
        match insert {
            Insert::New => {}
            Insert::Duplicate => self.duplicates += 1,
            Insert::Stale => self.stale += 1,
            Insert::OutOfRange => self.out_of_range += 1,
        }
        insert
    }
}

/// Loss and duplicates over a whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// For every message acked ok, the members of its room.
    pub expected: u64,
    /// Distinct `(client, room, offset)` deliveries.
    pub received: u64,
    /// Received deliveries of messages acked ok.
    pub matched: u64,
    /// `expected - matched`.
    pub lost: u64,
    pub duplicates: u64,
    /// Deliveries of messages not acked ok (ack lost, timed out, or another publisher's).
    pub unexpected: u64,
    /// Offsets at or below a client's join offset, out of range, or for rooms it did not join.
    pub stale: u64,
}

/// The offsets acked ok in each room, from every sender's acks.
pub fn acked_sets(rooms: usize, acks: impl IntoIterator<Item = (u32, u64)>) -> Vec<OffsetSet> {
    let mut acks: Vec<(u32, u64)> = acks.into_iter().collect();
    acks.sort_unstable();
    let mut sets: Vec<OffsetSet> = (0..rooms)
        .map(|room| {
            let first = acks
                .iter()
                .find(|(r, _)| *r as usize == room)
                .map_or(0, |(_, o)| *o);
            OffsetSet::new(first.saturating_sub(1))
        })
        .collect();
    for (room, offset) in acks {
        if let Some(set) = sets.get_mut(room as usize) {
            set.insert(offset);
        }
    }
    sets
}

/// Compares what clients received with what was acked.
pub fn reconcile<'a>(
    acked: &[OffsetSet],
    clients: impl IntoIterator<Item = &'a ClientLedger>,
) -> Tally {
    let mut tally = Tally::default();
    for client in clients {
        tally.duplicates += client.duplicates;
        tally.stale += client.stale + client.out_of_range + client.foreign;
        for membership in &client.rooms {
            let Some(sent) = acked.get(membership.room as usize) else {
                tally.received += membership.received.len();
                tally.unexpected += membership.received.len();
                continue;
            };
            let matched = membership.received.intersection_len(sent);
            tally.expected += sent.len();
            tally.received += membership.received.len();
            tally.matched += matched;
            tally.unexpected += membership.received.len() - matched;
        }
    }
    tally.lost = tally.expected - tally.matched;
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(rooms: &[(u32, u64)]) -> ClientLedger {
        ClientLedger {
            rooms: rooms
                .iter()
                .map(|(room, base)| Membership {
                    room: *room,
                    received: OffsetSet::new(*base),
                })
                .collect(),
            ..ClientLedger::default()
        }
    }

    #[test]
    fn offset_sets_detect_duplicates_and_stale_offsets() {
        let mut set = OffsetSet::new(10);
        assert_eq!(set.insert(10), Insert::Stale);
        assert_eq!(set.insert(11), Insert::New);
        assert_eq!(set.insert(200), Insert::New);
        assert_eq!(set.insert(11), Insert::Duplicate);
        assert_eq!(set.insert(10 + MAX_SPAN + 1), Insert::OutOfRange);
        assert_eq!(set.insert(u64::MAX), Insert::OutOfRange);
        assert_eq!(set.len(), 2);
        assert!(set.contains(200) && !set.contains(12) && !set.contains(5));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![11, 200]);
    }

    #[test]
    fn intersections_work_across_bases() {
        let mut a = OffsetSet::new(0);
        let mut b = OffsetSet::new(5);
        for o in 1..=20 {
            a.insert(o);
        }
        for o in [6, 7, 30] {
            b.insert(o);
        }
        assert_eq!(a.intersection_len(&b), 2);
        assert_eq!(b.intersection_len(&a), 2);
        let mut c = OffsetSet::new(0);
        c.insert(3);
        c.insert(64);
        c.insert(65);
        assert_eq!(a.intersection_len(&c), 1);
    }

    #[test]
    fn expected_deliveries_count_every_member_of_each_acked_message() {
        // Room 0 has three members, room 1 two; three messages acked in room 0, one in room 1.
        let acked = acked_sets(2, [(0, 1), (0, 2), (0, 3), (1, 1)]);
        let mut clients = vec![
            ledger(&[(0, 0)]),
            ledger(&[(0, 0)]),
            ledger(&[(0, 0), (1, 0)]),
            ledger(&[(1, 0)]),
        ];
        for c in &mut clients[..3] {
            for o in 1..=3 {
                assert_eq!(c.record(0, o), Insert::New);
            }
        }
        clients[2].record(1, 1);
        clients[3].record(1, 1);
        let tally = reconcile(&acked, &clients);
        assert_eq!(tally.expected, 3 * 3 + 2);
        assert_eq!(tally.matched, 11);
        assert_eq!(tally.lost, 0);
        assert_eq!(tally.duplicates, 0);
    }

    #[test]
    fn losses_duplicates_and_unacked_deliveries_are_told_apart() {
        // Offsets 1..=4 published; 3 was never acked ok (say its ack timed out).
        let acked = acked_sets(1, [(0, 1), (0, 2), (0, 4)]);
        let mut a = ledger(&[(0, 0)]);
        let mut b = ledger(&[(0, 0)]);
        for o in [1, 2, 3, 4, 2] {
            a.record(0, o);
        }
        b.record(0, 1); // 2 and 4 lost
        b.record(1, 1); // a room b never joined
        let tally = reconcile(&acked, [&a, &b]);
        assert_eq!(tally.expected, 6);
        assert_eq!(tally.matched, 4);
        assert_eq!(tally.lost, 2);
        assert_eq!(tally.duplicates, 1);
        assert_eq!(tally.unexpected, 1);
        assert_eq!(tally.received, 5);
        assert_eq!(tally.stale, 1);
    }

    #[test]
    fn a_client_that_joined_late_expects_nothing_from_before() {
        // Offsets at or below the join offset are replays, not expected live.
        let acked = acked_sets(1, [(0, 5), (0, 6)]);
        let mut late = ledger(&[(0, 5)]);
        assert_eq!(late.record(0, 5), Insert::Stale);
        late.record(0, 6);
        let tally = reconcile(&acked, [&late]);
        // The tally still expects both acked offsets of every member: joins all complete
        // before anyone publishes, so a late member's gap is loss.
        assert_eq!(tally.expected, 2);
        assert_eq!(tally.lost, 1);
        assert_eq!(tally.stale, 1);
    }
}
