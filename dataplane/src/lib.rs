//! Jumping VPN's compiled data plane: the per-packet path, with a Python face.
//!
//! `wire` parses what arrives from the network, `replay` and `channel` are the packet
//! machine (no I/O, caller-provided buffers), each the same as its Python reference in
//! `session/`. The PyO3 bindings (`py`) exist only with the `python` feature, so
//! `cargo test` and the fuzz targets need no Python.

pub mod agent_engine;
pub mod balancer;
pub mod batch;
pub mod channel;
pub mod engine;
pub mod frag;
pub mod offload;
pub mod reasons;
pub mod replay;
pub mod route;
pub mod wire;

#[cfg(feature = "python")]
mod py;
