//! End-to-end tests: each starts the real `fleetgate up` on ephemeral ports
//! and drives it with real MQTT and HTTP clients. One test binary, so the
//! workspace is linked once.

mod harness;

mod admin;
mod analysis;
mod auth;
mod buckets;
mod cli;
mod cluster;
mod compaction;
mod confinement;
mod dashboard;
mod devices;
mod durability;
mod etl;
mod ingest;
mod mqtt;
mod nats_cluster;
mod pgwire;
mod pgwire_clients;
mod query;
mod readme;
mod reports;
mod roles;
mod rollout;
mod sdk;
mod state;
mod tiers;
mod tls;
mod views;
mod writers;
