//! Temporary bans of devices whose refusals crossed the alert threshold.
//!
//! A ban is kept in memory (checked on every CONNECT and request) and in the
//! database (it survives a restart). It names the device id that was
//! claimed, so a flood of bad tokens for a real device bans that device too:
//! that is the price of stopping the flood, and why bans expire and an
//! admin can lift them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use fleetgate_store::{with_pool, Db};
use serde::Serialize;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ban {
    pub device: String,
    /// Unix seconds when the ban ends.
    pub until: i64,
    pub reason: String,
}

#[derive(Clone)]
pub struct Bans {
    db: Db,
    active: Arc<RwLock<HashMap<String, Ban>>>,
}

impl Bans {
    pub async fn load(db: Db, now: i64) -> Result<Bans, String> {
        db.execute_ddl(&[
            "CREATE TABLE IF NOT EXISTS fleetgate_bans (device_id TEXT PRIMARY KEY, until BIGINT NOT NULL, reason TEXT NOT NULL)"
                .to_string(),
        ])
        .await
        .map_err(|e| format!("cannot create the bans table: {e}"))?;
        let rows = read_bans(&db, now, None)
            .await
            .map_err(|e| format!("cannot read bans: {e}"))?;
        let active = rows.into_iter().map(|b| (b.device.clone(), b)).collect();
        Ok(Bans {
            db,
            active: Arc::new(RwLock::new(active)),
        })
    }

    /// The ban on `device` in force at `now`, if any.
    pub fn get(&self, device: &str, now: i64) -> Option<Ban> {
        self.active
            .read()
            .expect("bans lock")
            .get(device)
            .filter(|b| b.until > now)
            .cloned()
    }

    pub fn list(&self, now: i64) -> Vec<Ban> {
        let mut list: Vec<Ban> = self
            .active
            .read()
            .expect("bans lock")
            .values()
            .filter(|b| b.until > now)
            .cloned()
            .collect();
        list.sort_by(|a, b| a.device.cmp(&b.device));
        list
    }

    /// Bans at once in memory; the database copy follows in the background
    /// (it only matters after a restart).
    pub fn ban(&self, ban: Ban) {
        self.active
            .write()
            .expect("bans lock")
            .insert(ban.device.clone(), ban.clone());
        let db = self.db.clone();
        tokio::spawn(async move {
            let result = with_pool!(db, pool => {
                sqlx::query(
                    "INSERT INTO fleetgate_bans (device_id, until, reason) VALUES ($1, $2, $3) \
                     ON CONFLICT (device_id) DO UPDATE SET until = excluded.until, reason = excluded.reason",
                )
                .bind(&ban.device)
                .bind(ban.until)
                .bind(&ban.reason)
                .execute(pool)
                .await
                .map(|_| ())
            });
            match result {
                Ok(()) => db.notify(CHANNEL, &ban.device).await,
                Err(e) => tracing::error!(device = ban.device, error = %e, "cannot persist ban"),
            }
        });
    }

    /// On PostgreSQL, takes in the bans and unbans of the cluster's other
    /// brokers; `on_ban` is called for each device newly banned that way
    /// (to end its sessions here).
    pub fn follow_changes(&self, on_ban: impl Fn(&str) + Send + Sync + 'static) {
        let (bans, on_ban) = (self.clone(), Arc::new(on_ban));
        self.db.follow(CHANNEL, move |device| {
            let (bans, on_ban) = (bans.clone(), on_ban.clone());
            async move { bans.refresh(device.as_deref(), &*on_ban).await }
        });
    }

    /// Reads the bans of one device (or all) again from the database.
    async fn refresh(&self, device: Option<&str>, on_ban: &impl Fn(&str)) {
        let now = crate::unix_now();
        let rows = match read_bans(&self.db, now, device).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read bans");
                return;
            }
        };
        let mut newly_banned = Vec::new();
        {
            let mut active = self.active.write().expect("bans lock");
            match device {
                Some(device) => {
                    active.remove(device);
                }
                None => active.clear(),
            }
            for ban in rows {
                let was = active.insert(ban.device.clone(), ban.clone());
                if was.is_none_or(|b| b.until <= now) {
                    newly_banned.push(ban.device);
                }
            }
        }
        for device in newly_banned {
            on_ban(&device);
        }
    }

    /// Lifts a ban; returns whether there was one.
    pub async fn unban(&self, device: &str, now: i64) -> Result<bool, String> {
        let was = self
            .active
            .write()
            .expect("bans lock")
            .remove(device)
            .is_some_and(|b| b.until > now);
        with_pool!(self.db, pool => {
            sqlx::query("DELETE FROM fleetgate_bans WHERE device_id = $1").bind(device).execute(pool).await.map(|_| ())
        })
        .map_err(|e| format!("cannot lift ban: {e}"))?;
        self.db.notify(CHANNEL, device).await;
        Ok(was)
    }
}

/// The PostgreSQL channel bans and unbans are announced on (the device id).
const CHANNEL: &str = "fleetgate_bans";

/// Bans in force at `now`: all of them, or those of one device.
async fn read_bans(db: &Db, now: i64, device: Option<&str>) -> Result<Vec<Ban>, sqlx::Error> {
    let filter = if device.is_some() {
        " AND device_id = $2"
    } else {
        ""
    };
    let sql =
        format!("SELECT device_id, until, reason FROM fleetgate_bans WHERE until > $1{filter}");
    with_pool!(db, pool => {
        let mut query = sqlx::query(&sql).bind(now);
        if let Some(device) = device {
            query = query.bind(device);
        }
        query.fetch_all(pool).await.map(|rows| {
            rows.iter()
                .map(|r| Ban { device: r.get(0), until: r.get(1), reason: r.get(2) })
                .collect()
        })
    })
}
