//! Names: namespaces, rooms, users and connections, with the rules a room name must follow.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

/// The longest room name accepted, in bytes.
pub const MAX_ROOM_LEN: usize = 128;

/// The prefix of every user's personal room, `user:<id>`.
pub const USER_ROOM_PREFIX: &str = "user:";

/// Why a room name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_LEN} bytes")]
    TooLong,
    #[error("room name contains {0:?}; allowed are letters, digits and _ - : . @ / = + |")]
    BadChar(char),
}

/// A validated room name: 1 to 128 bytes of `A-Z a-z 0-9 _ - : . @ / = + |`.
///
/// The charset keeps names safe inside Redis channel names (`socket.io#/#<room>#`), URLs and
/// logs; `#`, `*` and whitespace are refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` as a room name.
    pub fn new(name: &str) -> Result<Self, RoomError> {
        if name.is_empty() {
            return Err(RoomError::Empty);
        }
        if name.len() > MAX_ROOM_LEN {
            return Err(RoomError::TooLong);
        }
        if let Some(bad) = name.chars().find(|c| !is_room_char(*c)) {
            return Err(RoomError::BadChar(bad));
        }
        Ok(Self(name.into()))
    }

    /// The personal room of `user`, which only that user may join.
    pub fn personal(user: &UserId) -> Self {
        Self(format!("{USER_ROOM_PREFIX}{}", user.as_str()).into())
    }

    /// The room every connection of a namespace is in, which namespace-wide broadcasts reach.
    /// Its name, `*`, is not a valid client room name, so no client can join or publish to it.
    pub fn everyone() -> Self {
        Self("*".into())
    }

    pub fn is_everyone(&self) -> bool {
        &*self.0 == "*"
    }

    /// The user this room belongs to, when it is a personal room.
    pub fn owner(&self) -> Option<&str> {
        self.0.strip_prefix(USER_ROOM_PREFIX)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `|` is there for identity providers' user ids (`auth0|…`, `google-oauth2|…`), which
/// name personal rooms.
fn is_room_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '@' | '/' | '=' | '+' | '|')
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RoomName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A Socket.IO namespace such as `/` or `/events`; each namespace is its own room space.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Namespace(Arc<str>);

impl Namespace {
    /// The default namespace, `/`.
    pub fn root() -> Self {
        Self("/".into())
    }

    /// A namespace path; a missing leading `/` is added.
    pub fn new(path: &str) -> Self {
        if path.starts_with('/') {
            Self(path.into())
        } else {
            Self(format!("/{path}").into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room within its namespace: the unit of ordering, offsets, history and presence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey {
    pub namespace: Namespace,
    pub room: RoomName,
}

impl RoomKey {
    pub fn new(namespace: Namespace, room: RoomName) -> Self {
        Self { namespace, room }
    }
}

impl fmt::Display for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.namespace, self.room)
    }
}

/// A user id: the `sub` claim of the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One client connection, of either transport; unique within the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnId(Arc<str>);

impl ConnId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The rooms a token allows joining: glob patterns (`chat:*`) from its `rooms` claim, or any
/// room when the claim is absent.
#[derive(Debug, Clone, Default)]
pub struct RoomPatterns(Option<Arc<[WildMatch]>>);

impl RoomPatterns {
    /// Any room may be joined.
    pub fn any() -> Self {
        Self(None)
    }

    /// Only rooms matching one of `patterns` may be joined (none, if it is empty).
    pub fn only<S: AsRef<str>>(patterns: &[S]) -> Self {
        Self(Some(
            patterns
                .iter()
                .map(|p| WildMatch::new(p.as_ref()))
                .collect(),
        ))
    }

    pub fn allows(&self, room: &RoomName) -> bool {
        match &self.0 {
            None => true,
            Some(patterns) => patterns.iter().any(|p| p.matches(room.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_follow_the_charset_and_length() {
        assert!(RoomName::new("chat:lobby").is_ok());
        assert!(RoomName::new("a.b-c_d@e/f=g+h").is_ok());
        assert!(RoomName::new("user:auth0|5f7c8ec7c33c6c004bbafe82").is_ok());
        assert_eq!(RoomName::new(""), Err(RoomError::Empty));
        assert_eq!(RoomName::new("a#b"), Err(RoomError::BadChar('#')));
        assert_eq!(RoomName::new("bad room"), Err(RoomError::BadChar(' ')));
        assert_eq!(RoomName::new("x*"), Err(RoomError::BadChar('*')));
        assert!(RoomName::new(&"r".repeat(MAX_ROOM_LEN)).is_ok());
        assert_eq!(
            RoomName::new(&"r".repeat(MAX_ROOM_LEN + 1)),
            Err(RoomError::TooLong)
        );
    }

    #[test]
    fn personal_rooms_name_their_owner() {
        let room = RoomName::personal(&UserId::new("alice"));
        assert_eq!(room.as_str(), "user:alice");
        assert_eq!(room.owner(), Some("alice"));
        assert_eq!(
            RoomName::new("lobby").map(|r| r.owner().is_none()),
            Ok(true)
        );
    }

    #[test]
    fn patterns_limit_rooms() {
        let p = RoomPatterns::only(&["chat:*", "news"]);
        let ok = |s| p.allows(&RoomName::new(s).expect("valid room"));
        assert!(ok("chat:1"));
        assert!(ok("news"));
        assert!(!ok("newsroom"));
        assert!(!ok("admin"));
        assert!(RoomPatterns::any().allows(&RoomName::new("admin").expect("valid room")));
        assert!(!RoomPatterns::only::<&str>(&[]).allows(&RoomName::new("a").expect("valid")));
    }

    #[test]
    fn namespaces_get_a_leading_slash() {
        assert_eq!(Namespace::new("events").as_str(), "/events");
        assert_eq!(Namespace::new("/events").as_str(), "/events");
    }
}
