//! fleetgate SDK builder: turns a role and the declared streams into an SDK
//! artifact — a generated WebAssembly module ([`module`]), or that module
//! compiled ahead of time by wasmtime/cranelift for one architecture — and
//! seals it for one device in a platform-signed manifest.
//!
//! Artifacts depend only on (role, SDK version, target, schema), so they are
//! cached under that key; the device id, nonce and times live in the
//! manifest, which is signed per request.

pub mod module;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetgate_device_sdk::runtime::{compat_digest, engine};
use fleetgate_protocol::schema::StreamDef;
use fleetgate_protocol::sdk::abi::{self, ModuleSchema, ModuleStream};
use fleetgate_protocol::sdk::{sha256_hex, Manifest, SdkBundle, Target, SDK_VERSION};
use fleetgate_protocol::{Role, TokenSigner};
use wasmtime::Engine;

/// A built artifact, shared by every device whose request has its key.
#[derive(Debug)]
pub struct Artifact {
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub target: Target,
    pub role: Role,
    pub schema_sha256: String,
    pub wasmtime_compat: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    role: Role,
    sdk_version: String,
    target: Target,
    schema_sha256: String,
}

/// What a device is sealed an artifact for.
pub struct Recipient<'a> {
    pub device_id: &'a str,
    pub nonce: Option<&'a str>,
    pub now: i64,
    pub ttl_secs: i64,
}

pub struct Builder {
    engines: Mutex<HashMap<Target, Engine>>,
    cache: Mutex<HashMap<CacheKey, Arc<Artifact>>>,
    capacity: usize,
}

impl Builder {
    /// `capacity` artifacts are kept; 0 disables the cache.
    pub fn new(capacity: usize) -> Builder {
        Builder {
            engines: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The module's view of the streams: those an SDK can encode (at most
    /// [`abi::MAX_FIELDS`] fields) and a device of `role` and
    /// `device_type` may write (a stream's `writers`), by name, so that
    /// equal catalogs give equal modules (and cache keys) whatever order
    /// they were listed in. A stolen device's SDK thus holds no encoder,
    /// field list or bounds for a stream its type may not write.
    pub fn module_schema<'a>(
        role: Role,
        device_type: Option<&str>,
        streams: impl IntoIterator<Item = (&'a str, &'a StreamDef)>,
    ) -> ModuleSchema {
        let mut streams: Vec<ModuleStream> = streams
            .into_iter()
            .filter(|(_, def)| def.fields.len() <= abi::MAX_FIELDS as usize)
            .filter(|(name, def)| def.may_write(name, role, device_type).is_ok())
            .map(|(name, def)| ModuleStream {
                name: name.to_string(),
                fields: def.fields.clone(),
            })
            .collect();
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        ModuleSchema {
            sdk_version: SDK_VERSION.to_string(),
            role,
            streams,
        }
    }

    /// Returns the artifact for `role` and `target` over `schema`, and
    /// whether it came from the cache. Compiling is CPU-bound: async
    /// callers should run this on a blocking thread.
    pub fn build(
        &self,
        schema: &ModuleSchema,
        target: Target,
    ) -> Result<(Arc<Artifact>, bool), String> {
        let schema_sha256 = sha256_hex(&serde_json::to_vec(schema).expect("schema serializes"));
        let key = CacheKey {
            role: schema.role,
            sdk_version: schema.sdk_version.clone(),
            target,
            schema_sha256: schema_sha256.clone(),
        };
        if let Some(hit) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok((hit.clone(), true));
        }
        let wasm = module::generate(schema.role, schema);
        wasmparser::Validator::new()
            .validate_all(&wasm)
            .map_err(|e| format!("generated module is invalid (a builder bug): {e}"))?;
        let (bytes, wasmtime_compat) = match target {
            Target::Wasm => (wasm, None),
            target => {
                let engine = self.engine(target)?;
                let native = engine
                    .precompile_module(&wasm)
                    .map_err(|e| format!("compiling for {target}: {e:#}"))?;
                (native, Some(compat_digest(&engine)))
            }
        };
        let artifact = Arc::new(Artifact {
            sha256: sha256_hex(&bytes),
            bytes,
            target,
            role: schema.role,
            schema_sha256,
            wasmtime_compat,
        });
        if self.capacity > 0 {
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() >= self.capacity {
                // Schemas change rarely; starting over is simpler than LRU
                // bookkeeping and costs one rebuild per key.
                cache.clear();
            }
            cache.insert(key, artifact.clone());
        }
        Ok((artifact, false))
    }

    fn engine(&self, target: Target) -> Result<Engine, String> {
        let mut engines = self.engines.lock().expect("engine lock");
        if let Some(engine) = engines.get(&target) {
            return Ok(engine.clone());
        }
        let engine = engine(target)?;
        engines.insert(target, engine.clone());
        Ok(engine)
    }

    /// Seals an artifact for one device under the platform key.
    pub fn seal(artifact: &Artifact, to: &Recipient<'_>, platform: &TokenSigner) -> SdkBundle {
        let manifest = Manifest {
            device_id: to.device_id.to_string(),
            role: artifact.role,
            sdk_version: SDK_VERSION.to_string(),
            target: artifact.target,
            artifact_sha256: artifact.sha256.clone(),
            artifact_len: artifact.bytes.len() as u64,
            wasmtime_compat: artifact.wasmtime_compat.clone(),
            schema_sha256: artifact.schema_sha256.clone(),
            nonce: to.nonce.map(str::to_string),
            issued_at: to.now,
            expires_at: to.now + to.ttl_secs,
        };
        SdkBundle::seal(&manifest, &artifact.bytes, platform)
    }
}

/// The schema a generated WebAssembly module carries (the streams it can
/// encode): the JSON its data segment starts with.
pub fn module_schema_of(wasm: &[u8]) -> Result<ModuleSchema, String> {
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let wasmparser::Payload::DataSection(section) = payload.map_err(|e| e.to_string())? {
            for data in section {
                let data = data.map_err(|e| e.to_string())?;
                // The schema is the first JSON value; names follow it.
                let mut values =
                    serde_json::Deserializer::from_slice(data.data).into_iter::<ModuleSchema>();
                if let Some(Ok(schema)) = values.next() {
                    return Ok(schema);
                }
            }
        }
    }
    Err("the module carries no schema".into())
}

/// Imports and exports of a WebAssembly module, as `module.name` and
/// `name`: what a module can ask of its host and what it offers.
pub fn interface(wasm: &[u8]) -> Result<(Vec<String>, Vec<String>), String> {
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| e.to_string())? {
            wasmparser::Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    imports.push(format!("{}.{}", import.module, import.name));
                }
            }
            wasmparser::Payload::ExportSection(section) => {
                for export in section {
                    exports.push(export.map_err(|e| e.to_string())?.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok((imports, exports))
}

#[cfg(test)]
mod tests {
    use fleetgate_device_sdk::runtime::{RuntimeLimits, SdkModule};
    use fleetgate_device_sdk::SdkError;
    use fleetgate_protocol::record::{self, FieldValue};
    use fleetgate_protocol::schema::StreamsFile;
    use fleetgate_protocol::sdk::abi;
    use ring::rand::SystemRandom;
    use ring::signature::Ed25519KeyPair;

    use super::*;

    const STREAMS: &str = r#"
[streams.temperature]
key = ["device_id", "seq"]
fields.seq     = { type = "int", required = true, min = 0 }
fields.celsius = { type = "float", required = true, min = -40.0, max = 125.0 }
fields.room    = { type = "string" }
fields.mode    = { type = "enum", values = ["heat", "cool"] }
fields.on      = { type = "bool" }
fields.at      = { type = "timestamp" }
"#;

    fn schema(role: Role) -> ModuleSchema {
        let file = StreamsFile::parse(STREAMS).unwrap();
        Builder::module_schema(
            role,
            None,
            file.streams.iter().map(|(n, d)| (n.as_str(), d)),
        )
    }

    fn load(builder: &Builder, role: Role, target: Target) -> SdkModule {
        let (artifact, _) = builder.build(&schema(role), target).unwrap();
        let platform = TokenSigner::from_pkcs8(
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        let bundle = Builder::seal(
            &artifact,
            &Recipient {
                device_id: "t1",
                nonce: None,
                now: 0,
                ttl_secs: 60,
            },
            &platform,
        );
        let (manifest, bytes) = bundle.open(&platform.public_key()).unwrap();
        SdkModule::load(&manifest, &bytes, RuntimeLimits::default()).unwrap()
    }

    fn reading() -> Vec<(&'static str, FieldValue)> {
        vec![
            ("seq", 7.into()),
            ("celsius", 21.5.into()),
            ("room", "hall".into()),
            ("mode", "heat".into()),
            ("on", true.into()),
            ("at", 1_700_000_000_000i64.into()),
        ]
    }

    #[test]
    fn each_role_imports_and_exports_only_what_it_may_do() {
        let common = [
            "memory",
            abi::SCHEMA_PTR,
            abi::SCHEMA_LEN,
            abi::INPUT_PTR,
            abi::TEXT_PTR,
            abi::TEXT_CAP,
            abi::OUTPUT_PTR,
            abi::ENCODE,
            abi::PUBLISH,
        ];
        let expect = |extra_imports: &[&str], extra_exports: &[&str]| {
            let mut imports = vec!["fleetgate.publish".to_string()];
            imports.extend(extra_imports.iter().map(|i| format!("fleetgate.{i}")));
            let mut exports: Vec<String> = common.iter().map(|e| e.to_string()).collect();
            exports.extend(extra_exports.iter().map(|e| e.to_string()));
            exports.sort();
            (imports, exports)
        };
        for (role, (imports, exports)) in [
            (Role::Ingest, expect(&[], &[])),
            (
                Role::Extract,
                expect(&["query", "follow"], &[abi::QUERY, abi::FOLLOW]),
            ),
            (
                Role::Admin,
                expect(
                    &["query", "follow", "admin"],
                    &[abi::QUERY, abi::FOLLOW, abi::ADMIN],
                ),
            ),
        ] {
            let wasm = module::generate(role, &schema(role));
            wasmparser::Validator::new().validate_all(&wasm).unwrap();
            let (mut got_imports, mut got_exports) = interface(&wasm).unwrap();
            got_imports.sort();
            got_exports.sort();
            let mut imports = imports;
            imports.sort();
            assert_eq!((got_imports, got_exports), (imports, exports), "{role}");
        }
    }

    #[test]
    fn the_module_encodes_exactly_what_the_reference_encoder_does() {
        let builder = Builder::new(0);
        let mut module = load(&builder, Role::Ingest, Target::Wasm);
        let encoded = module.encode("temperature", &reading()).unwrap();
        assert_eq!(encoded, record::encode(&reading()).unwrap());
        let decoded = record::decode(&encoded).unwrap();
        assert_eq!(decoded["celsius"], 21.5);
        // Optional fields may be left out.
        let minimal = [("seq", 1.into()), ("celsius", (-3.25).into())];
        assert_eq!(
            module.encode("temperature", &minimal).unwrap(),
            record::encode(&minimal).unwrap()
        );
    }

    #[test]
    fn the_module_refuses_what_the_store_would_refuse() {
        let builder = Builder::new(0);
        let mut module = load(&builder, Role::Ingest, Target::Wasm);
        let mut check = |fields: Vec<(&str, FieldValue)>, expected: &str| match module
            .encode("temperature", &fields)
        {
            Err(SdkError::Invalid(reason)) => assert_eq!(reason, expected),
            other => panic!("{fields:?}: expected {expected:?}, got {other:?}"),
        };
        check(vec![("celsius", 20.0.into())], "seq is required");
        check(
            vec![("seq", (-1).into()), ("celsius", 20.0.into())],
            "seq is below the minimum",
        );
        check(
            vec![("seq", 1.into()), ("celsius", 125.5.into())],
            "celsius is above the maximum",
        );
        check(
            vec![("seq", 1.into()), ("celsius", f64::NAN.into())],
            "celsius is not a finite number",
        );
        check(
            vec![("seq", 1.into()), ("celsius", f64::INFINITY.into())],
            "celsius is not a finite number",
        );
        check(
            vec![
                ("seq", 1.into()),
                ("celsius", 1.0.into()),
                ("mode", "dry".into()),
            ],
            "mode is not one of the allowed values",
        );
        check(
            vec![
                ("seq", 1.into()),
                ("celsius", 1.0.into()),
                ("mode", "hea".into()),
            ],
            "mode is not one of the allowed values",
        );
        check(
            vec![
                ("seq", 1.into()),
                ("celsius", 1.0.into()),
                ("room", "a\0b".into()),
            ],
            "room contains a NUL character",
        );
        assert!(matches!(
            module.encode("humidity", &[]),
            Err(SdkError::Invalid(_))
        ));
        // The ingest module has no query export at all.
        assert!(matches!(
            module.query("SELECT 1"),
            Err(SdkError::NotInRole(_))
        ));
    }

    #[test]
    fn native_artifacts_for_this_machine_and_pulley_run_the_same_code() {
        let builder = Builder::new(8);
        let expected = record::encode(&reading()).unwrap();
        for target in [Target::X86_64, Target::Pulley64] {
            let mut module = load(&builder, Role::Extract, target);
            assert_eq!(module.encode("temperature", &reading()).unwrap(), expected);
            assert_eq!(
                module.query("SELECT 1").unwrap(),
                fleetgate_device_sdk::HostRequest::Query("SELECT 1".into())
            );
        }
    }

    #[test]
    fn cross_targets_produce_objects_for_their_architecture() {
        let builder = Builder::new(8);
        // ELF e_machine: 183 aarch64, 243 RISC-V.
        for (target, machine) in [(Target::Aarch64, 183u16), (Target::Riscv64, 243)] {
            let (artifact, _) = builder.build(&schema(Role::Ingest), target).unwrap();
            assert_eq!(&artifact.bytes[..4], b"\x7fELF", "{target}");
            let e_machine = u16::from_le_bytes([artifact.bytes[18], artifact.bytes[19]]);
            assert_eq!(e_machine, machine, "{target}");
            assert!(artifact.wasmtime_compat.is_some());
        }
        let (pulley32, _) = builder
            .build(&schema(Role::Ingest), Target::Pulley32)
            .unwrap();
        assert_eq!(&pulley32.bytes[..4], b"\x7fELF");
    }

    #[test]
    fn a_device_type_gets_encoders_only_for_the_streams_it_may_write() {
        let file = StreamsFile::parse(
            r#"
[streams.orders]
writers = ["pos"]
fields.amount = { type = "float", required = true }
[streams.temperature]
fields.celsius = { type = "float" }
"#,
        )
        .unwrap();
        let names = |role, device_type| {
            let schema = Builder::module_schema(
                role,
                device_type,
                file.streams.iter().map(|(n, d)| (n.as_str(), d)),
            );
            // Read back from the generated module itself.
            let wasm = module::generate(role, &schema);
            let carried = module_schema_of(&wasm).unwrap();
            assert_eq!(carried, schema);
            carried
                .streams
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Role::Ingest, Some("thermostat")), ["temperature"]);
        assert_eq!(names(Role::Ingest, None), ["temperature"]);
        assert_eq!(names(Role::Ingest, Some("pos")), ["orders", "temperature"]);
        assert_eq!(names(Role::Admin, None), ["orders", "temperature"]);
    }

    #[test]
    fn identical_requests_hit_the_cache_and_a_new_schema_misses_it() {
        let builder = Builder::new(8);
        let (first, cached) = builder.build(&schema(Role::Ingest), Target::Wasm).unwrap();
        assert!(!cached);
        let (second, cached) = builder.build(&schema(Role::Ingest), Target::Wasm).unwrap();
        assert!(cached);
        assert!(Arc::ptr_eq(&first, &second));
        let (_, cached) = builder.build(&schema(Role::Extract), Target::Wasm).unwrap();
        assert!(!cached, "another role is another artifact");
        let mut changed = schema(Role::Ingest);
        changed.streams.pop();
        let (_, cached) = builder.build(&changed, Target::Wasm).unwrap();
        assert!(!cached, "another schema is another artifact");
    }

    /// A platform-signed module that misbehaves: the runtime's limits, not
    /// the signature, are what stop it.
    fn hostile(body: wasm_encoder::Function) -> Vec<u8> {
        use wasm_encoder::*;
        let schema = serde_json::to_vec(&schema(Role::Ingest)).unwrap();
        let mut types = TypeSection::new();
        types.ty().function([], [ValType::I32]);
        types.ty().function([ValType::I32], [ValType::I32]);
        let mut functions = FunctionSection::new();
        let mut exports = ExportSection::new();
        let mut code = CodeSection::new();
        exports.export("memory", ExportKind::Memory, 0);
        let constants = [
            (abi::SCHEMA_PTR, 0),
            (abi::SCHEMA_LEN, schema.len() as i32),
            (abi::INPUT_PTR, 8192),
            (abi::TEXT_PTR, 16384),
            (abi::TEXT_CAP, 1024),
            (abi::OUTPUT_PTR, 32768),
        ];
        for (i, (name, value)) in constants.iter().enumerate() {
            functions.function(0);
            let mut f = Function::new([]);
            f.instructions().i32_const(*value).end();
            code.function(&f);
            exports.export(name, ExportKind::Func, i as u32);
        }
        functions.function(1);
        code.function(&body);
        exports.export(abi::ENCODE, ExportKind::Func, 6);
        exports.export(abi::PUBLISH, ExportKind::Func, 6);
        let mut memories = MemorySection::new();
        memories.memory(MemoryType {
            minimum: 1,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        let mut data = DataSection::new();
        data.active(0, &ConstExpr::i32_const(0), schema);
        let mut module = Module::new();
        module
            .section(&types)
            .section(&functions)
            .section(&memories)
            .section(&exports)
            .section(&code)
            .section(&data);
        module.finish()
    }

    fn load_wasm(wasm: &[u8]) -> SdkModule {
        let manifest = Manifest {
            device_id: "t1".into(),
            role: Role::Ingest,
            sdk_version: SDK_VERSION.into(),
            target: Target::Wasm,
            artifact_sha256: sha256_hex(wasm),
            artifact_len: wasm.len() as u64,
            wasmtime_compat: None,
            schema_sha256: String::new(),
            nonce: None,
            issued_at: 0,
            expires_at: 1,
        };
        SdkModule::load(&manifest, wasm, RuntimeLimits::default()).unwrap()
    }

    #[test]
    fn a_module_that_loops_runs_out_of_fuel_and_the_runtime_stays_usable() {
        let mut body = wasm_encoder::Function::new([]);
        body.instructions()
            .loop_(wasm_encoder::BlockType::Empty)
            .br(0)
            .end()
            .i32_const(0)
            .end();
        let mut module = load_wasm(&hostile(body));
        for _ in 0..2 {
            match module.encode("temperature", &[("seq", 1.into())]) {
                Err(SdkError::Module(reason)) => {
                    assert!(reason.contains("ran out of fuel"), "{reason}")
                }
                other => panic!("expected a fuel error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_module_that_grows_memory_is_stopped_at_the_limit() {
        let mut body = wasm_encoder::Function::new([]);
        body.instructions()
            .loop_(wasm_encoder::BlockType::Empty)
            .i32_const(16)
            .memory_grow(0)
            .drop()
            .br(0)
            .end()
            .i32_const(0)
            .end();
        let mut module = load_wasm(&hostile(body));
        match module.encode("temperature", &[("seq", 1.into())]) {
            Err(SdkError::Module(reason)) => {
                assert!(
                    reason.contains("memory") || reason.contains("grow"),
                    "{reason}"
                )
            }
            other => panic!("expected a memory error, got {other:?}"),
        }
    }
}
