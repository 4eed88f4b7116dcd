//! HTTP request hygiene shared by the inbound and outbound listeners: framing checks,
//! forwarded-header scrubbing, mesh-owned headers ([`hygiene`]), and the refusals and failure
//! answers both listeners give ([`listener`]).

pub mod hygiene;
pub mod listener;
