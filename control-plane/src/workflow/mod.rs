//! The workflow coordinator: durable, event-sourced runs of multi-step call chains through the
//! mesh (see `docs/ARCHITECTURE.md`, "Workflow coordinator").
//!
//! - [`engine`]: the pure state machine (input + state → events; events fold into state).

pub mod engine;

#[cfg(test)]
mod engine_tests;
