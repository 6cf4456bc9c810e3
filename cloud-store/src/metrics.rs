use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The store's Prometheus metrics.
#[derive(Clone)]
pub struct StoreMetrics {
    pub records_accepted: Counter,
    pub records_duplicate: Counter,
    pub records_rejected: Counter,
    pub commits: Counter,
    pub commit_seconds: Histogram,
    pub queued_messages: Gauge,
}

impl StoreMetrics {
    pub fn register(registry: &mut Registry) -> StoreMetrics {
        let metrics = StoreMetrics {
            records_accepted: Counter::default(),
            records_duplicate: Counter::default(),
            records_rejected: Counter::default(),
            commits: Counter::default(),
            commit_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            queued_messages: Gauge::default(),
        };
        registry.register(
            "fleetgate_records_accepted",
            "Valid records committed (re-sends included)",
            metrics.records_accepted.clone(),
        );
        registry.register(
            "fleetgate_records_duplicate",
            "Valid records whose key was already stored",
            metrics.records_duplicate.clone(),
        );
        registry.register(
            "fleetgate_records_rejected",
            "Records or payloads committed to the rejects table",
            metrics.records_rejected.clone(),
        );
        registry.register(
            "fleetgate_commits",
            "Group commits",
            metrics.commits.clone(),
        );
        registry.register(
            "fleetgate_commit_seconds",
            "Time of one group commit",
            metrics.commit_seconds.clone(),
        );
        registry.register(
            "fleetgate_ingest_queue_messages",
            "Messages waiting for the writer",
            metrics.queued_messages.clone(),
        );
        metrics
    }
}
