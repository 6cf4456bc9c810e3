//! Cluster state on a store: versioned documents in `fleetgate_state`, and
//! the sets a store holds in memory.
//!
//! A version is staged (persisted, not in force), then published with an
//! activation time on the cluster clock, or abandoned. A store holds its
//! active set, the one before it (requests routed just before a switch are
//! still processed under their version) and at most one scheduled set; it
//! processes a request only under the version the request was routed
//! under. [`StateFollower`] learns of published versions (told directly,
//! by PostgreSQL `NOTIFY`, or by polling), switches at the activation time
//! and records the activation: that record is the node's confirmation.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleetgate_protocol::node::HeldVersions;
use fleetgate_protocol::schema::MatchKind;
use fleetgate_protocol::state::{
    network_contains, parse_network, ClusterClock, FieldRule, LookupTable, StateAnnouncement,
    StateKey, StateValue, StreamRules,
};
use fleetgate_protocol::IngestError;
use serde_json::Value;
use sqlx::Row;
use tokio::sync::{watch, Mutex};

use crate::catalog::Catalog;
use crate::db::{Backend, Db};
use crate::with_pool;

/// Where published versions are announced to the processes sharing the
/// database (payload: a [`StateAnnouncement`]).
pub const STATE_CHANNEL: &str = "fleetgate_state";

/// The node id a store running in the gatekeeper's own process (`fleetgate
/// up`) stages and confirms versions under.
pub const LOCAL_NODE: &str = "local";

/// One consistent set of rules and lookup tables.
#[derive(Debug, Default)]
pub struct StateSet {
    pub version: u64,
    pub activate_at_ms: i64,
    rules: HashMap<String, StreamRules>,
    lookups: HashMap<String, Arc<Lookup>>,
}

/// A lookup table ready for matching.
#[derive(Debug)]
pub struct Lookup {
    table: LookupTable,
    /// Keys read as networks, longest prefix first (empty if any key is not
    /// a network).
    networks: Vec<((IpAddr, u8), String)>,
}

impl Lookup {
    fn new(table: LookupTable) -> Lookup {
        let parsed: Option<Vec<_>> = table
            .rows
            .keys()
            .map(|k| parse_network(k).map(|net| (net, k.clone())))
            .collect();
        let mut networks = parsed.unwrap_or_default();
        networks.sort_by_key(|((_, len), _)| std::cmp::Reverse(*len));
        Lookup { table, networks }
    }

    /// The value of `column` in the row `key` finds.
    pub fn find(&self, key: &str, matching: MatchKind, column: &str) -> Option<&Value> {
        let index = self.table.column(column)?;
        let row = match matching {
            MatchKind::Exact => self.table.rows.get(key)?,
            MatchKind::Network => {
                let addr: IpAddr = key.parse().ok()?;
                let (_, row_key) = self
                    .networks
                    .iter()
                    .find(|(net, _)| network_contains(*net, addr))?;
                &self.table.rows[row_key]
            }
        };
        row.get(index)
    }
}

impl StateSet {
    pub fn rule(&self, stream: &str, field: &str) -> Option<&FieldRule> {
        self.rules.get(stream)?.fields.get(field)
    }

    pub fn lookup(&self, table: &str) -> Option<&Lookup> {
        self.lookups.get(table).map(Arc::as_ref)
    }

    /// This set with one key changed, as `version`.
    fn with(
        &self,
        version: u64,
        activate_at_ms: i64,
        key: &StateKey,
        value: StateValue,
    ) -> StateSet {
        let mut next = StateSet {
            version,
            activate_at_ms,
            rules: self.rules.clone(),
            lookups: self.lookups.clone(),
        };
        match (key, value) {
            (StateKey::Rules(stream), StateValue::Rules(rules)) => {
                next.rules.insert(stream.clone(), rules);
            }
            (StateKey::Lookup(table), StateValue::Lookup(lookup)) => {
                next.lookups
                    .insert(table.clone(), Arc::new(Lookup::new(lookup)));
            }
            (key, _) => tracing::error!(%key, "state document of the wrong kind ignored"),
        }
        next
    }
}

/// A version row as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionRow {
    pub version: u64,
    pub key: String,
    pub sha256: String,
    pub status: String,
    pub activate_at_ms: Option<i64>,
    pub staged_by: String,
}

pub async fn ddl(db: &Db) -> Result<(), String> {
    db.execute_ddl(&[
        "CREATE TABLE IF NOT EXISTS fleetgate_state (version BIGINT PRIMARY KEY, key TEXT NOT NULL, \
         value TEXT NOT NULL, sha256 TEXT NOT NULL, status TEXT NOT NULL, activate_at BIGINT, \
         staged_by TEXT NOT NULL, staged_at BIGINT NOT NULL)"
            .to_string(),
        "CREATE TABLE IF NOT EXISTS fleetgate_state_activations (node TEXT NOT NULL, \
         version BIGINT NOT NULL, activated_at BIGINT NOT NULL, recorded_at BIGINT NOT NULL, \
         PRIMARY KEY (node, version))"
            .to_string(),
    ])
    .await
    .map_err(|e| format!("cannot create the state tables: {e}"))
}

/// The database's clock, in Unix milliseconds (SQL expression).
pub fn database_now_sql(db: &Db) -> &'static str {
    match db.backend() {
        Backend::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        Backend::Sqlite => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
    }
}

/// Reads the cluster clock once, and lets `clock` learn its offset.
pub async fn sync_clock(db: &Db, clock: &ClusterClock) -> Result<(), String> {
    let sql = format!("SELECT {}", database_now_sql(db));
    let sent = clock.local_ms();
    let now: i64 = with_pool!(db, pool => sqlx::query_scalar(&sql).fetch_one(pool).await)
        .map_err(|e| format!("cannot read the database clock: {e}"))?;
    clock.observe(sent, now, clock.local_ms());
    Ok(())
}

/// The next free version number.
pub async fn next_version(db: &Db) -> Result<u64, String> {
    let max: Option<i64> = with_pool!(db, pool => {
        sqlx::query_scalar("SELECT MAX(version) FROM fleetgate_state").fetch_one(pool).await
    })
    .map_err(|e| format!("cannot read state versions: {e}"))?;
    Ok(max.unwrap_or(0) as u64 + 1)
}

/// Step a: persists a document as `version`, not in force. Fails if the
/// version is taken (another push got there first).
pub async fn stage(
    db: &Db,
    version: u64,
    key: &StateKey,
    value: &StateValue,
    node: &str,
) -> Result<(), String> {
    let text = serde_json::to_string(value).expect("state serializes");
    let sha = sha256_hex(text.as_bytes());
    let sql = format!(
        "INSERT INTO fleetgate_state (version, key, value, sha256, status, staged_by, staged_at) \
         VALUES ($1, $2, $3, $4, 'staged', $5, {})",
        database_now_sql(db)
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
            .bind(version as i64)
            .bind(key.to_string())
            .bind(&text)
            .bind(&sha)
            .bind(node)
            .execute(pool)
            .await
            .map(|_| ())
    })
    .map_err(|e| format!("cannot stage state version {version}: {e}"))
}

/// Step b's decision: the staged version takes effect at `activate_at_ms`.
/// Nothing else makes a version take effect, so a coordinator that dies
/// before this leaves the cluster on the old version.
pub async fn publish(db: &Db, version: u64, activate_at_ms: i64) -> Result<VersionRow, String> {
    let changed = with_pool!(db, pool => {
        sqlx::query(
            "UPDATE fleetgate_state SET status = 'published', activate_at = $2 \
             WHERE version = $1 AND status = 'staged' AND NOT EXISTS \
             (SELECT 1 FROM fleetgate_state WHERE status = 'published' AND (version > $1 OR activate_at > $2))",
        )
        .bind(version as i64)
        .bind(activate_at_ms)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
    })
    .map_err(|e| format!("cannot publish state version {version}: {e}"))?;
    if changed != 1 {
        return Err(format!(
            "state version {version} can no longer be published (abandoned, or overtaken by a newer push)"
        ));
    }
    version_row(db, version)
        .await?
        .ok_or_else(|| format!("state version {version} vanished"))
}

/// Versions staged and never published (their coordinator stopped): they
/// will never take effect; marking them says so.
pub async fn abandon_staged(db: &Db) -> Result<u64, String> {
    with_pool!(db, pool => {
        sqlx::query("UPDATE fleetgate_state SET status = 'abandoned' WHERE status = 'staged'")
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
    })
    .map_err(|e| format!("cannot abandon staged state: {e}"))
}

pub async fn version_row(db: &Db, version: u64) -> Result<Option<VersionRow>, String> {
    let rows = select_versions(db, "version = $1", version as i64, 1).await?;
    Ok(rows.into_iter().next())
}

/// Every version, newest first.
pub async fn versions(db: &Db) -> Result<Vec<VersionRow>, String> {
    select_versions(db, "$1 = $1", 0, i64::MAX).await
}

/// The newest `limit` published versions, newest first. Nodes and brokers
/// poll this, so it reads only what it returns.
pub async fn published(db: &Db, limit: i64) -> Result<Vec<VersionRow>, String> {
    select_versions(db, "status = 'published' AND $1 = $1", 0, limit).await
}

/// Version rows matching `condition` (which binds `$1` to `value`).
async fn select_versions(
    db: &Db,
    condition: &str,
    value: i64,
    limit: i64,
) -> Result<Vec<VersionRow>, String> {
    let sql = format!(
        "SELECT version, key, sha256, status, activate_at, staged_by FROM fleetgate_state \
         WHERE {condition} ORDER BY version DESC LIMIT $2"
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
        .bind(value)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| VersionRow {
                    version: r.get::<i64, _>(0) as u64,
                    key: r.get(1),
                    sha256: r.get(2),
                    status: r.get(3),
                    activate_at_ms: r.get(4),
                    staged_by: r.get(5),
                })
                .collect()
        })
    })
    .map_err(|e| format!("cannot read state versions: {e}"))
}

/// The newest published version, as its announcement.
pub async fn newest_published(db: &Db) -> Result<Option<StateAnnouncement>, String> {
    let rows = published(db, 1).await?;
    Ok(rows.first().map(VersionRow::announcement))
}

impl VersionRow {
    pub fn announcement(&self) -> StateAnnouncement {
        StateAnnouncement {
            version: self.version,
            key: self.key.clone(),
            activate_at_ms: self.activate_at_ms.unwrap_or(0),
            sha256: self.sha256.clone(),
        }
    }
}

/// Each key's newest published version. Brokers poll this for their
/// retained state topics, so it reads no documents.
pub async fn newest_per_key(db: &Db) -> Result<Vec<VersionRow>, String> {
    select_versions(
        db,
        "status = 'published' AND version = (SELECT MAX(s.version) FROM fleetgate_state s \
         WHERE s.key = fleetgate_state.key AND s.status = 'published') AND $1 = $1",
        0,
        i64::MAX,
    )
    .await
}

/// The document stored as `version` (JSON of its [`StateValue`]).
pub async fn document(db: &Db, version: u64) -> Result<String, String> {
    with_pool!(db, pool => {
        sqlx::query_scalar("SELECT value FROM fleetgate_state WHERE version = $1")
            .bind(version as i64)
            .fetch_one(pool)
            .await
    })
    .map_err(|e| format!("cannot read state version {version}: {e}"))
}

/// The set in force at `version`: each key's newest published document at
/// or below it.
pub async fn load_set(db: &Db, version: u64) -> Result<StateSet, String> {
    let rows: Vec<(i64, String, String, Option<i64>)> = with_pool!(db, pool => {
        sqlx::query(
            "SELECT s.version, s.key, s.value, s.activate_at FROM fleetgate_state s \
             WHERE s.status = 'published' AND s.version = (SELECT MAX(version) FROM fleetgate_state \
             WHERE key = s.key AND status = 'published' AND version <= $1)",
        )
        .bind(version as i64)
        .fetch_all(pool)
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    })
    .map_err(|e| format!("cannot read state version {version}: {e}"))?;
    let mut set = StateSet {
        version,
        ..StateSet::default()
    };
    for (row_version, key, value, activate_at) in rows {
        let parsed_key = StateKey::parse(&key)?;
        let value: StateValue = serde_json::from_str(&value)
            .map_err(|e| format!("state version {row_version} ({key}) is corrupt: {e}"))?;
        if row_version as u64 == version {
            set.activate_at_ms = activate_at.unwrap_or(0);
        }
        set = set.with(set.version, set.activate_at_ms, &parsed_key, value);
    }
    Ok(set)
}

/// Records that `node` activated `version` at `activated_at_ms` (its
/// cluster-clock reading). This row is the node's confirmation.
pub async fn record_activation(
    db: &Db,
    node: &str,
    version: u64,
    activated_at_ms: i64,
) -> Result<(), String> {
    let sql = format!(
        "INSERT INTO fleetgate_state_activations (node, version, activated_at, recorded_at) \
         VALUES ($1, $2, $3, {}) ON CONFLICT (node, version) DO NOTHING",
        database_now_sql(db)
    );
    with_pool!(db, pool => {
        sqlx::query(&sql)
            .bind(node)
            .bind(version as i64)
            .bind(activated_at_ms)
            .execute(pool)
            .await
            .map(|_| ())
    })
    .map_err(|e| format!("cannot record the activation of version {version}: {e}"))
}

/// Who confirmed `version`, and when (cluster clock).
pub async fn activations(db: &Db, version: u64) -> Result<Vec<(String, i64)>, String> {
    with_pool!(db, pool => {
        sqlx::query("SELECT node, activated_at FROM fleetgate_state_activations WHERE version = $1 ORDER BY node")
            .bind(version as i64)
            .fetch_all(pool)
            .await
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
    .map_err(|e| format!("cannot read activations: {e}"))
}

/// Checks a document against the streams it affects, before anything is
/// staged: rules against their stream's fields, a lookup table against
/// every stream that enriches from it.
pub fn check_against(catalog: &Catalog, key: &StateKey, value: &StateValue) -> Result<(), String> {
    match (key, value) {
        (StateKey::Rules(stream), StateValue::Rules(rules)) => {
            let found = catalog
                .get(stream)
                .ok_or_else(|| format!("{key}: there is no stream {stream:?} (apply it first)"))?;
            rules.check(stream, &found.def)
        }
        (StateKey::Lookup(table), StateValue::Lookup(lookup)) => {
            for stream in catalog.list() {
                for (column, def) in stream.def.enrich.iter().filter(|(_, d)| d.lookup == *table) {
                    let name = &stream.name;
                    if lookup.column(&def.column).is_none() {
                        return Err(format!(
                            "{key}: stream {name} fills {column} from the table's column {:?}, which it lacks",
                            def.column
                        ));
                    }
                    if def.matching == MatchKind::Network {
                        lookup.check_networks().map_err(|e| {
                            format!("{key}: stream {name} matches {column} by network: {e}")
                        })?;
                    }
                }
            }
            Ok(())
        }
        _ => Err(format!("{key}: the document is not of that key's kind")),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Held {
    active: Arc<StateSet>,
    previous: Option<Arc<StateSet>>,
    /// A published version whose time has not come.
    scheduled: Option<Arc<StateSet>>,
}

/// The sets one store holds, and the versions it tells gatekeepers about.
pub struct StateStore {
    held: RwLock<Held>,
    clock: Arc<ClusterClock>,
    /// What gatekeepers are told this store holds: changes only when the
    /// store confirms an activation.
    confirmed: watch::Sender<HeldVersions>,
}

impl StateStore {
    pub fn new(clock: Arc<ClusterClock>) -> StateStore {
        StateStore {
            held: RwLock::new(Held {
                active: Arc::new(StateSet::default()),
                previous: None,
                scheduled: None,
            }),
            clock,
            confirmed: watch::channel(HeldVersions::default()).0,
        }
    }

    pub fn clock(&self) -> &Arc<ClusterClock> {
        &self.clock
    }

    /// The set to process a message under. A stamped message gets exactly
    /// its version or an error; an unstamped one (one process, no
    /// balancer) the version in force when it was received.
    pub fn resolve(
        &self,
        stamp: Option<u64>,
        received_at_ms: i64,
    ) -> Result<Arc<StateSet>, IngestError> {
        let held = self.held.read().expect("state lock");
        let Some(stamp) = stamp else {
            let at = received_at_ms + self.clock.offset_ms();
            let newest_due = [held.scheduled.as_ref(), Some(&held.active)]
                .into_iter()
                .flatten()
                .find(|set| set.activate_at_ms <= at);
            return Ok(newest_due
                .or(held.previous.as_ref().filter(|p| p.activate_at_ms <= at))
                .unwrap_or(&held.active)
                .clone());
        };
        if held.active.version == stamp {
            return Ok(held.active.clone());
        }
        match &held.previous {
            Some(previous) if previous.version == stamp => Ok(previous.clone()),
            _ => Err(IngestError::StateVersion {
                stamped: stamp,
                active: held.active.version,
            }),
        }
    }

    pub fn held(&self) -> HeldVersions {
        let held = self.held.read().expect("state lock");
        HeldVersions {
            active: held.active.version,
            previous: held.previous.as_ref().map(|p| p.version),
        }
    }

    pub fn active_version(&self) -> u64 {
        self.held.read().expect("state lock").active.version
    }

    pub fn scheduled_version(&self) -> Option<u64> {
        let held = self.held.read().expect("state lock");
        held.scheduled.as_ref().map(|s| s.version)
    }

    /// Versions as confirmed to gatekeepers, and their changes.
    pub fn confirmed(&self) -> watch::Receiver<HeldVersions> {
        self.confirmed.subscribe()
    }

    fn confirm(&self) {
        // Stored even while no link listens: the next link reads it.
        self.confirmed.send_replace(self.held());
    }

    /// Replaces everything (a restart or reboot): `active` is in force now.
    fn reset(&self, active: StateSet, previous: Option<StateSet>) {
        let mut held = self.held.write().expect("state lock");
        held.active = Arc::new(active);
        held.previous = previous.map(Arc::new);
        held.scheduled = None;
    }

    fn schedule(&self, set: StateSet) {
        self.held.write().expect("state lock").scheduled = Some(Arc::new(set));
    }

    /// The scheduled set becomes active; the active one, previous.
    fn activate(&self, version: u64) -> bool {
        let mut held = self.held.write().expect("state lock");
        if held.scheduled.as_ref().map(|s| s.version) != Some(version) {
            return false;
        }
        let next = held.scheduled.take().expect("checked");
        let before = std::mem::replace(&mut held.active, next);
        held.previous = Some(before);
        true
    }
}

/// How a follower behaves under test: the failure cases of the rollout.
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowerFaults {
    /// The first activation is neither recorded nor told to gatekeepers (a
    /// lost confirmation).
    pub drop_first_confirmation: bool,
}

/// Keeps a [`StateStore`] on the newest published version, switching at
/// activation times on the cluster clock.
#[derive(Clone)]
pub struct StateFollower {
    db: Db,
    store: Arc<StateStore>,
    node: String,
    /// One learning at a time, so two paths hearing of one version do not
    /// race.
    learning: Arc<Mutex<()>>,
    timer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    faults: Arc<std::sync::Mutex<FollowerFaults>>,
}

impl StateFollower {
    pub fn new(
        db: Db,
        store: Arc<StateStore>,
        node: &str,
        faults: FollowerFaults,
    ) -> StateFollower {
        StateFollower {
            db,
            store,
            node: node.to_string(),
            learning: Arc::default(),
            timer: Arc::default(),
            faults: Arc::new(std::sync::Mutex::new(faults)),
        }
    }

    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
    }

    /// Loads the newest published version in force (and the one before
    /// it), confirms it, and schedules a later one if there is: what a
    /// store does before taking traffic, at start and on reboot.
    pub async fn load(&self) -> Result<(), String> {
        let _learning = self.learning.lock().await;
        sync_clock(&self.db, self.store.clock()).await?;
        let now = self.store.clock().now_ms();
        let published = published(&self.db, i64::MAX).await?;
        let mut due = published
            .iter()
            .filter(|r| r.activate_at_ms.unwrap_or(0) <= now);
        let active = match due.next() {
            Some(row) => load_set(&self.db, row.version).await?,
            None => StateSet::default(),
        };
        let previous = match due.next() {
            Some(row) => Some(load_set(&self.db, row.version).await?),
            None if active.version > 0 => Some(StateSet::default()),
            None => None,
        };
        let version = active.version;
        self.store.reset(active, previous);
        if version > 0 {
            record_activation(&self.db, &self.node, version, now).await?;
        }
        self.store.confirm();
        tracing::info!(node = %self.node, version, "state loaded");
        if let Some(next) = published.first().filter(|r| r.version > version) {
            drop(_learning);
            self.learn(next.announcement()).await?;
        }
        Ok(())
    }

    /// A published version: schedule it, or switch at once if its time
    /// has passed. Older or already known versions are ignored.
    pub async fn learn(&self, announced: StateAnnouncement) -> Result<(), String> {
        let _learning = self.learning.lock().await;
        let known = self
            .store
            .scheduled_version()
            .unwrap_or(0)
            .max(self.store.active_version());
        if announced.version <= known {
            return Ok(());
        }
        let row = version_row(&self.db, announced.version).await?;
        if row.as_ref().map(|r| r.status.as_str()) != Some("published") {
            return Err(format!(
                "state version {} is not published",
                announced.version
            ));
        }
        let mut set = load_set(&self.db, announced.version).await?;
        set.activate_at_ms = announced.activate_at_ms;
        let at = announced.activate_at_ms;
        let version = announced.version;
        // A version that overtook a scheduled one replaces it: its time is
        // no earlier (publish checks), and it includes the older change.
        self.store.schedule(set);
        let follower = self.clone();
        let timer = tokio::spawn(async move {
            let wait = at - follower.store.clock().now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            follower.activate(version).await;
        });
        if let Some(old) = self.timer.lock().expect("timer lock").replace(timer) {
            old.abort();
        }
        Ok(())
    }

    async fn activate(&self, version: u64) {
        if !self.store.activate(version) {
            return;
        }
        let activated_at = self.store.clock().now_ms();
        tracing::info!(node = %self.node, version, activated_at, "state version active");
        let drop_confirmation = {
            let mut faults = self.faults.lock().expect("faults lock");
            std::mem::take(&mut faults.drop_first_confirmation)
        };
        if drop_confirmation {
            tracing::warn!(node = %self.node, version, "test fault: confirmation dropped");
            return;
        }
        self.store.confirm();
        if let Err(e) = record_activation(&self.db, &self.node, version, activated_at).await {
            tracing::warn!(error = %e, "cannot record the activation");
        }
    }

    /// Follows announcements on PostgreSQL and polls the database every
    /// `poll` for anything missed (a lost notification, a reconnect).
    pub fn follow(&self, poll: Duration) {
        let follower = self.clone();
        self.db.follow(STATE_CHANNEL, move |payload| {
            let follower = follower.clone();
            async move {
                let announced = match payload.map(|p| serde_json::from_str::<StateAnnouncement>(&p))
                {
                    Some(Ok(a)) => Some(a),
                    _ => newest_published(&follower.db).await.ok().flatten(),
                };
                if let Some(announced) = announced {
                    if let Err(e) = follower.learn(announced).await {
                        tracing::warn!(error = %e, "cannot take in a state version");
                    }
                }
            }
        });
        let follower = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(poll).await;
                let _ = sync_clock(&follower.db, follower.store.clock()).await;
                match newest_published(&follower.db).await {
                    Ok(Some(announced)) => {
                        if let Err(e) = follower.learn(announced).await {
                            tracing::warn!(error = %e, "cannot take in a state version");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot poll state versions"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(version: u64, at: i64) -> StateSet {
        StateSet {
            version,
            activate_at_ms: at,
            ..StateSet::default()
        }
    }

    #[test]
    fn a_stamped_request_gets_its_version_or_a_refusal() {
        let store = StateStore::new(Arc::new(ClusterClock::new(0)));
        store.reset(set(1, 0), None);
        store.schedule(set(2, 1_000));
        assert_eq!(store.resolve(Some(1), 0).unwrap().version, 1);
        // Scheduled is not held until it is active.
        assert_eq!(
            store.resolve(Some(2), 0).unwrap_err(),
            IngestError::StateVersion {
                stamped: 2,
                active: 1
            }
        );
        assert!(store.activate(2));
        assert_eq!(store.resolve(Some(2), 0).unwrap().version, 2);
        assert_eq!(store.resolve(Some(1), 0).unwrap().version, 1);
        store.schedule(set(3, 2_000));
        assert!(store.activate(3));
        assert!(store.resolve(Some(1), 0).is_err());
        assert_eq!(
            store.held(),
            HeldVersions {
                active: 3,
                previous: Some(2)
            }
        );
    }

    #[test]
    fn an_unstamped_request_gets_the_version_in_force_when_it_arrived() {
        let store = StateStore::new(Arc::new(ClusterClock::new(0)));
        store.reset(set(1, 100), Some(set(0, 0)));
        store.schedule(set(2, 1_000));
        assert_eq!(store.resolve(None, 999).unwrap().version, 1);
        // The timer has not fired yet, but the record arrived after the fence.
        assert_eq!(store.resolve(None, 1_000).unwrap().version, 2);
        assert_eq!(store.resolve(None, 50).unwrap().version, 0);
    }

    #[test]
    fn lookups_match_exactly_or_by_longest_network() {
        let table = |rows: &[(&str, &str)]| LookupTable {
            key: "k".into(),
            columns: vec!["v".into()],
            rows: rows
                .iter()
                .map(|(k, v)| (k.to_string(), vec![Value::from(*v)]))
                .collect(),
        };
        let regions = Lookup::new(table(&[("10.0.0.0/8", "lan"), ("10.9.0.0/16", "lab")]));
        let find = |key| {
            regions
                .find(key, MatchKind::Network, "v")
                .and_then(Value::as_str)
        };
        assert_eq!(find("10.9.1.1"), Some("lab"));
        assert_eq!(find("10.8.1.1"), Some("lan"));
        assert_eq!(find("192.168.0.1"), None);
        assert_eq!(find("not an address"), None);
        let prices = Lookup::new(table(&[("A1", "x")]));
        assert_eq!(
            prices.find("A1", MatchKind::Exact, "v"),
            Some(&Value::from("x"))
        );
        assert_eq!(prices.find("A1", MatchKind::Exact, "nope"), None);
        assert_eq!(prices.find("B2", MatchKind::Exact, "v"), None);
    }
}
