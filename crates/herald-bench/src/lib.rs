//! herald's load generator (`herald bench`): cheap clients, rooms, senders, honest figures.
//!
//! Many Socket.IO or `/ws` clients, rooms, senders at a total rate, and accounting of
//! latency, loss and cost:
//!
//! - [`args`]: the flags.
//! - [`plan`]: who connects where, joins what and sends.
//! - [`client`]: one client's connection, joins, reads and publishes.
//! - [`proto`]: the Socket.IO and `/ws` frames it reads and writes.
//! - [`accounting`]: expected deliveries, loss and duplicates.
//! - [`latency`]: HdrHistograms and percentiles.
//! - [`procstat`]: RSS and CPU from `/proc`.
//! - [`runner`]: the phases of a run (connect, send, drain) and the progress bar.
//! - [`report`] and [`chart`]: the table, figure lines, JSON and SVG; [`merge`]: shards' results
//!   combined.

pub mod accounting;
pub mod api;
pub mod args;
pub mod chart;
pub mod client;
pub mod latency;
pub mod merge;
pub mod plan;
pub mod procstat;
pub mod proto;
pub mod report;
pub mod runner;

pub use args::BenchArgs;
pub use runner::run;
