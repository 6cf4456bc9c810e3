//! fleetgate SDK builder: after a signed device handshake, builds a
//! per-device, per-role SDK (a generated WebAssembly module, or native code
//! via wasmtime/cranelift) containing only what that role may do.
//!
//! Not built yet: this crate is reserved by the workspace layout and is the
//! subject of its own issue. Nothing depends on it.
