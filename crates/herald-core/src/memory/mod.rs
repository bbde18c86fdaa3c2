//! The single-instance engines: everything lives in this process, with the same semantics as
//! the shared engines.

mod broker;
mod presence;

pub use broker::MemoryBroker;
pub use presence::MemoryPresence;
