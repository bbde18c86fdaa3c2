//! The in-process broker: per-room offsets, a capped history and ordered local delivery.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

use crate::BoxFuture;
use crate::broker::{Broker, BrokerError, DeliverySink, HistoryPage, HistoryQuery, Position};
use crate::message::{Delivery, Message, Payload, PresenceChange, Publication};
use crate::room::RoomKey;

/// A broker for one instance. Each room keeps its latest offset and its newest messages, up to
/// the configured cap.
///
/// Each room has its own async lock, held while a delivery is handed to the sink, so the sink
/// sees every room in offset order; rooms never wait on each other.
pub struct MemoryBroker {
    rooms: Mutex<HashMap<RoomKey, Arc<tokio::sync::Mutex<RoomLog>>>>,
    history_size: usize,
    epoch: Arc<str>,
    sink: Arc<dyn DeliverySink>,
}

#[derive(Default)]
struct RoomLog {
    offset: u64,
    history: VecDeque<Arc<Message>>,
}

impl MemoryBroker {
    /// A broker that keeps up to `history_size` messages per room and delivers to `sink`.
    pub fn new(history_size: usize, sink: Arc<dyn DeliverySink>) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self {
            rooms: Mutex::new(HashMap::new()),
            history_size,
            epoch: format!("{started:x}").into(),
            sink,
        }
    }

    /// The epoch every room of this broker counts its offsets in.
    pub fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    fn room(&self, key: &RoomKey) -> Arc<tokio::sync::Mutex<RoomLog>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.entry(key.clone()).or_default().clone()
    }

    fn existing_room(&self, key: &RoomKey) -> Option<Arc<tokio::sync::Mutex<RoomLog>>> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.get(key).cloned()
    }

    async fn deliver_in_order(&self, key: RoomKey, payload: Payload) {
        let room = self.room(&key);
        let _order = room.lock().await;
        self.sink.deliver(Delivery::new(key, payload)).await;
    }
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        publication: Publication,
    ) -> BoxFuture<'_, Result<Arc<Message>, BrokerError>> {
        Box::pin(async move {
            let key = publication.key.clone();
            let room = self.room(&key);
            let mut log = room.lock().await;
            log.offset += 1;
            let message = Arc::new(publication.at(log.offset, self.epoch.clone()));
            if self.history_size > 0 {
                if log.history.len() == self.history_size {
                    log.history.pop_front();
                }
                log.history.push_back(message.clone());
            }
            let payload = Payload::Message(message.clone());
            self.sink.deliver(Delivery::new(key, payload)).await;
            Ok(message)
        })
    }

    fn publish_presence(
        &self,
        key: RoomKey,
        change: PresenceChange,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.deliver_in_order(key, Payload::Presence(change)).await;
            Ok(())
        })
    }

    fn emit(
        &self,
        key: RoomKey,
        event: Arc<str>,
        data: Arc<RawValue>,
    ) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let payload = Payload::Event { name: event, data };
            self.deliver_in_order(key, payload).await;
            Ok(())
        })
    }

    fn history(
        &self,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>> {
        let room = self.existing_room(key);
        Box::pin(async move {
            let page = match room {
                Some(room) => read_page(&*room.lock().await, query, &self.epoch),
                None => read_page(&RoomLog::default(), query, &self.epoch),
            };
            Ok(page)
        })
    }

    fn subscribe(&self, _key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, _key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn read_page(log: &RoomLog, query: HistoryQuery, epoch: &Arc<str>) -> HistoryPage {
    let position = Position {
        offset: log.offset,
        epoch: epoch.clone(),
    };
    let before = query.before.unwrap_or(u64::MAX);
    // Offsets in `history` are consecutive, so positions are computed, not searched.
    let first_kept = log.history.front().map_or(log.offset + 1, |m| m.offset);
    let in_range = |from: u64, to: u64| -> Vec<Arc<Message>> {
        if from >= to {
            return Vec::new();
        }
        let skip = usize::try_from(from - first_kept).unwrap_or(usize::MAX);
        let take = usize::try_from(to - from).unwrap_or(usize::MAX);
        log.history.iter().skip(skip).take(take).cloned().collect()
    };
    let end = before.min(log.offset + 1);
    match query.since {
        Some(since) => {
            let from = since.saturating_add(1).max(first_kept);
            let to = end.min(from.saturating_add(query.limit as u64));
            let messages = in_range(from, to);
            let complete =
                since <= log.offset && since.saturating_add(1) >= first_kept && to >= end;
            HistoryPage {
                messages,
                position,
                complete,
            }
        }
        None => {
            let from = end.saturating_sub(query.limit as u64).max(first_kept);
            HistoryPage {
                messages: in_range(from, end),
                position,
                complete: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testsuite::Recorder;

    crate::broker_test_suite!(|node: Arc<dyn crate::LocalNode>| async move {
        Arc::new(MemoryBroker::new(crate::testsuite::HISTORY_SIZE, node)) as Arc<dyn Broker>
    });

    #[tokio::test]
    async fn a_zero_history_size_keeps_nothing_but_offsets() {
        let (sink, _rx) = Recorder::sink();
        let broker = MemoryBroker::new(0, sink);
        let key = crate::testsuite::key("r");
        for _ in 0..3 {
            broker
                .publish(crate::testsuite::publication(&key, "1"))
                .await
                .expect("publish");
        }
        let page = broker
            .history(&key, crate::testsuite::since(0, 10))
            .await
            .expect("history");
        assert_eq!(page.position.offset, 3);
        assert!(page.messages.is_empty());
        assert!(!page.complete);
    }
}
