//! meshflow's shared spec model: the local mesh definition, SPIFFE identities and (from later
//! issues on) the policy kinds. Everything here is pure: no sockets, no clocks, no pingora.
//!
//! Errors carry the file, the field path and the line of the offending YAML so an operator can
//! fix a file without guessing (see [`load::LoadError`]).

pub mod admission;
pub mod authn;
pub mod authz;
#[cfg(feature = "kubernetes")]
pub mod crd;
pub mod documents;
pub mod duration;
pub mod headers;
#[cfg(feature = "kubernetes")]
pub mod inject;
pub mod load;
pub mod mesh;
pub mod path;
pub mod schema;
pub mod spiffe;
pub mod traffic;
pub mod workflow;

pub use load::{LoadError, Result};
pub use mesh::{AppProtocol, MeshSpec, Workload};
pub use spiffe::SpiffeId;
pub use traffic::TrafficPolicy;
