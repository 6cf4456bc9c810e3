//! What the fuzz targets share: a store over a throwaway SQLite database
//! holding a fixed set of streams and views (the SQL guard, view plans and
//! the ingest pipeline need a catalog), a handshake fixture with one
//! registered device, and the platform key.
//!
//! Each fixture is made once per process, on first use, and is never
//! changed afterwards, so an input does the same thing whenever it runs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use fleetgate_admin::bans::Bans;
use fleetgate_admin::handshake::{Handshakes, NONCE_TTL_MS};
use fleetgate_admin::registry::Registry;
use fleetgate_protocol::schema::StreamsFile;
use fleetgate_protocol::{AuthError, Authenticate, Principal, Role, TokenSigner};
use fleetgate_store::compaction::{Compaction, CompactionSettings};
use fleetgate_store::db::Pools;
use fleetgate_store::views::{AutoSettings, Views, ViewsFile};
use fleetgate_store::{Catalog, Db};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tempfile::TempDir;

/// The time every target runs at (Unix ms): 2027-01-15, well inside any
/// window the fixtures issue, so an input's outcome never depends on the
/// clock.
pub const NOW_MS: i64 = 1_800_000_000_000;
pub const NOW: i64 = NOW_MS / 1000;

/// The streams every store fixture holds: a keyed tiered stream with
/// every field type (bounds, enum text and codes, a unit conversion), a
/// bucketed stream with writers and an enrich column, and a plain stream
/// one of whose fields is compacted into `extra`.
pub const STREAMS: &str = r#"
[streams.temperature]
key = ["device_id", "seq"]
hot = "1h"
ttl = "30d"
fields.seq        = { type = "int", required = true }
fields.celsius    = { type = "float", min = -40.0, max = 125.0, required = true }
fields.humidity   = { type = "float", min = 0.0, max = 100.0 }
fields.status     = { type = "enum", values = ["ok", "warn", "fault"] }
fields.level      = { type = "enum", values = ["low", "high"], code = true }
fields.taken_at   = { type = "timestamp" }
fields.fahrenheit = { type = "float", scale = 0.5555555555555556, offset = -17.77777777777778 }
fields.room       = { type = "string" }
fields.ok         = { type = "bool" }

[streams.orders]
key = ["order_id"]
bucket = { time = "ordered_at", width = "1h" }
writers = ["till"]
fields.order_id   = { type = "string", required = true }
fields.ordered_at = { type = "timestamp", required = true }
fields.amount     = { type = "float" }
fields.region     = { type = "string" }
enrich.region_name = { lookup = "regions", from = "region", column = "name", type = "string" }

[streams.plain]
fields.kwh  = { type = "float" }
fields.note = { type = "string" }
"#;

/// The views every store fixture holds: aggregate views (realtime,
/// periodic, on demand, one over another), rows views with derived
/// columns, an index, and a rows view over a rows view.
pub const VIEWS: &str = r#"
[views.hourly]
source = "temperature"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1h" }
aggregates = { readings = "count(*)", mean = "avg(celsius)", peak = "max(celsius)" }
refresh = "realtime"

[views.daily]
source = "hourly"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1d" }
aggregates = { readings = "count(*)" }

[views.by_status]
source = "temperature"
key = ["status"]
fields = ["celsius", "taken_at"]
derived = { tag = "concat(device_id, '/', status)", warm = "celsius * 1.8 + 32" }

[views.status_index]
source = "temperature"
key = ["status", "taken_at"]

[views.by_tag]
source = "by_status"
key = ["tag"]
fields = ["warm"]

[views.region_sales]
source = "orders"
group_by = ["region"]
bucket = { column = "ordered_at", width = "1d" }
aggregates = { total = "sum(amount)", n = "count(*)" }
refresh = { every = "30s" }

[views.kwh_daily]
source = "plain"
group_by = ["device_id"]
bucket = { column = "received_at", width = "1d" }
aggregates = { used = "sum(kwh)", low = "min(kwh)" }
refresh = "on_demand"
"#;

/// A runtime for the async parts of the fixtures (and the few async calls
/// a target makes), shared by the whole process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A directory for a throwaway database: in memory (`/dev/shm`) where
/// there is one, since the store syncs every commit.
fn scratch_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("fleetgate-fuzz")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::Builder::new()
        .prefix("fleetgate-fuzz")
        .tempdir()
        .expect("temporary directory")
}

/// A store: catalog, views and compaction over [`STREAMS`] and [`VIEWS`].
pub struct StoreFixture {
    pub db: Db,
    pub catalog: Catalog,
    pub views: Arc<Views>,
    pub compaction: Compaction,
    /// What a query may name, as the query route gathers it: the streams
    /// and the bucketed streams' superseded tables.
    pub tables: HashSet<String>,
    _dir: TempDir,
}

pub fn store() -> &'static StoreFixture {
    static STORE: OnceLock<StoreFixture> = OnceLock::new();
    STORE.get_or_init(|| {
        runtime().block_on(async {
            let dir = scratch_dir();
            let db = Db::open(None, &dir.path().join("store.db"))
                .await
                .expect("store database");
            let catalog = fleetgate_store::open_catalog(&db).await.expect("catalog");
            let streams = StreamsFile::parse(STREAMS).expect("fixture streams");
            catalog
                .apply(&streams)
                .await
                .expect("apply fixture streams");
            let views = Arc::new(
                Views::open(db.clone(), catalog.clone(), AutoSettings::off())
                    .await
                    .expect("views"),
            );
            let file = ViewsFile::parse(VIEWS).expect("fixture views");
            views.create(&file).await.expect("create fixture views");
            assert!(
                catalog
                    .compact("plain", "note")
                    .await
                    .expect("compact plain.note"),
                "plain.note is compacted"
            );
            let compaction = Compaction::open(
                db.clone(),
                catalog.clone(),
                views.clone(),
                CompactionSettings::default(),
            )
            .await
            .expect("compaction");
            // Opens every read connection now. The pool opens one when none
            // is idle (the last one goes back to it on a task of its own),
            // and the worker thread that starts then, mid-input, is what
            // libFuzzer's per-input leak check reports.
            if let Pools::Sqlite { read, .. } = &db.pools {
                let mut held = Vec::new();
                for _ in 0..read.options().get_max_connections() {
                    held.push(read.acquire().await.expect("read connection"));
                }
            }
            let tables = catalog
                .list()
                .into_iter()
                .flat_map(|s| {
                    let superseded = s.bucket().is_some().then(|| s.superseded_table());
                    std::iter::once(s.name.clone()).chain(superseded)
                })
                .collect();
            StoreFixture {
                db,
                catalog,
                views,
                compaction,
                tables,
                _dir: dir,
            }
        })
    })
}

/// The platform key (made once per process: no outcome depends on which
/// key it is, only on whether a signature is the platform's).
pub fn platform() -> &'static TokenSigner {
    static PLATFORM: OnceLock<TokenSigner> = OnceLock::new();
    PLATFORM.get_or_init(|| {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        TokenSigner::from_pkcs8(pkcs8.as_ref()).expect("platform key")
    })
}

/// Stands in for the refusal ledger: a ledger would ban the device after
/// a few refusals, and then every input would be judged by that ban.
#[derive(Default)]
pub struct Refusals(pub Mutex<u64>);

impl Authenticate for Refusals {
    fn authenticate(&self, _: Option<&str>, _: &str) -> Result<Principal, AuthError> {
        Err(AuthError::BadCredentials("not used by handshakes".into()))
    }
    fn record_refusal(&self, _: &str, _: &str) {
        *self.0.lock().expect("refusals") += 1;
    }
}

/// The device the handshake fixture registers.
pub const DEVICE: &str = "t1";
pub const DEVICE_TYPE: &str = "thermostat";

/// `Handshakes` over a throwaway database in which [`DEVICE`], a
/// thermostat, is registered with `key`'s public key.
pub struct HandshakeFixture {
    pub handshakes: Handshakes,
    /// The device's key.
    pub key: Ed25519KeyPair,
    _dir: TempDir,
}

pub fn handshakes() -> &'static HandshakeFixture {
    static HANDSHAKES: OnceLock<HandshakeFixture> = OnceLock::new();
    HANDSHAKES.get_or_init(|| {
        runtime().block_on(async {
            let dir = scratch_dir();
            let db = Db::open(None, &dir.path().join("admin.db"))
                .await
                .expect("admin database");
            let registry = Registry::load(db.clone()).await.expect("registry");
            let bans = Bans::load(db.clone(), NOW).await.expect("bans");
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
            let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("device key");
            registry
                .add(
                    DEVICE,
                    Role::Ingest,
                    Some(DEVICE_TYPE),
                    Some(key.public_key().as_ref()),
                    0,
                )
                .await
                .expect("register the device");
            let nonce_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"fuzz nonce key");
            let handshakes = Handshakes::open(
                registry,
                bans,
                Arc::new(Refusals::default()),
                nonce_key,
                NONCE_TTL_MS,
                db,
            )
            .await
            .expect("handshakes");
            HandshakeFixture {
                handshakes,
                key,
                _dir: dir,
            }
        })
    })
}
