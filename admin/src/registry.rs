//! The device registry: which devices exist, their role, and whether they
//! are revoked. Kept in the database and mirrored in memory, so checking a
//! device on every CONNECT and HTTP request costs a hash lookup.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use fleetgate_protocol::{validate_device_id, Role};
use fleetgate_store::bulk::chunk_sizes;
use fleetgate_store::{with_pool, Db};
use serde::Serialize;
use sqlx::{QueryBuilder, Row};
use tokio::sync::broadcast;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub id: String,
    pub role: Role,
    pub device_type: Option<String>,
    /// Hex Ed25519 public key the device signs its SDK handshakes with.
    pub public_key: Option<String>,
    /// Unix seconds; `None` while the device may connect.
    pub revoked_at: Option<i64>,
    /// Tokens issued before this Unix second are refused.
    pub tokens_not_before: i64,
    pub created_at: i64,
}

/// Changes live sessions must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    Revoked(String),
    /// The device's sessions must reconnect to get the new role's permissions.
    RoleChanged(String, Role),
    Banned(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("device {0:?} already exists")]
    Exists(String),
    #[error("no device {0:?}")]
    NotFound(String),
    /// The database refused a change: it conflicts with one made meanwhile
    /// (by another broker, say).
    #[error("{0}")]
    Conflict(String),
    #[error("registry database error: {0}")]
    Database(String),
}

#[derive(Clone)]
pub struct Registry {
    db: Db,
    devices: Arc<RwLock<HashMap<String, Device>>>,
    events: broadcast::Sender<RegistryEvent>,
    /// Tells this process's own notifications from other brokers'.
    origin: Arc<str>,
}

/// A device for [`Registry::import`] to register.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub role: Role,
    pub device_type: Option<String>,
    /// The raw 32-byte Ed25519 key it signs SDK handshakes with.
    pub public_key: Option<Vec<u8>>,
}

/// What a new device must be: an id of 1-64 characters from
/// `A-Z a-z 0-9 - _ .`, a type of 1-64 characters if any, a 32-byte key if
/// any. The message says what was wrong and what is allowed.
pub fn check_registration(
    id: &str,
    device_type: Option<&str>,
    public_key: Option<&[u8]>,
) -> Result<(), String> {
    validate_device_id(id)?;
    if let Some(t) = device_type {
        if t.is_empty() || t.len() > 64 {
            return Err(format!(
                "invalid device type {t:?}: use 1-64 characters, or none"
            ));
        }
    }
    if public_key.is_some_and(|k| k.len() != 32) {
        return Err("public key must be a 32-byte Ed25519 key".into());
    }
    Ok(())
}

/// One change to a device, written column by column.
enum Change<'a> {
    Revoke { now: i64 },
    Role(Role),
    Key(&'a str),
}

/// The PostgreSQL channel registry changes are announced on, as
/// `<origin> <change> <device>`, for the other brokers of a cluster.
const CHANNEL: &str = "fleetgate_registry";

const COLUMNS: &str =
    "id, role, device_type, revoked_at, tokens_not_before, created_at, public_key";

fn db_error(e: sqlx::Error) -> RegistryError {
    RegistryError::Database(e.to_string())
}

impl Registry {
    pub async fn load(db: Db) -> Result<Registry, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_devices (id TEXT PRIMARY KEY, role TEXT NOT NULL, device_type TEXT, \
             revoked_at BIGINT, tokens_not_before BIGINT NOT NULL, created_at BIGINT NOT NULL, \
             public_key TEXT)"
                .to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the device registry: {e}"))?;
        add_public_key_column(&db).await?;
        let rows = read_devices(&db, None)
            .await
            .map_err(|e| format!("cannot read the device registry: {e}"))?;
        let devices = rows.into_iter().map(|d| (d.id.clone(), d)).collect();
        let (events, _) = broadcast::channel(1024);
        let origin = format!("{}-{}", std::process::id(), crate::unix_now_ms());
        Ok(Registry {
            db,
            devices: Arc::new(RwLock::new(devices)),
            events,
            origin: origin.into(),
        })
    }

    /// On PostgreSQL, follows the changes other brokers of the cluster make:
    /// their revocations and role changes end this broker's sessions too,
    /// and their new devices and keys are known here at once.
    pub fn follow_changes(&self) {
        let registry = self.clone();
        self.db.follow(CHANNEL, move |payload| {
            let registry = registry.clone();
            async move {
                match payload {
                    Some(payload) => registry.apply_remote(&payload).await,
                    None => registry.resync().await,
                }
            }
        });
    }

    /// Reads every device again and raises the events for what changed.
    async fn resync(&self) {
        let rows = match read_devices(&self.db, None).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the device registry");
                return;
            }
        };
        let mut events = Vec::new();
        {
            let mut devices = self.devices.write().expect("registry lock");
            for device in rows {
                if let Some(known) = devices.get(&device.id) {
                    if device.revoked_at.is_some() && known.revoked_at.is_none() {
                        events.push(RegistryEvent::Revoked(device.id.clone()));
                    } else if device.role != known.role {
                        events.push(RegistryEvent::RoleChanged(device.id.clone(), device.role));
                    }
                }
                devices.insert(device.id.clone(), device);
            }
        }
        for event in events {
            let _ = self.events.send(event);
        }
    }

    async fn apply_remote(&self, payload: &str) {
        let mut parts = payload.splitn(3, ' ');
        let (Some(origin), Some(change), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if origin == &*self.origin {
            return;
        }
        if change == "imported" {
            // Too many devices for one notification each: read them all.
            return self.resync().await;
        }
        let device = match read_devices(&self.db, Some(id)).await {
            Ok(mut rows) => rows.pop(),
            Err(e) => {
                tracing::warn!(error = %e, device = id, "cannot read a changed device");
                return;
            }
        };
        let Some(device) = device else { return };
        self.devices
            .write()
            .expect("registry lock")
            .insert(device.id.clone(), device.clone());
        let event = match change {
            "revoked" => Some(RegistryEvent::Revoked(device.id)),
            "role" => Some(RegistryEvent::RoleChanged(device.id, device.role)),
            _ => None,
        };
        if let Some(event) = event {
            let _ = self.events.send(event);
        }
    }

    /// Tells the cluster's other brokers (PostgreSQL only).
    async fn announce(&self, change: &str, id: &str) {
        let payload = format!("{} {change} {id}", self.origin);
        self.db.notify(CHANNEL, &payload).await;
    }

    pub fn get(&self, id: &str) -> Option<Device> {
        self.devices.read().expect("registry lock").get(id).cloned()
    }

    pub fn list(&self) -> Vec<Device> {
        let mut list: Vec<_> = self
            .devices
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    pub async fn add(
        &self,
        id: &str,
        role: Role,
        device_type: Option<&str>,
        public_key: Option<&[u8]>,
        now: i64,
    ) -> Result<Device, RegistryError> {
        check_registration(id, device_type, public_key).map_err(RegistryError::Invalid)?;
        if self.get(id).is_some() {
            return Err(RegistryError::Exists(id.to_string()));
        }
        let device = Device {
            id: id.to_string(),
            role,
            device_type: device_type.map(str::to_string),
            revoked_at: None,
            tokens_not_before: now,
            created_at: now,
            public_key: public_key.map(fleetgate_protocol::sdk::hex),
        };
        let result = with_pool!(self.db, pool => {
            sqlx::query(&format!("INSERT INTO fleetgate_devices ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"))
                .bind(&device.id)
                .bind(role.as_str())
                .bind(&device.device_type)
                .bind(device.revoked_at)
                .bind(device.tokens_not_before)
                .bind(device.created_at)
                .bind(&device.public_key)
                .execute(pool)
                .await
                .map(|_| ())
        });
        match result {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RegistryError::Exists(id.to_string()))
            }
            Err(e) => return Err(db_error(e)),
        }
        self.devices
            .write()
            .expect("registry lock")
            .insert(device.id.clone(), device.clone());
        self.announce("added", id).await;
        Ok(device)
    }

    /// Registers many devices in one transaction: all of them or, if any
    /// is invalid, listed twice or already registered (here, or by another
    /// broker meanwhile), none. Other brokers re-read the registry once.
    pub async fn import(
        &self,
        new: &[Registration],
        now: i64,
    ) -> Result<Vec<Device>, RegistryError> {
        let mut seen = HashSet::with_capacity(new.len());
        for r in new {
            check_registration(&r.id, r.device_type.as_deref(), r.public_key.as_deref())
                .map_err(RegistryError::Invalid)?;
            if !seen.insert(r.id.as_str()) {
                return Err(RegistryError::Invalid(format!(
                    "device {:?} is listed more than once",
                    r.id
                )));
            }
            if self.get(&r.id).is_some() {
                return Err(RegistryError::Exists(r.id.clone()));
            }
        }
        let devices: Vec<Device> = new
            .iter()
            .map(|r| Device {
                id: r.id.clone(),
                role: r.role,
                device_type: r.device_type.clone(),
                public_key: r.public_key.as_deref().map(fleetgate_protocol::sdk::hex),
                revoked_at: None,
                tokens_not_before: now,
                created_at: now,
            })
            .collect();
        let head = format!("INSERT INTO fleetgate_devices ({COLUMNS}) ");
        let result = with_pool!(self.db, pool => {
            async {
                let mut tx = pool.begin().await?;
                let mut rest = devices.as_slice();
                for size in chunk_sizes(devices.len(), 7) {
                    let (chunk, tail) = rest.split_at(size);
                    rest = tail;
                    let mut insert = QueryBuilder::new(&head);
                    insert.push_values(chunk, |mut row, d| {
                        row.push_bind(d.id.as_str())
                            .push_bind(d.role.as_str())
                            .push_bind(d.device_type.as_deref())
                            .push_bind(d.revoked_at)
                            .push_bind(d.tokens_not_before)
                            .push_bind(d.created_at)
                            .push_bind(d.public_key.as_deref());
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                tx.commit().await
            }
            .await
        });
        match result {
            Ok(()) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(RegistryError::Conflict(format!(
                    "a device of the import was registered meanwhile ({}); nothing was imported",
                    e.message()
                )))
            }
            Err(e) => return Err(db_error(e)),
        }
        {
            let mut known = self.devices.write().expect("registry lock");
            for device in &devices {
                known.insert(device.id.clone(), device.clone());
            }
        }
        self.announce("imported", "*").await;
        Ok(devices)
    }

    /// Revokes a device: its tokens stop working and live sessions are told
    /// to close (through [`Registry::subscribe`]).
    pub async fn revoke(&self, id: &str, now: i64) -> Result<Device, RegistryError> {
        let device = self.change(id, Change::Revoke { now }).await?;
        self.announce("revoked", id).await;
        let _ = self.events.send(RegistryEvent::Revoked(id.to_string()));
        Ok(device)
    }

    /// Changes a device's role; its live sessions are told to end so that
    /// they reconnect under the new role.
    pub async fn set_role(&self, id: &str, role: Role) -> Result<Device, RegistryError> {
        let device = self.change(id, Change::Role(role)).await?;
        self.announce("role", id).await;
        let _ = self
            .events
            .send(RegistryEvent::RoleChanged(id.to_string(), role));
        Ok(device)
    }

    /// Registers or replaces the key a device signs its handshakes with.
    pub async fn set_public_key(&self, id: &str, key: &[u8]) -> Result<Device, RegistryError> {
        if key.len() != 32 {
            return Err(RegistryError::Invalid(
                "public key must be a 32-byte Ed25519 key".into(),
            ));
        }
        let hex = fleetgate_protocol::sdk::hex(key);
        let device = self.change(id, Change::Key(&hex)).await?;
        self.announce("key", id).await;
        Ok(device)
    }

    /// Writes one change to the database, touching only its own columns
    /// (another broker may have changed the others), then refreshes the
    /// cache from the row as it now is.
    async fn change(&self, id: &str, change: Change<'_>) -> Result<Device, RegistryError> {
        let updated = with_pool!(self.db, pool => {
            let query = match change {
                Change::Revoke { now } => sqlx::query(
                    "UPDATE fleetgate_devices SET revoked_at = $1, tokens_not_before = $2 WHERE id = $3",
                )
                .bind(now)
                .bind(now + 1)
                .bind(id),
                Change::Role(role) => sqlx::query(
                    "UPDATE fleetgate_devices SET role = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(role.as_str())
                .bind(id),
                Change::Key(hex) => {
                    sqlx::query("UPDATE fleetgate_devices SET public_key = $1 WHERE id = $2")
                        .bind(hex)
                        .bind(id)
                }
            };
            query.execute(pool).await.map(|r| r.rows_affected())
        })
        .map_err(db_error)?;
        let device = read_devices(&self.db, Some(id))
            .await
            .map_err(db_error)?
            .pop()
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        self.devices
            .write()
            .expect("registry lock")
            .insert(device.id.clone(), device.clone());
        if updated == 0 {
            return Err(RegistryError::Invalid(format!("device {id:?} is revoked")));
        }
        Ok(device)
    }

    /// Tells live sessions of a newly banned device to end.
    pub fn announce_ban(&self, id: &str) {
        let _ = self.events.send(RegistryEvent::Banned(id.to_string()));
    }
}

/// Registries created before devices had keys lack the column; adding it is
/// the whole migration.
async fn add_public_key_column(db: &Db) -> Result<(), String> {
    let has_column = with_pool!(db, pool => {
        sqlx::query("SELECT public_key FROM fleetgate_devices LIMIT 1")
            .fetch_all(pool)
            .await
            .map(|_| ())
    });
    if has_column.is_ok() {
        return Ok(());
    }
    db.execute_ddl(&["ALTER TABLE fleetgate_devices ADD COLUMN public_key TEXT".to_string()])
        .await
        .map_err(|e| format!("cannot add public keys to the device registry: {e}"))
}

/// Devices from the database: all of them, or the one with `id`.
async fn read_devices(db: &Db, id: Option<&str>) -> Result<Vec<Device>, sqlx::Error> {
    let filter = if id.is_some() { " WHERE id = $1" } else { "" };
    let sql = format!("SELECT {COLUMNS} FROM fleetgate_devices{filter}");
    with_pool!(db, pool => {
        let mut query = sqlx::query(&sql);
        if let Some(id) = id {
            query = query.bind(id);
        }
        query.fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| {
                    let role: String = r.get(1);
                    Device {
                        id: r.get(0),
                        role: role.parse().unwrap_or(Role::Ingest),
                        device_type: r.get(2),
                        revoked_at: r.get(3),
                        tokens_not_before: r.get(4),
                        created_at: r.get(5),
                        public_key: r.get(6),
                    }
                })
                .collect()
        })
    })
}
