//! `fleetgate bench --sdk`: what SDK delivery costs. A device handshakes
//! (nonce, signed claims, server verifies, builds, signs) against a server
//! with the build cache off (cold) and on (cached), per target; then the
//! device side: verifying and loading a bundle, and encoding one record
//! inside the module.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use fleetgate_device_sdk::identity::{read_public_key, DeviceKey};
use fleetgate_device_sdk::runtime::{RuntimeLimits, SdkModule};
use fleetgate_device_sdk::{verify_bundle, Expected};
use fleetgate_protocol::sdk::{HandshakeClaims, SdkBundle, Target, SDK_VERSION};
use serde_json::{json, Value};

use super::{api, ms, percentile, spawn_server, Spawned, STREAM};

const DEVICE: &str = "bench-sdk";

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

async fn prepare(server: &Spawned, http: &reqwest::Client, key: &DeviceKey) -> anyhow::Result<()> {
    api(
        http,
        server,
        "/v1/streams",
        STREAM.to_string().into(),
        false,
    )
    .await?;
    let body =
        json!({ "id": DEVICE, "role": "ingest", "type": "bench", "public_key": key.public_hex() });
    api(http, server, "/v1/devices", body.to_string().into(), true).await?;
    Ok(())
}

/// One handshake as a device makes it; returns its duration and the bundle.
async fn handshake(
    server: &Spawned,
    http: &reqwest::Client,
    key: &DeviceKey,
    target: Target,
) -> anyhow::Result<(Duration, SdkBundle, String)> {
    let started = Instant::now();
    let nonce: Value = http
        .get(format!("{}/v1/handshake/nonce", server.http))
        .send()
        .await?
        .json()
        .await?;
    let nonce = nonce["nonce"].as_str().ok_or_else(|| anyhow!("no nonce"))?;
    let claims = HandshakeClaims {
        device_id: DEVICE.into(),
        device_type: "bench".into(),
        fingerprint: "bench".into(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        secure_transfer: false,
        sdk_version: SDK_VERSION.into(),
        target: Some(target),
        nonce: nonce.to_string(),
        timestamp_ms: fleetgate_admin::unix_now_ms(),
    };
    let response = http
        .post(format!("{}/v1/handshake", server.http))
        .json(&key.sign_handshake(&claims))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("handshake refused: {body}");
    }
    let elapsed = started.elapsed();
    let bundle: SdkBundle = serde_json::from_value(body["sdk"].clone())?;
    Ok((elapsed, bundle, nonce.to_string()))
}

async fn series(
    server: &Spawned,
    http: &reqwest::Client,
    key: &DeviceKey,
    target: Target,
    count: usize,
) -> anyhow::Result<(Vec<Duration>, SdkBundle, String)> {
    let mut times = Vec::with_capacity(count);
    let mut last = None;
    for _ in 0..count {
        let (took, bundle, nonce) = handshake(server, http, key, target).await?;
        times.push(took);
        last = Some((bundle, nonce));
    }
    times.sort();
    let (bundle, nonce) = last.ok_or_else(|| anyhow!("no handshakes"))?;
    Ok((times, bundle, nonce))
}

pub async fn run(count: usize) -> anyhow::Result<()> {
    let count = count.max(1);
    let keys = tempfile::tempdir()?;
    let key = DeviceKey::generate(keys.path()).map_err(|e| anyhow!(e))?;
    let http = reqwest::Client::new();
    // Every handshake comes from one address: the per-address limit on
    // routes without a token is off, or it would be what is measured.
    let cold = spawn_server(None, &["--sdk-cache", "0", "--unauth-rate", "0"])?;
    let cached = spawn_server(None, &["--unauth-rate", "0"])?;
    prepare(&cold, &http, &key).await?;
    prepare(&cached, &http, &key).await?;
    let platform_key =
        read_public_key(&cached.dir.path().join("platform.pub")).map_err(|e| anyhow!(e))?;

    println!("handshake + build + sign, as a device sees it ({count} handshakes each, one device, loopback HTTP):");
    println!(
        "  {:<9} {:>10} {:>10}   {:>10} {:>10}   artifact",
        "target", "cold p50", "cold p99", "cached p50", "cached p99"
    );
    let mut bundles = Vec::new();
    for target in [
        Target::Wasm,
        Target::X86_64,
        Target::Pulley64,
        Target::Aarch64,
        Target::Riscv64,
    ] {
        let (cold_times, _, _) = series(&cold, &http, &key, target, count).await?;
        handshake(&cached, &http, &key, target).await?; // fills the cache
        let (cached_times, bundle, nonce) = series(&cached, &http, &key, target, count).await?;
        let (manifest, _) = bundle.open(&platform_key).map_err(|e| anyhow!(e))?;
        println!(
            "  {:<9} {:>10} {:>10}   {:>10} {:>10}   {} bytes",
            target.as_str(),
            ms(percentile(&cold_times, 0.5)),
            ms(percentile(&cold_times, 0.99)),
            ms(percentile(&cached_times, 0.5)),
            ms(percentile(&cached_times, 0.99)),
            manifest.artifact_len
        );
        bundles.push((target, bundle, nonce));
    }

    println!("\ndevice side: verify the bundle and load the module; then validate + encode one record inside it:");
    let record = [
        ("seq", 42i64.into()),
        ("value", 17.25f64.into()),
        ("status", "ok".into()),
    ];
    for (target, bundle, nonce) in bundles {
        if !matches!(target, Target::Wasm | Target::X86_64 | Target::Pulley64) {
            continue; // not runnable on this machine
        }
        let started = Instant::now();
        let expected = Expected {
            device_id: DEVICE,
            role: None,
            nonce: Some(&nonce),
            target: Some(target),
            now: fleetgate_admin::unix_now(),
        };
        let (manifest, artifact) =
            verify_bundle(&bundle, &platform_key, &expected).map_err(|e| anyhow!(e))?;
        let mut module = SdkModule::load(&manifest, &artifact, RuntimeLimits::default())?;
        let load = started.elapsed();
        for _ in 0..1_000 {
            module.encode("bench", &record)?;
        }
        let rounds = 100_000;
        let mut times = Vec::with_capacity(rounds);
        let started = Instant::now();
        for _ in 0..rounds {
            let t = Instant::now();
            let bytes = module.encode("bench", &record)?;
            times.push(t.elapsed());
            std::hint::black_box(bytes);
        }
        let mean = started.elapsed() / rounds as u32;
        times.sort();
        println!(
            "  {:<9} verify + load {:>9}   encode one record: mean {}  p50 {}  p99 {}",
            target.as_str(),
            ms(load),
            us(mean),
            us(percentile(&times, 0.5)),
            us(percentile(&times, 0.99)),
        );
    }
    Ok(())
}
