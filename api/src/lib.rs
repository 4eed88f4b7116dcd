//! The gRPC contract between meshflow sidecars and the control plane (`proto/meshflow.proto`),
//! generated with tonic/prost.
//!
//! - `Identity.Certify`: CSR → X.509-SVID (SPIFFE), authenticated by a bootstrap token.
//! - `Config.Watch`: bidirectional stream; the sidecar sends `Hello` then one `Ack` per snapshot
//!   version (accepted or rejected with a reason), the control plane streams `Snapshot`s for the
//!   caller's workload only (identified by its SVID).
#![allow(missing_docs, clippy::all)]

/// Generated code for package `meshflow.v1`.
pub mod v1 {
    tonic::include_proto!("meshflow.v1");
}
