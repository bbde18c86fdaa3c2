//! The front doors: each turns its protocol's frames into session commands, and hub
//! deliveries into its frames. Only this module knows about wire framing.

pub mod sio;
pub mod ws;
