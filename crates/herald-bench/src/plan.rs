//! The scenario plan: which client connects where, which rooms it joins, and who sends.
//!
//! Membership is laid out as `rooms × members` slots; slot `k` puts client `k % clients` in
//! room `k / members`, so a room's members are consecutive clients and, with clients spread
//! over the URLs round robin, every room has members on every instance. Sender `j` is member
//! `j / rooms` of room `j % rooms`, so senders spread evenly over the rooms.

/// Why a scenario cannot be laid out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--members {members} is more than --clients {clients}: a client joins a room once")]
    TooManyMembers { members: usize, clients: usize },
    #[error("--senders {senders} is more than the {slots} room memberships (rooms × members)")]
    TooManySenders { senders: usize, slots: usize },
    #[error("--rooms {0} needs --members of at least 1 (or --api-batch publishers only)")]
    EmptyRooms(usize),
    #[error("--senders needs at least one room")]
    SendersWithoutRooms,
    #[error("no URL to connect to")]
    NoUrls,
}

/// The shape of a run, as the flags give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub clients: usize,
    pub rooms: usize,
    pub members: usize,
    pub senders: usize,
    pub urls: usize,
}

/// Who does what.
#[derive(Debug, Clone)]
pub struct Plan {
    pub shape: Shape,
    /// Room names, by room index.
    pub room_names: Vec<String>,
    /// Each room's members (client indices).
    pub members: Vec<Vec<usize>>,
    /// Each client's rooms (room indices).
    pub client_rooms: Vec<Vec<u32>>,
    /// Each client's rooms it publishes to (room indices); empty for non-senders.
    pub client_sends: Vec<Vec<u32>>,
}

impl Plan {
    pub fn new(shape: Shape, room_prefix: &str) -> Result<Self, PlanError> {
        let Shape {
            clients,
            rooms,
            members,
            senders,
            urls,
        } = shape;
        if urls == 0 {
            return Err(PlanError::NoUrls);
        }
        // Rooms nobody joins only make sense for publishers outside the plan (--api-batch):
        // they measure publishing and storing without live delivery.
        if rooms > 0 && members == 0 && senders > 0 {
            return Err(PlanError::EmptyRooms(rooms));
        }
        if members > clients {
            return Err(PlanError::TooManyMembers { members, clients });
        }
        if senders > 0 && rooms == 0 {
            return Err(PlanError::SendersWithoutRooms);
        }
        let slots = rooms * members;
        if senders > slots {
            return Err(PlanError::TooManySenders { senders, slots });
        }
        let mut room_members = vec![Vec::with_capacity(members); rooms];
        let mut client_rooms = vec![Vec::new(); clients];
        for k in 0..slots {
            let (room, client) = (k / members, k % clients);
            room_members[room].push(client);
            client_rooms[client].push(room as u32);
        }
        let mut client_sends = vec![Vec::new(); clients];
        for j in 0..senders {
            let room = j % rooms;
            let client = room_members[room][j / rooms];
            client_sends[client].push(room as u32);
        }
        Ok(Self {
            room_names: (0..rooms).map(|r| format!("{room_prefix}{r}")).collect(),
            shape,
            members: room_members,
            client_rooms,
            client_sends,
        })
    }

    /// The URL index client `client` connects to.
    pub fn url_of(&self, client: usize) -> usize {
        client % self.shape.urls
    }

    /// How many clients publish.
    pub fn sending_clients(&self) -> usize {
        self.client_sends.iter().filter(|s| !s.is_empty()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(clients: usize, rooms: usize, members: usize, senders: usize) -> Shape {
        Shape {
            clients,
            rooms,
            members,
            senders,
            urls: 2,
        }
    }

    #[test]
    fn every_client_is_in_one_room_when_slots_match_clients() {
        let plan = Plan::new(shape(5000, 50, 100, 100), "r").expect("plan");
        assert!(plan.client_rooms.iter().all(|r| r.len() == 1));
        assert!(plan.members.iter().all(|m| m.len() == 100));
        // Members alternate between the two URLs.
        for members in &plan.members {
            let on_first = members.iter().filter(|c| plan.url_of(**c) == 0).count();
            assert_eq!(on_first, 50);
        }
        // Two senders per room, each a member of the room it publishes to.
        let mut per_room = [0; 50];
        for (client, sends) in plan.client_sends.iter().enumerate() {
            for room in sends {
                assert!(plan.client_rooms[client].contains(room));
                per_room[*room as usize] += 1;
            }
        }
        assert!(per_room.iter().all(|n| *n == 2));
        assert_eq!(plan.sending_clients(), 100);
        assert_eq!(plan.room_names[7], "r7");
    }

    #[test]
    fn clients_join_several_rooms_when_slots_exceed_clients() {
        let plan = Plan::new(shape(10, 4, 5, 4), "r").expect("plan");
        let joined: usize = plan.client_rooms.iter().map(Vec::len).sum();
        assert_eq!(joined, 20);
        assert!(plan.client_rooms.iter().all(|r| r.len() == 2));
        for members in &plan.members {
            let mut unique = members.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), members.len(), "a client joins a room once");
        }
    }

    #[test]
    fn idle_runs_have_no_rooms() {
        let plan = Plan::new(shape(100, 0, 0, 0), "r").expect("plan");
        assert!(plan.client_rooms.iter().all(Vec::is_empty));
        assert_eq!(plan.sending_clients(), 0);
    }

    #[test]
    fn rooms_without_members_are_for_outside_publishers_only() {
        // --api-batch publishers are not in the plan: their rooms may have no members.
        let plan = Plan::new(shape(1, 100, 0, 0), "r").expect("plan");
        assert_eq!(plan.room_names.len(), 100);
        assert!(plan.members.iter().all(Vec::is_empty));
        assert!(plan.client_rooms.iter().all(Vec::is_empty));
        // Socket senders publish to rooms they joined, so those need members.
        assert_eq!(
            Plan::new(shape(10, 5, 0, 1), "r").err(),
            Some(PlanError::EmptyRooms(5))
        );
    }

    #[test]
    fn impossible_shapes_are_refused() {
        assert_eq!(
            Plan::new(shape(10, 2, 11, 1), "r").err(),
            Some(PlanError::TooManyMembers {
                members: 11,
                clients: 10
            })
        );
        assert_eq!(
            Plan::new(shape(10, 2, 2, 5), "r").err(),
            Some(PlanError::TooManySenders {
                senders: 5,
                slots: 4
            })
        );
        assert_eq!(
            Plan::new(shape(10, 0, 0, 1), "r").err(),
            Some(PlanError::SendersWithoutRooms)
        );
    }
}
