//! The workflow coordinator: durable, event-sourced runs of multi-step call chains through the
//! mesh (see `docs/ARCHITECTURE.md`, "Workflow coordinator").
//!
//! - [`engine`]: the pure state machine (input + state → events; events fold into state).
//! - [`store`]: durable storage (SQLite or PostgreSQL through sqlx); run writes of concurrent
//!   runs grouped into shared transactions (group commit).
//! - [`memory`]: the same store contract in memory (tests; not durable).
//! - [`coordinator`]: the effector — commits, then sends calls and fires timers.
//! - [`api`]: the HTTP/JSON API.
//! - [`trace`]: one OpenTelemetry trace per run.
//!
//! Its own crate (`meshflow-coordinator`), run inside the control-plane binary
//! (`meshflow_control_plane::workflow` re-exports it).

pub mod api;
pub mod coordinator;
pub mod engine;
pub mod memory;
pub mod metrics;
pub mod store;
pub mod trace;

#[cfg(test)]
mod coordinator_tests;
#[cfg(test)]
mod engine_tests;
