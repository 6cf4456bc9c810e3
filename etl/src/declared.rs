//! Named declarations (jobs, reports, analyses) kept as JSON, one table
//! per kind: how each is stored, replaced, read back and forgotten.

use fleetgate_store::{with_pool, Db};
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::Row as _;

/// One kind of declaration and its table.
pub struct Declared {
    /// `job`, `report`, `analysis`: for messages.
    pub kind: &'static str,
    pub table: &'static str,
}

/// A stored declaration.
pub struct Stored<T> {
    pub name: String,
    pub definition: T,
    pub updated_at: i64,
}

impl Declared {
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, definition TEXT NOT NULL, updated_at BIGINT NOT NULL)",
            self.table
        )
    }

    /// Stores (or replaces) every declaration in one transaction.
    pub async fn save<T: Serialize>(
        &self,
        db: &Db,
        declarations: &IndexMap<String, T>,
        now_ms: i64,
    ) -> Result<(), String> {
        let sql = format!(
            "INSERT INTO {} (name, definition, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
            self.table
        );
        let result = with_pool!(db, pool => async {
            let mut tx = pool.begin().await?;
            for (name, definition) in declarations {
                sqlx::query(&sql)
                    .bind(name)
                    .bind(serde_json::to_string(definition).expect("declarations serialize"))
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }.await);
        result.map_err(|e| format!("cannot save the {} declarations: {e}", self.kind))
    }

    /// Every declaration, by name.
    pub async fn load<T: DeserializeOwned>(&self, db: &Db) -> Result<Vec<Stored<T>>, String> {
        let sql = format!(
            "SELECT name, definition, updated_at FROM {} ORDER BY name",
            self.table
        );
        let rows: Vec<(String, String, i64)> = with_pool!(db, pool => {
            sqlx::query(&sql)
                .fetch_all(pool).await
                .and_then(|rows| rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))).collect())
        })
        .map_err(|e| format!("cannot read the {} declarations: {e}", self.kind))?;
        rows.into_iter()
            .map(|(name, text, updated_at)| {
                let definition = serde_json::from_str(&text)
                    .map_err(|e| format!("{} {name} is stored unreadably: {e}", self.kind))?;
                Ok(Stored {
                    name,
                    definition,
                    updated_at,
                })
            })
            .collect()
    }

    /// Forgets a declaration; false when there was none.
    pub async fn delete(&self, db: &Db, name: &str) -> Result<bool, String> {
        let sql = format!("DELETE FROM {} WHERE name = $1", self.table);
        with_pool!(db, pool => {
            sqlx::query(&sql).bind(name).execute(pool).await.map(|r| r.rows_affected() > 0)
        })
        .map_err(|e| format!("cannot delete {} {name}: {e}", self.kind))
    }
}
