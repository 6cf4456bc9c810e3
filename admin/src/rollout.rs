//! The time-fenced state rollout, as the admin service coordinates it.
//!
//! 1. The document is checked against the streams it affects; a bad one
//!    is refused before anything happens.
//! 2. One store persists it as the next version, not in force (stage).
//! 3. The version is published with an activation time on the cluster
//!    clock, far enough ahead for the measured delivery delay and clock
//!    uncertainty. That database update is the decision: a coordinator
//!    that stops before it leaves the cluster on the old version, one that
//!    stops after it leaves the change to happen without it.
//! 4. Gatekeepers and stores are told (retained topic, `NOTIFY`); stores
//!    also poll. Each store switches at the activation time and records
//!    it: its confirmation.
//! 5. A store that has not confirmed within the grace period gets a reboot
//!    request: it leaves rotation, loads the newest state, and rejoins.
//!    [`Rollout::watch`] does this for every version, so it happens even
//!    when the coordinator that published it is gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fleetgate_protocol::duration;
use fleetgate_protocol::ingest::BoxFuture;
use fleetgate_protocol::state::{ClusterClock, StateAnnouncement, StateKey, StateValue};
use fleetgate_store::state::{self as store_state, sync_clock};
use fleetgate_store::{Catalog, Db};
use serde::Serialize;
use tokio::sync::Mutex;

/// How the coordinator reaches the stores: one in this process, or the
/// cluster's nodes.
pub trait StateTransport: Send + Sync {
    /// Has one store persist the document as `version`, not in force.
    /// Returns that store's id.
    fn stage(
        &self,
        version: u64,
        key: &StateKey,
        value: &StateValue,
    ) -> BoxFuture<'_, Result<String, String>>;
    /// Tells gatekeepers and stores of a published version.
    fn announce(&self, announcement: &StateAnnouncement) -> BoxFuture<'_, ()>;
    /// The stores that must confirm each version.
    fn members(&self) -> BoxFuture<'_, Result<Vec<String>, String>>;
    /// Asks a store that did not confirm to reload and rejoin.
    fn reboot(&self, node: &str, reason: &str) -> BoxFuture<'_, Result<(), String>>;
}

#[derive(Debug, Clone, Copy)]
pub struct RolloutSettings {
    /// The least time between publishing and activation.
    pub min_lead: Duration,
    /// How long after the activation time a store may take to confirm.
    pub grace: Duration,
    /// A test's way to stop the coordinator between two steps.
    pub fault: Option<CrashPoint>,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            min_lead: Duration::from_millis(300),
            grace: Duration::from_secs(1),
            fault: None,
        }
    }
}

/// Where a test makes the coordinator's process die mid-push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Staged on a node, not published.
    AfterStage,
    /// Published in the database, nobody told.
    AfterPublish,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "after-stage" => Ok(CrashPoint::AfterStage),
            "after-publish" => Ok(CrashPoint::AfterPublish),
            _ => Err(format!("{text:?}: expected after-stage or after-publish")),
        }
    }
}

trait CrashAt {
    fn crash_at(&self, point: CrashPoint);
}

impl CrashAt for Option<CrashPoint> {
    fn crash_at(&self, point: CrashPoint) {
        if *self == Some(point) {
            eprintln!("test fault: the coordinator dies at {point:?}");
            std::process::abort();
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Activation {
    pub node: String,
    /// The node's cluster-clock reading when it switched.
    pub activated_at_ms: i64,
}

/// What a push did, for the CLI and `BENCHMARKS.md`.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub version: u64,
    pub key: String,
    pub sha256: String,
    pub staged_on: String,
    pub published_at_ms: i64,
    pub activate_at_ms: i64,
    /// Stores that confirmed within the grace period.
    pub confirmed: Vec<Activation>,
    /// Stores asked to reboot because they did not.
    pub rebooted: Vec<String>,
    /// Latest minus earliest activation instant among those that confirmed.
    pub spread_ms: Option<i64>,
    /// From the push request to the last confirmation.
    pub command_to_active_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The document or the time was refused; nothing happened.
    #[error("{0}")]
    Invalid(String),
    /// A step failed; the cluster is still on the version it had.
    #[error("{0}")]
    Failed(String),
}

pub struct Rollout {
    db: Db,
    catalog: Catalog,
    transport: Arc<dyn StateTransport>,
    clock: Arc<ClusterClock>,
    settings: RolloutSettings,
    /// One push at a time from this coordinator.
    pushing: Mutex<()>,
    /// (node, version) → when it was asked to reboot, so it is not asked
    /// again while it reboots.
    reboots: std::sync::Mutex<HashMap<(String, u64), i64>>,
}

impl Rollout {
    pub fn new(
        db: Db,
        catalog: Catalog,
        transport: Arc<dyn StateTransport>,
        clock: Arc<ClusterClock>,
        settings: RolloutSettings,
    ) -> Rollout {
        Rollout {
            db,
            catalog,
            transport,
            clock,
            settings,
            pushing: Mutex::new(()),
            reboots: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> RolloutSettings {
        self.settings
    }

    /// An activation time must leave the stores room to hear of it.
    pub fn check_activation_time(&self, at_ms: Option<i64>) -> Result<(), RolloutError> {
        let now = self.clock.now_ms();
        let min_lead = duration::millis(self.settings.min_lead);
        let max_lead = duration::millis(duration::LONGEST);
        match at_ms {
            Some(at) if at < now.saturating_add(min_lead) => Err(RolloutError::Invalid(format!(
                "the activation time is {} ms from now; it must be at least {min_lead} ms ahead",
                at.saturating_sub(now)
            ))),
            Some(at) if at > now.saturating_add(max_lead) => Err(RolloutError::Invalid(
                "the activation time is more than 100 years ahead".into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn cluster_now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Parses, checks, stages, publishes; with `wait`, also waits for the
    /// confirmations (up to the grace period) and reboots stragglers.
    pub async fn push(
        &self,
        key: &str,
        text: &str,
        format: fleetgate_protocol::state::StateFormat,
        at_ms: Option<i64>,
        wait: bool,
    ) -> Result<PushReport, RolloutError> {
        let started = self.clock.now_ms();
        let key = StateKey::parse(key).map_err(RolloutError::Invalid)?;
        let value = StateValue::parse(&key, text, format)
            .map_err(|e| RolloutError::Invalid(format!("{key}: {e}")))?;
        store_state::check_against(&self.catalog, &key, &value).map_err(RolloutError::Invalid)?;
        let failed = RolloutError::Failed;
        self.check_activation_time(at_ms)?;

        let _one_at_a_time = self.pushing.lock().await;
        // A version left staged by a coordinator that stopped can never be
        // published now; say so before taking the next number.
        let abandoned = store_state::abandon_staged(&self.db)
            .await
            .map_err(failed)?;
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "state versions staged by an earlier push that never published them are abandoned"
            );
        }
        let version = store_state::next_version(&self.db).await.map_err(failed)?;

        // Step a: one store persists it, not in force.
        let stage_started = tokio::time::Instant::now();
        let staged_on = self
            .transport
            .stage(version, &key, &value)
            .await
            .map_err(|e| {
                RolloutError::Failed(format!(
                    "staging {key} as version {version} failed, nothing changed: {e}"
                ))
            })?;
        let delivery = stage_started.elapsed();
        self.settings.fault.crash_at(CrashPoint::AfterStage);

        // Step b: the decision, with room for delivery and clock error.
        let _ = sync_clock(&self.db, &self.clock).await;
        let now = self.clock.now_ms();
        let lead = self.settings.min_lead.max(delivery * 4).as_millis() as i64
            + 2 * self.clock.uncertainty_ms().clamp(0, 1_000);
        let activate_at = match at_ms {
            Some(at) if at < now + lead => {
                let _ = store_state::abandon_staged(&self.db).await;
                return Err(RolloutError::Invalid(format!(
                    "--at is {} ms from now; the cluster needs at least {lead} ms (delivery and clock uncertainty)",
                    at - now
                )));
            }
            Some(at) => at,
            None => now + lead,
        };
        let row = store_state::publish(&self.db, version, activate_at)
            .await
            .map_err(failed)?;
        self.settings.fault.crash_at(CrashPoint::AfterPublish);
        let announcement = row.announcement();
        tracing::info!(version, %key, activate_at, staged_on, "state version published");
        self.transport.announce(&announcement).await;

        let mut report = PushReport {
            version,
            key: key.to_string(),
            sha256: row.sha256,
            staged_on,
            published_at_ms: now,
            activate_at_ms: activate_at,
            confirmed: Vec::new(),
            rebooted: Vec::new(),
            spread_ms: None,
            command_to_active_ms: None,
        };
        if wait {
            drop(_one_at_a_time);
            self.await_confirmations(&mut report, started)
                .await
                .map_err(failed)?;
        }
        Ok(report)
    }

    async fn await_confirmations(
        &self,
        report: &mut PushReport,
        started: i64,
    ) -> Result<(), String> {
        let deadline = report.activate_at_ms + self.settings.grace.as_millis() as i64;
        let members = loop {
            let members = self.transport.members().await?;
            let confirmed = store_state::activations(&self.db, report.version).await?;
            let all = members
                .iter()
                .all(|m| confirmed.iter().any(|(n, _)| n == m));
            if all || self.clock.now_ms() >= deadline {
                report.confirmed = confirmed
                    .into_iter()
                    .filter(|(node, _)| members.contains(node))
                    .map(|(node, activated_at_ms)| Activation {
                        node,
                        activated_at_ms,
                    })
                    .collect();
                if all {
                    report.command_to_active_ms = Some(self.clock.now_ms() - started);
                }
                break members;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let instants = report.confirmed.iter().map(|a| a.activated_at_ms);
        report.spread_ms = instants
            .clone()
            .max()
            .zip(instants.min())
            .map(|(hi, lo)| hi - lo);
        if report.confirmed.len() < members.len() {
            let wait = deadline - self.clock.now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            report.rebooted = self.reboot_stragglers().await?;
        }
        Ok(())
    }

    /// Reboots every store that has not confirmed the newest published
    /// version within its grace period. Returns who was asked.
    pub async fn reboot_stragglers(&self) -> Result<Vec<String>, String> {
        let Some(newest) = store_state::newest_published(&self.db).await? else {
            return Ok(Vec::new());
        };
        let now = self.clock.now_ms();
        if now < newest.activate_at_ms + self.settings.grace.as_millis() as i64 {
            return Ok(Vec::new());
        }
        let confirmed = store_state::activations(&self.db, newest.version).await?;
        let mut asked = Vec::new();
        for node in self.transport.members().await? {
            if confirmed.iter().any(|(n, _)| *n == node) {
                continue;
            }
            let recently = {
                let mut reboots = self.reboots.lock().expect("reboots lock");
                reboots.retain(|_, at| now - *at < 10_000);
                let key = (node.clone(), newest.version);
                let recently = reboots.contains_key(&key);
                reboots.entry(key).or_insert(now);
                recently
            };
            if recently {
                continue;
            }
            let reason = format!(
                "did not confirm state version {} by {} ms past its activation",
                newest.version,
                self.settings.grace.as_millis()
            );
            tracing::warn!(%node, version = newest.version, "store did not confirm the state version; rebooting it");
            self.transport.reboot(&node, &reason).await?;
            asked.push(node);
        }
        Ok(asked)
    }

    /// Runs [`Rollout::reboot_stragglers`] every `every`, for versions
    /// whose coordinator is gone or did not wait.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let rollout = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = rollout.reboot_stragglers().await {
                    tracing::warn!(error = %e, "state rollout watchdog");
                }
            }
        });
    }
}

#[cfg(test)]
mod model;
