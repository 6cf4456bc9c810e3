//! Runs a generated SDK module in wasmtime, with fuel and memory limits.
//!
//! Host imports do no I/O: they record what the module asked for (a record
//! to publish, a query, a subscription, an admin call) and the async side of
//! the SDK carries it out after the call returns. So a module can only ask
//! for what it imports, and its role decided those imports when it was built.

use std::hash::{Hash, Hasher};

use fleetgate_protocol::record::FieldValue;
use fleetgate_protocol::schema::FieldType;
use fleetgate_protocol::sdk::abi::{self, error, ModuleSchema};
use fleetgate_protocol::sdk::{hex, Manifest, Target};
use wasmtime::{
    Caller, Config, Engine, Instance, Linker, Memory, Module, Store, StoreLimits,
    StoreLimitsBuilder, TypedFunc,
};

use crate::SdkError;

/// The wasmtime settings shared by the builder and the device: an artifact
/// compiled with other settings is refused, so both sides call this.
pub fn engine_config(target: Target) -> Result<Config, String> {
    let mut config = Config::new();
    // Fuel is compiled into the code, so it must be on at build time too.
    config.consume_fuel(true);
    if let Some(triple) = target.triple() {
        config
            .target(triple)
            .map_err(|e| format!("wasmtime cannot target {target}: {e}"))?;
    }
    Ok(config)
}

pub fn engine(target: Target) -> Result<Engine, String> {
    Engine::new(&engine_config(target)?).map_err(|e| format!("wasmtime engine for {target}: {e}"))
}

/// Hex SHA-256 of wasmtime's compatibility hash: equal digests mean one
/// engine's precompiled artifacts load in the other.
pub fn compat_digest(engine: &Engine) -> String {
    struct Sha(ring::digest::Context);
    impl Hasher for Sha {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            unreachable!("only the digest is read")
        }
    }
    let mut sha = Sha(ring::digest::Context::new(&ring::digest::SHA256));
    engine.precompile_compatibility_hash().hash(&mut sha);
    hex(sha.0.finish().as_ref())
}

/// Per-call and per-instance limits, so a module that loops or grows memory
/// fails with an error instead of taking the device with it.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeLimits {
    pub fuel_per_call: u64,
    pub max_memory_bytes: usize,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        RuntimeLimits {
            fuel_per_call: 5_000_000,
            max_memory_bytes: 4 << 20,
        }
    }
}

/// What a module asked the host to do during a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRequest {
    Publish { stream: u32, payload: Vec<u8> },
    Query(String),
    Follow(String),
    Admin { op: i32, arg: String },
}

struct HostState {
    limits: StoreLimits,
    requests: Vec<HostRequest>,
}

/// An instantiated SDK module.
pub struct SdkModule {
    store: Store<HostState>,
    memory: Memory,
    schema: ModuleSchema,
    input: u32,
    text: u32,
    text_cap: u32,
    output: u32,
    encode: TypedFunc<i32, i32>,
    publish: TypedFunc<i32, i32>,
    query: Option<TypedFunc<(i32, i32), i32>>,
    follow: Option<TypedFunc<(i32, i32), i32>>,
    admin: Option<TypedFunc<(i32, i32, i32), i32>>,
    limits: RuntimeLimits,
}

fn trap(what: &str, e: wasmtime::Error) -> SdkError {
    let text = format!("{e:#}");
    if text.contains("fuel") {
        SdkError::Module(format!(
            "{what}: the SDK module ran out of fuel (endless loop?)"
        ))
    } else {
        SdkError::Module(format!("{what}: {text}"))
    }
}

/// The `len` bytes at `ptr` in the calling module's memory, if they are there.
fn take(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let memory = caller.get_export(abi::MEMORY)?.into_memory()?;
    let start = usize::try_from(ptr).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    memory.data(&*caller).get(start..end).map(<[u8]>::to_vec)
}

/// Records what the module asked for; 0, or BAD_ARGUMENT when its bytes
/// were not in memory (or not UTF-8 where text is wanted).
fn record(caller: &mut Caller<'_, HostState>, request: Option<HostRequest>) -> i32 {
    match request {
        Some(request) => {
            caller.data_mut().requests.push(request);
            0
        }
        None => error::whole(error::BAD_ARGUMENT),
    }
}

fn take_text(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Option<String> {
    String::from_utf8(take(caller, ptr, len)?).ok()
}

fn linker(engine: &Engine) -> Result<Linker<HostState>, SdkError> {
    let mut linker = Linker::new(engine);
    let define = |e: wasmtime::Error| SdkError::Module(format!("cannot define host imports: {e}"));
    linker
        .func_wrap(
            abi::IMPORT_MODULE,
            abi::HOST_PUBLISH,
            |mut caller: Caller<'_, HostState>, stream: i32, ptr: i32, len: i32| -> i32 {
                let request = take(&mut caller, ptr, len).map(|payload| HostRequest::Publish {
                    stream: stream as u32,
                    payload,
                });
                record(&mut caller, request)
            },
        )
        .map_err(define)?;
    type Wrap = fn(String) -> HostRequest;
    for (name, wrap) in [
        (abi::HOST_QUERY, HostRequest::Query as Wrap),
        (abi::HOST_FOLLOW, HostRequest::Follow as Wrap),
    ] {
        linker
            .func_wrap(
                abi::IMPORT_MODULE,
                name,
                move |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> i32 {
                    let request = take_text(&mut caller, ptr, len).map(wrap);
                    record(&mut caller, request)
                },
            )
            .map_err(define)?;
    }
    linker
        .func_wrap(
            abi::IMPORT_MODULE,
            abi::HOST_ADMIN,
            |mut caller: Caller<'_, HostState>, op: i32, ptr: i32, len: i32| -> i32 {
                let request =
                    take_text(&mut caller, ptr, len).map(|arg| HostRequest::Admin { op, arg });
                record(&mut caller, request)
            },
        )
        .map_err(define)?;
    Ok(linker)
}

impl SdkModule {
    /// Instantiates a module whose bundle was already verified
    /// (`SdkBundle::open` and the device's own checks): native artifacts are
    /// machine code and must never be deserialized unverified.
    pub fn load(
        manifest: &Manifest,
        artifact: &[u8],
        limits: RuntimeLimits,
    ) -> Result<SdkModule, SdkError> {
        let engine = engine(manifest.target).map_err(SdkError::Module)?;
        let module = match manifest.target {
            Target::Wasm => Module::new(&engine, artifact)
                .map_err(|e| SdkError::Module(format!("SDK module does not compile: {e:#}")))?,
            target => {
                let own = compat_digest(&engine);
                if manifest.wasmtime_compat.as_deref() != Some(own.as_str()) {
                    return Err(SdkError::Verify(format!(
                        "{target} artifact was built for another wasmtime configuration \
                         (compat {:?}, this runtime {own})",
                        manifest.wasmtime_compat
                    )));
                }
                // SAFETY: the artifact's bytes are covered by the platform's
                // signature over the manifest (checked by the caller through
                // `SdkBundle::open`), and its compatibility digest matches
                // this engine; that is the precondition wasmtime documents.
                unsafe { Module::deserialize(&engine, artifact) }.map_err(|e| {
                    SdkError::Module(format!("{target} artifact does not load: {e:#}"))
                })?
            }
        };
        let state = HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.max_memory_bytes)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            requests: Vec::new(),
        };
        let mut store = Store::new(&engine, state);
        store.limiter(|state| &mut state.limits);
        store
            .set_fuel(limits.fuel_per_call)
            .map_err(|e| SdkError::Module(e.to_string()))?;
        let instance = linker(&engine)?
            .instantiate(&mut store, &module)
            .map_err(|e| trap("instantiating the SDK module", e))?;
        Self::bind(store, instance, limits)
    }

    fn bind(
        mut store: Store<HostState>,
        instance: Instance,
        limits: RuntimeLimits,
    ) -> Result<SdkModule, SdkError> {
        let missing = |name: &str| SdkError::Module(format!("SDK module lacks the export {name}"));
        let memory = instance
            .get_memory(&mut store, abi::MEMORY)
            .ok_or_else(|| missing(abi::MEMORY))?;
        let mut constant = |name: &str| -> Result<u32, SdkError> {
            let f = instance
                .get_typed_func::<(), i32>(&mut store, name)
                .map_err(|_| missing(name))?;
            f.call(&mut store, ())
                .map(|v| v as u32)
                .map_err(|e| trap(name, e))
        };
        let (schema_ptr, schema_len) = (constant(abi::SCHEMA_PTR)?, constant(abi::SCHEMA_LEN)?);
        let (input, text, text_cap, output) = (
            constant(abi::INPUT_PTR)?,
            constant(abi::TEXT_PTR)?,
            constant(abi::TEXT_CAP)?,
            constant(abi::OUTPUT_PTR)?,
        );
        let schema_bytes = memory
            .data(&store)
            .get(schema_ptr as usize..(schema_ptr as usize).saturating_add(schema_len as usize))
            .ok_or_else(|| SdkError::Module("schema lies outside the module's memory".into()))?;
        let schema: ModuleSchema = serde_json::from_slice(schema_bytes)
            .map_err(|e| SdkError::Module(format!("module schema is unreadable: {e}")))?;
        let encode = instance
            .get_typed_func(&mut store, abi::ENCODE)
            .map_err(|_| missing(abi::ENCODE))?;
        let publish = instance
            .get_typed_func(&mut store, abi::PUBLISH)
            .map_err(|_| missing(abi::PUBLISH))?;
        let query = instance.get_typed_func(&mut store, abi::QUERY).ok();
        let follow = instance.get_typed_func(&mut store, abi::FOLLOW).ok();
        let admin = instance.get_typed_func(&mut store, abi::ADMIN).ok();
        Ok(SdkModule {
            store,
            memory,
            schema,
            input,
            text,
            text_cap,
            output,
            encode,
            publish,
            query,
            follow,
            admin,
            limits,
        })
    }

    pub fn schema(&self) -> &ModuleSchema {
        &self.schema
    }

    pub fn can_query(&self) -> bool {
        self.query.is_some()
    }

    pub fn can_admin(&self) -> bool {
        self.admin.is_some()
    }

    fn refuel(&mut self) -> Result<(), SdkError> {
        self.store
            .set_fuel(self.limits.fuel_per_call)
            .map_err(|e| SdkError::Module(e.to_string()))
    }

    /// Fills the stream's input slots (and the text area) from `fields`.
    fn fill_slots(&mut self, stream: &str, fields: &[(&str, FieldValue)]) -> Result<i32, SdkError> {
        let (index, def) = self
            .schema
            .streams
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == stream)
            .ok_or_else(|| SdkError::Invalid(format!("this SDK has no stream {stream:?}")))?;
        let data = self.memory.data_mut(&mut self.store);
        let slots = self.input as usize;
        data[slots..slots + def.fields.len() * abi::SLOT_SIZE as usize].fill(0);
        let mut text_used = 0usize;
        for (name, value) in fields {
            let (slot_index, _, field) = def.fields.get_full(*name).ok_or_else(|| {
                // The binary record has a slot per declared field and no
                // room for others; the server keeps undeclared fields (in
                // `extra`) only from JSON records.
                let declared: Vec<&str> = def.fields.keys().map(String::as_str).collect();
                SdkError::Invalid(format!(
                    "stream {stream} declares no field {name:?} (declared: {}); SDK records carry declared fields only: declare it and fetch a new SDK",
                    declared.join(", ")
                ))
            })?;
            let slot = slots + slot_index * abi::SLOT_SIZE as usize;
            let value_bytes: [u8; 8] = match (field.ty, value) {
                (FieldType::Int | FieldType::Timestamp, FieldValue::Int(v)) => v.to_le_bytes(),
                (FieldType::Float, FieldValue::Float(v)) => v.to_le_bytes(),
                (FieldType::Float, FieldValue::Int(v)) => (*v as f64).to_le_bytes(),
                (FieldType::Bool, FieldValue::Bool(v)) => (*v as u64).to_le_bytes(),
                (FieldType::String | FieldType::Enum, FieldValue::Text(t)) => {
                    let at = self.text as usize + text_used;
                    if text_used + t.len() > self.text_cap as usize {
                        return Err(SdkError::Invalid(format!(
                            "{name}: the record's text exceeds the SDK's {} bytes",
                            self.text_cap
                        )));
                    }
                    data[at..at + t.len()].copy_from_slice(t.as_bytes());
                    text_used += t.len();
                    data[slot + 4..slot + 8].copy_from_slice(&(t.len() as u32).to_le_bytes());
                    (at as u64).to_le_bytes()
                }
                (ty, value) => {
                    return Err(SdkError::Invalid(format!(
                        "{name}: a {ty:?} field cannot hold {value:?}"
                    )))
                }
            };
            data[slot] = 1;
            data[slot + 8..slot + 16].copy_from_slice(&value_bytes);
        }
        Ok(index as i32)
    }

    fn explain(&self, stream: i32, result: i32) -> SdkError {
        let (field, reason) = error::split(result);
        let field_name = field.and_then(|f| {
            self.schema
                .streams
                .get(stream as usize)?
                .fields
                .get_index(f as usize)
                .map(|(name, _)| name.clone())
        });
        match field_name {
            Some(name) => SdkError::Invalid(format!("{name} {}", error::describe(reason))),
            None => SdkError::Invalid(error::describe(reason).to_string()),
        }
    }

    /// Validates and encodes one record inside the module; returns the
    /// binary record (`fleetgate_protocol::record`).
    pub fn encode(
        &mut self,
        stream: &str,
        fields: &[(&str, FieldValue)],
    ) -> Result<Vec<u8>, SdkError> {
        let index = self.fill_slots(stream, fields)?;
        self.refuel()?;
        let len = self
            .encode
            .call(&mut self.store, index)
            .map_err(|e| trap("encoding a record", e))?;
        if len < 0 {
            return Err(self.explain(index, len));
        }
        let start = self.output as usize;
        self.memory
            .data(&self.store)
            .get(start..start + len as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| SdkError::Module("encoded record lies outside memory".into()))
    }

    /// Has the module validate, encode and publish one record; returns the
    /// stream's name and the payload the module handed to the host.
    pub fn publish(
        &mut self,
        stream: &str,
        fields: &[(&str, FieldValue)],
    ) -> Result<(String, Vec<u8>), SdkError> {
        let index = self.fill_slots(stream, fields)?;
        self.refuel()?;
        self.store.data_mut().requests.clear();
        let result = self
            .publish
            .call(&mut self.store, index)
            .map_err(|e| trap("publishing a record", e))?;
        if result < 0 {
            return Err(self.explain(index, result));
        }
        match self.store.data_mut().requests.pop() {
            Some(HostRequest::Publish { stream: s, payload }) if s == index as u32 => {
                Ok((stream.to_string(), payload))
            }
            other => Err(SdkError::Module(format!(
                "fg_publish succeeded but handed the host {other:?}"
            ))),
        }
    }

    /// Passes text through one of the module's role-gated exports and
    /// returns what it asked the host to do.
    fn call_with_text(
        &mut self,
        export: &'static str,
        text: &str,
        op: Option<i32>,
    ) -> Result<HostRequest, SdkError> {
        if text.len() > self.text_cap as usize {
            return Err(SdkError::Invalid(format!(
                "{} bytes exceed the SDK's {}-byte text area",
                text.len(),
                self.text_cap
            )));
        }
        let at = self.text as usize;
        self.memory.data_mut(&mut self.store)[at..at + text.len()].copy_from_slice(text.as_bytes());
        self.refuel()?;
        self.store.data_mut().requests.clear();
        let (ptr, len) = (self.text as i32, text.len() as i32);
        let not_in_role = || SdkError::NotInRole(format!("this SDK's role cannot {export}"));
        let result = match (export, op) {
            (abi::QUERY, _) => self
                .query
                .as_ref()
                .ok_or_else(not_in_role)?
                .call(&mut self.store, (ptr, len)),
            (abi::FOLLOW, _) => self
                .follow
                .as_ref()
                .ok_or_else(not_in_role)?
                .call(&mut self.store, (ptr, len)),
            (abi::ADMIN, Some(op)) => self
                .admin
                .as_ref()
                .ok_or_else(not_in_role)?
                .call(&mut self.store, (op, ptr, len)),
            _ => return Err(not_in_role()),
        }
        .map_err(|e| trap(export, e))?;
        if result < 0 {
            return Err(self.explain(-1, result));
        }
        self.store
            .data_mut()
            .requests
            .pop()
            .ok_or_else(|| SdkError::Module(format!("{export} asked the host for nothing")))
    }

    pub fn query(&mut self, sql: &str) -> Result<HostRequest, SdkError> {
        self.call_with_text(abi::QUERY, sql, None)
    }

    pub fn follow(&mut self, filter: &str) -> Result<HostRequest, SdkError> {
        self.call_with_text(abi::FOLLOW, filter, None)
    }

    pub fn admin(&mut self, op: i32, arg: &str) -> Result<HostRequest, SdkError> {
        self.call_with_text(abi::ADMIN, arg, Some(op))
    }
}
