//! In-process presence: per room, each present user with the connections that keep them there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use crate::BoxFuture;
use crate::presence::{Presence, PresenceError};
use crate::room::{ConnId, RoomKey, UserId};

/// Presence for one instance.
///
/// A std mutex is right here: every operation is a few map updates and never awaits.
#[derive(Default)]
pub struct MemoryPresence {
    rooms: Mutex<HashMap<RoomKey, BTreeMap<UserId, HashSet<ConnId>>>>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Presence for MemoryPresence {
    fn add(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let conns = rooms
            .entry(key.clone())
            .or_default()
            .entry(user.clone())
            .or_default();
        let arrived = conns.is_empty();
        conns.insert(conn.clone());
        Box::pin(std::future::ready(Ok(arrived)))
    }

    fn remove(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut left = false;
        if let Some(users) = rooms.get_mut(key) {
            if let Some(conns) = users.get_mut(user)
                && conns.remove(conn)
                && conns.is_empty()
            {
                users.remove(user);
                left = true;
            }
            if users.is_empty() {
                rooms.remove(key);
            }
        }
        Box::pin(std::future::ready(Ok(left)))
    }

    fn users(&self, key: &RoomKey) -> BoxFuture<'_, Result<Vec<UserId>, PresenceError>> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let users = rooms
            .get(key)
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(users)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    crate::presence_test_suite!(|| async { Arc::new(MemoryPresence::new()) as Arc<dyn Presence> });
}
