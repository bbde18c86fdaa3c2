//! A room's local members, kept compact while the room is small.
//!
//! Most rooms an instance holds have one member: every connection is alone in the room named
//! by its id, and usually in its user's personal room. A `HashMap` of one allocates four
//! slots and their control bytes (about 420 bytes for a member here: heaptrack of 2,000 idle
//! Socket.IO connections), a `Vec` of one a single slot. Small rooms are a `Vec` searched
//! in order, large ones a map; a room that shrinks back below [`BACK_TO_FEW`] members
//! becomes a `Vec` again.

use std::collections::HashMap;
use std::collections::hash_map::{self, Entry};

use herald_core::ConnId;

/// A room grows from a `Vec` into a map past this many members.
const FEW: usize = 32;
/// A map that shrinks to this many members becomes a `Vec` again.
const BACK_TO_FEW: usize = FEW / 4;

/// A member of a room, known by its connection's id.
pub(super) trait Keyed {
    fn key(&self) -> &ConnId;
}

pub(super) enum Members<M> {
    Few(Vec<M>),
    Many(HashMap<ConnId, M>),
}

impl<M> Default for Members<M> {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl<M: Keyed> Members<M> {
    pub fn len(&self) -> usize {
        match self {
            Self::Few(few) => few.len(),
            Self::Many(many) => many.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains_key(&self, id: &ConnId) -> bool {
        match self {
            Self::Few(few) => few.iter().any(|m| m.key() == id),
            Self::Many(many) => many.contains_key(id),
        }
    }

    pub fn get_mut(&mut self, id: &ConnId) -> Option<&mut M> {
        match self {
            Self::Few(few) => few.iter_mut().find(|m| m.key() == id),
            Self::Many(many) => many.get_mut(id),
        }
    }

    /// Adds `member` unless one with its id is here. Returns whether it was added.
    pub fn insert(&mut self, member: M) -> bool {
        match self {
            Self::Few(few) if few.iter().any(|m| m.key() == member.key()) => false,
            Self::Few(few) if few.len() < FEW => {
                // A Vec's first push reserves four slots; a room of one needs one.
                if few.len() < 4 {
                    few.reserve_exact(1);
                }
                few.push(member);
                true
            }
            Self::Few(few) => {
                let mut many: HashMap<ConnId, M> =
                    few.drain(..).map(|m| (m.key().clone(), m)).collect();
                many.insert(member.key().clone(), member);
                *self = Self::Many(many);
                true
            }
            Self::Many(many) => match many.entry(member.key().clone()) {
                Entry::Occupied(_) => false,
                Entry::Vacant(slot) => {
                    slot.insert(member);
                    true
                }
            },
        }
    }

    pub fn remove(&mut self, id: &ConnId) -> Option<M> {
        match self {
            Self::Few(few) => {
                let at = few.iter().position(|m| m.key() == id)?;
                Some(few.swap_remove(at))
            }
            Self::Many(many) => {
                let removed = many.remove(id)?;
                if many.len() <= BACK_TO_FEW {
                    let few: Vec<M> = many.drain().map(|(_, m)| m).collect();
                    *self = Self::Few(few);
                }
                Some(removed)
            }
        }
    }

    pub fn values(&self) -> Either<std::slice::Iter<'_, M>, hash_map::Values<'_, ConnId, M>> {
        match self {
            Self::Few(few) => Either::Left(few.iter()),
            Self::Many(many) => Either::Right(many.values()),
        }
    }

    pub fn values_mut(
        &mut self,
    ) -> Either<std::slice::IterMut<'_, M>, hash_map::ValuesMut<'_, ConnId, M>> {
        match self {
            Self::Few(few) => Either::Left(few.iter_mut()),
            Self::Many(many) => Either::Right(many.values_mut()),
        }
    }
}

/// One of two iterators over the same items, without boxing: deliveries walk a room's
/// members for every message.
pub(super) enum Either<L, R> {
    Left(L),
    Right(R),
}

impl<T, L: Iterator<Item = T>, R: Iterator<Item = T>> Iterator for Either<L, R> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Self::Left(left) => left.next(),
            Self::Right(right) => right.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    struct Member(ConnId, u32);

    impl Keyed for Member {
        fn key(&self) -> &ConnId {
            &self.0
        }
    }

    fn id(n: usize) -> ConnId {
        ConnId::new(format!("c{n}"))
    }

    fn ids(members: &Members<Member>) -> BTreeSet<String> {
        members.values().map(|m| m.0.as_str().to_owned()).collect()
    }

    #[test]
    fn a_room_of_one_holds_one_slot() {
        let mut members = Members::default();
        assert!(members.insert(Member(id(1), 0)));
        let Members::Few(few) = &members else {
            panic!("a room of one is a Vec");
        };
        assert_eq!(few.capacity(), 1);
    }

    #[test]
    fn members_are_kept_by_id_through_growing_and_shrinking() {
        let mut members = Members::default();
        for n in 0..100 {
            assert!(members.insert(Member(id(n), 0)), "member {n} is new");
            assert!(!members.insert(Member(id(n), 1)), "member {n} is there");
        }
        assert!(matches!(members, Members::Many(_)));
        assert_eq!(members.len(), 100);
        if let Some(member) = members.get_mut(&id(7)) {
            member.1 = 7;
        }
        for member in members.values_mut() {
            member.1 += 1;
        }
        assert_eq!(members.get_mut(&id(7)).map(|m| m.1), Some(8));
        assert_eq!(members.get_mut(&id(8)).map(|m| m.1), Some(1));
        for n in 8..100 {
            assert!(members.remove(&id(n)).is_some(), "member {n} leaves");
            assert!(members.remove(&id(n)).is_none(), "member {n} left");
        }
        assert!(matches!(members, Members::Few(_)), "shrunk back");
        let left: BTreeSet<String> = (0..8).map(|n| format!("c{n}")).collect();
        assert_eq!(ids(&members), left);
        assert!(members.contains_key(&id(3)));
        assert!(!members.contains_key(&id(30)));
        for n in 0..8 {
            assert!(members.remove(&id(n)).is_some());
        }
        assert!(members.is_empty());
    }
}
