//! fleetgate device SDK: the library firmware links to handshake, verify and
//! run its role-specific SDK, and publish through the gatekeeper.
//!
//! Not built yet: this crate is reserved by the workspace layout and is the
//! subject of its own issue. Nothing depends on it. Until then, devices use
//! any MQTT client with their token as the password (see the README).
