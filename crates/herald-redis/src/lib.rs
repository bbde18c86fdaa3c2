//! herald's Redis engines, for running many instances as one fleet.

pub mod codec;
