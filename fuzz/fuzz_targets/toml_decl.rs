//! The declarations an operator applies as TOML: streams
//! (`StreamsFile::parse` and each stream's derived settings), views
//! (`ViewsFile::parse`, then each view planned against the fixture's
//! streams and views, and its SQL generated for both backends) and ETL jobs
//! (`JobsFile::parse`, which compiles the rules; then the schedule, source
//! queries, and the compiled rules run over a few rows of every type).
//!
//! Input: one byte choosing the kind (streams, views, jobs), then the text.

#![no_main]

use std::collections::HashMap;

use fleetgate_etl::confine::{check_source_query, SourceDatabase};
use fleetgate_etl::job::{JobsFile, SourceKind};
use fleetgate_etl::schema::ValueType;
use fleetgate_etl::transform::{Context, Origin, Row};
use fleetgate_fuzz::{store, NOW_MS};
use fleetgate_protocol::schema::StreamsFile;
use fleetgate_protocol::Role;
use fleetgate_store::db::Backend;
use fleetgate_store::values::SqlValue;
use fleetgate_store::views::{ViewPlan, ViewsFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    match kind % 3 {
        0 => streams(text),
        1 => views(text),
        _ => jobs(text),
    }
});

fn streams(text: &str) {
    let Ok(file) = StreamsFile::parse(text) else {
        return;
    };
    for (name, def) in &file.streams {
        let _ = def.check(name);
        let _ = (def.hot_after(), def.ttl(), def.bucket_width_ms());
        let _ = def.may_write(name, Role::Ingest, Some("thermostat"));
    }
}

fn views(text: &str) {
    let Ok(file) = ViewsFile::parse(text) else {
        return;
    };
    let store = store();
    let plans = store.views.plans();
    for (name, def) in &file.views {
        // A view's source is a stream, or a view (then planned over it).
        let over = plans.iter().find(|p| p.name == def.source);
        let source = over.map_or(def.source.as_str(), |p| p.source());
        let Some(stream) = store.catalog.get(source) else {
            continue;
        };
        let Ok(mut plan) = ViewPlan::new(name, def, &stream, over.map(|p| p.as_ref())) else {
            continue;
        };
        for backend in [Backend::Sqlite, Backend::Postgres] {
            plan.backend = backend;
            let _ = plan.create_sql();
            let _ = plan.backfill_sql(&stream.name);
            let _ = plan.rebuild_sql(&stream.name);
            let _ = plan.fold_sql();
            let _ = plan.drop_sql();
        }
        let _ = (plan.read_from(), plan.table(), plan.tail());
        let _ = (plan.row_bytes_estimate(), plan.bucket_sql("r"));
        let _ = plan.source_columns().count();
    }
}

/// Values of every type, the extremes included, as a source may hold them.
fn sample(ty: ValueType, i: usize) -> SqlValue {
    match (ty, i % 4) {
        (_, 3) => SqlValue::Null,
        (ValueType::Int | ValueType::Timestamp, n) => SqlValue::Int([0, i64::MAX, i64::MIN][n]),
        (ValueType::Float, n) => SqlValue::Float([0.5, f64::MAX, -1e-300][n]),
        (ValueType::Bool, n) => SqlValue::Bool(n == 1),
        (ValueType::Text, n) => SqlValue::Text(["", "F", "2026-01-01T00:00:00Z"][n].into()),
    }
}

fn rows(columns: &[(String, ValueType)], source: u16) -> Vec<Row> {
    (0..4)
        .map(|i| Row {
            values: columns.iter().map(|(_, ty)| sample(*ty, i)).collect(),
            origin: Origin {
                source,
                file: 0,
                line: i as u64 + 1,
            },
        })
        .collect()
}

fn jobs(text: &str) {
    let Ok(file) = JobsFile::parse(text) else {
        return;
    };
    for job in file.jobs.values() {
        if let Ok(Some(schedule)) = job.schedule() {
            let _ = schedule.next_after(NOW_MS);
        }
        let _ = job.load.covers();
        for source in job.sources.values() {
            if let Ok(SourceKind::Sql { query, .. }) = source.kind() {
                let _ = check_source_query(query, &SourceDatabase::Sqlite("etl.db".into()));
            }
        }
        let Ok(pipeline) = job.pipeline() else {
            continue;
        };
        let sources: HashMap<String, Vec<Row>> = job
            .sources
            .iter()
            .enumerate()
            .map(|(i, (name, def))| (name.clone(), rows(def.schema().columns(), i as u16)))
            .collect();
        let main = sources.get(job.main_source()).cloned().unwrap_or_default();
        let mut context = Context {
            sources: &sources,
            rejects: Vec::new(),
        };
        let out = pipeline.apply(main, &mut context);
        let width = pipeline.output().len();
        for row in &out {
            assert_eq!(row.values.len(), width, "a row as wide as the output");
        }
    }
}
