//! The `meshflow` command's library: the process supervisor shared by `meshflow up`,
//! `meshflow demo` and the end-to-end tests, and the local-mesh runner.

pub mod check;
pub mod demo;
pub mod inject;
pub mod output;
pub mod policy_check;
pub mod policy_kube;
pub mod stat;
pub mod supervisor;
pub mod up;
pub mod workflow_cli;
