//! Generates a role's WebAssembly module with `wasm-encoder`.
//!
//! The module carries its streams as data (schema JSON at the start of
//! memory, then field names and enum members) and, per stream, a generated
//! function that checks each field against its declaration and writes the
//! binary record (`fleetgate_protocol::record`). What the role may do beyond
//! that is decided here, by which imports and exports are emitted at all:
//!
//! | role    | imports                      | exports beyond the common ones |
//! |---------|------------------------------|--------------------------------|
//! | ingest  | publish                      | fg_encode, fg_publish          |
//! | extract | publish, query, follow       | + fg_query, fg_follow          |
//! | admin   | publish, query, follow, admin| + fg_admin                     |

use fleetgate_protocol::record::{MAGIC, TAG_BOOL, TAG_FLOAT, TAG_INT, TAG_TEXT};
use fleetgate_protocol::schema::{FieldDef, FieldType};
use fleetgate_protocol::sdk::abi::{self, error, ModuleSchema};
use fleetgate_protocol::Role;
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection,
    Function, FunctionSection, ImportSection, InstructionSink, MemArg, MemorySection, MemoryType,
    Module, TypeSection, ValType,
};

/// Bytes of text a device can pass in one call (field values, SQL, filters).
pub const TEXT_CAP: u32 = 16 * 1024;
/// Bytes of encoded record; enough for every field at its largest.
const OUTPUT_CAP: u32 = 2 * TEXT_CAP;
const PAGE: u32 = 64 * 1024;

// Function type indices.
const T_CONST: u32 = 0; // () -> i32
const T_STREAM: u32 = 1; // (i32) -> i32
const T_TEXT: u32 = 2; // (i32, i32) -> i32
const T_THREE: u32 = 3; // (i32, i32, i32) -> i32

/// Bytes in the data segment: (offset, length).
type Span = (u32, u32);

/// A field's name and enum members, as placed in the data segment.
struct PlacedField {
    name: Span,
    members: Vec<Span>,
}

/// Where things live in the module's memory.
struct Layout {
    schema: Span,
    /// Per stream, per field.
    fields: Vec<Vec<PlacedField>>,
    input: u32,
    text: u32,
    output: u32,
    pages: u64,
    data: Vec<u8>,
}

fn layout(schema: &ModuleSchema) -> Layout {
    let mut data = serde_json::to_vec(schema).expect("schema serializes");
    let schema_span = (0, data.len() as u32);
    let mut place = |bytes: &[u8]| {
        let at = data.len() as u32;
        data.extend_from_slice(bytes);
        (at, bytes.len() as u32)
    };
    let fields = schema
        .streams
        .iter()
        .map(|stream| {
            stream
                .fields
                .iter()
                .map(|(name, def)| PlacedField {
                    name: place(name.as_bytes()),
                    members: def
                        .values
                        .iter()
                        .flatten()
                        .map(|v| place(v.as_bytes()))
                        .collect(),
                })
                .collect()
        })
        .collect();
    let input = (data.len() as u32).next_multiple_of(16);
    let text = input + abi::MAX_FIELDS * abi::SLOT_SIZE;
    let output = text + TEXT_CAP;
    let end = output + OUTPUT_CAP;
    Layout {
        schema: schema_span,
        fields,
        input,
        text,
        output,
        pages: end.div_ceil(PAGE) as u64,
        data,
    }
}

fn mem(offset: u32) -> MemArg {
    MemArg {
        offset: offset as u64,
        align: 0,
        memory_index: 0,
    }
}

/// A module for `role` that encodes `schema`'s streams. Streams with more
/// than [`abi::MAX_FIELDS`] fields must be left out by the caller.
pub fn generate(role: Role, schema: &ModuleSchema) -> Vec<u8> {
    let layout = layout(schema);
    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    types.ty().function([ValType::I32], [ValType::I32]);
    types
        .ty()
        .function([ValType::I32, ValType::I32], [ValType::I32]);
    types
        .ty()
        .function([ValType::I32, ValType::I32, ValType::I32], [ValType::I32]);

    let mut imports = ImportSection::new();
    let mut import = |name: &str, ty: u32| {
        imports.import(abi::IMPORT_MODULE, name, EntityType::Function(ty));
    };
    import(abi::HOST_PUBLISH, T_THREE);
    let extract = role.allows(Role::Extract);
    let admin = role.allows(Role::Admin);
    if extract {
        import(abi::HOST_QUERY, T_TEXT);
        import(abi::HOST_FOLLOW, T_TEXT);
    }
    if admin {
        import(abi::HOST_ADMIN, T_THREE);
    }
    let import_count = 1 + 2 * extract as u32 + admin as u32;
    let (host_publish, host_query, host_follow, host_admin) = (0, 1, 2, 3);

    let mut functions = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut exports = ExportSection::new();
    exports.export(abi::MEMORY, ExportKind::Memory, 0);
    let mut next = import_count;
    let mut add = |ty: u32, body: Function, export: Option<&str>| {
        functions.function(ty);
        code.function(&body);
        if let Some(name) = export {
            exports.export(name, ExportKind::Func, next);
        }
        next += 1;
        next - 1
    };

    for (name, value) in [
        (abi::SCHEMA_PTR, layout.schema.0),
        (abi::SCHEMA_LEN, layout.schema.1),
        (abi::INPUT_PTR, layout.input),
        (abi::TEXT_PTR, layout.text),
        (abi::TEXT_CAP, TEXT_CAP),
        (abi::OUTPUT_PTR, layout.output),
    ] {
        let mut f = Function::new([]);
        f.instructions().i32_const(value as i32).end();
        add(T_CONST, f, Some(name));
    }
    let bytes_eq = add(T_THREE, bytes_eq_function(), None);
    let encoders: Vec<u32> = schema
        .streams
        .iter()
        .enumerate()
        .map(|(s, stream)| {
            let body =
                encode_function(&layout, &layout.fields[s], stream.fields.values(), bytes_eq);
            add(T_CONST, body, None)
        })
        .collect();
    let encode = add(T_STREAM, dispatch_function(&encoders), Some(abi::ENCODE));
    add(
        T_STREAM,
        publish_function(encode, host_publish, layout.output),
        Some(abi::PUBLISH),
    );
    if extract {
        add(
            T_TEXT,
            pass_text_function(&layout, host_query),
            Some(abi::QUERY),
        );
        add(
            T_TEXT,
            pass_text_function(&layout, host_follow),
            Some(abi::FOLLOW),
        );
    }
    if admin {
        add(
            T_THREE,
            admin_function(&layout, host_admin),
            Some(abi::ADMIN),
        );
    }

    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: layout.pages,
        maximum: Some(layout.pages),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut data = DataSection::new();
    data.active(0, &ConstExpr::i32_const(0), layout.data.iter().copied());

    let mut module = Module::new();
    module
        .section(&types)
        .section(&imports)
        .section(&functions)
        .section(&memories)
        .section(&exports)
        .section(&code)
        .section(&data);
    module.finish()
}

/// `(a, b, n) -> i32`: 1 when the n bytes at a and b are equal.
fn bytes_eq_function() -> Function {
    let (a, b, n, i) = (0, 1, 2, 3);
    let mut f = Function::new([(1, ValType::I32)]);
    f.instructions()
        .block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(i)
        .local_get(n)
        .i32_ge_u()
        .br_if(1)
        .local_get(a)
        .local_get(i)
        .i32_add()
        .i32_load8_u(mem(0))
        .local_get(b)
        .local_get(i)
        .i32_add()
        .i32_load8_u(mem(0))
        .i32_ne()
        .if_(BlockType::Empty)
        .i32_const(0)
        .return_()
        .end()
        .local_get(i)
        .i32_const(1)
        .i32_add()
        .local_set(i)
        .br(0)
        .end()
        .end()
        .i32_const(1)
        .end();
    f
}

// Locals of an encoder function.
const OUT: u32 = 0;
const COUNT: u32 = 1;
const INT: u32 = 2;
const FLOAT: u32 = 3;
const PTR: u32 = 4;
const LEN: u32 = 5;
const I: u32 = 6;

fn fail(sink: &mut InstructionSink<'_>, field: usize, reason: i32) {
    sink.i32_const(error::code(field as u32, reason)).return_();
}

/// Fails with TOO_LONG unless `need` (on the stack) bytes fit in the output.
fn check_room(sink: &mut InstructionSink<'_>, layout: &Layout, field: usize) {
    sink.i32_const((layout.output + OUTPUT_CAP) as i32)
        .local_get(OUT)
        .i32_sub()
        .i32_gt_u()
        .if_(BlockType::Empty);
    fail(sink, field, error::TOO_LONG);
    sink.end();
}

fn bound_checks(sink: &mut InstructionSink<'_>, def: &FieldDef, field: usize) {
    if let Some(min) = def.min {
        sink.local_get(FLOAT)
            .f64_const(min.into())
            .f64_lt()
            .if_(BlockType::Empty);
        fail(sink, field, error::BELOW_MIN);
        sink.end();
    }
    if let Some(max) = def.max {
        sink.local_get(FLOAT)
            .f64_const(max.into())
            .f64_gt()
            .if_(BlockType::Empty);
        fail(sink, field, error::ABOVE_MAX);
        sink.end();
    }
}

/// One stream's encoder: every check the store makes on a field, then the
/// field's bytes, in declaration order; returns the record's length.
fn encode_function<'a>(
    layout: &Layout,
    placed: &[PlacedField],
    fields: impl Iterator<Item = &'a FieldDef>,
    bytes_eq: u32,
) -> Function {
    let mut f = Function::new_with_locals_types([
        ValType::I32,
        ValType::I32,
        ValType::I64,
        ValType::F64,
        ValType::I32,
        ValType::I32,
        ValType::I32,
    ]);
    let mut sink = f.instructions();
    sink.i32_const((layout.output + 5) as i32)
        .local_set(OUT)
        .i32_const(0)
        .local_set(COUNT);
    for (k, def) in fields.enumerate() {
        let slot = layout.input + k as u32 * abi::SLOT_SIZE;
        let PlacedField {
            name: (name_at, name_len),
            members,
        } = &placed[k];
        sink.i32_const(0)
            .i32_load8_u(mem(slot))
            .i32_eqz()
            .if_(BlockType::Empty);
        if def.required {
            fail(&mut sink, k, error::MISSING);
        }
        sink.else_();
        // Checks.
        match def.ty {
            FieldType::Int | FieldType::Timestamp => {
                sink.i32_const(0).i64_load(mem(slot + 8)).local_set(INT);
                if def.ty == FieldType::Int {
                    sink.local_get(INT).f64_convert_i64_s().local_set(FLOAT);
                    bound_checks(&mut sink, def, k);
                }
            }
            FieldType::Float => {
                sink.i32_const(0).f64_load(mem(slot + 8)).local_set(FLOAT);
                // x - x is 0 for every finite x, NaN for NaN and ±inf.
                sink.local_get(FLOAT)
                    .local_get(FLOAT)
                    .f64_sub()
                    .f64_const(0.0.into())
                    .f64_ne()
                    .if_(BlockType::Empty);
                fail(&mut sink, k, error::NOT_FINITE);
                sink.end();
                bound_checks(&mut sink, def, k);
            }
            FieldType::Bool => {}
            FieldType::String | FieldType::Enum => {
                text_checks(&mut sink, layout, slot, k);
                if def.ty == FieldType::Enum {
                    enum_check(&mut sink, members, k, bytes_eq);
                }
            }
        }
        // Name.
        let fixed = 2 + name_len + 4;
        sink.i32_const(fixed as i32);
        if matches!(def.ty, FieldType::String | FieldType::Enum) {
            sink.local_get(LEN).i32_add();
        } else {
            sink.i32_const(8).i32_add();
        }
        check_room(&mut sink, layout, k);
        sink.local_get(OUT)
            .i32_const(*name_len as i32)
            .i32_store8(mem(0))
            .local_get(OUT)
            .i32_const(1)
            .i32_add()
            .i32_const(*name_at as i32)
            .i32_const(*name_len as i32)
            .memory_copy(0, 0)
            .local_get(OUT)
            .i32_const(1 + *name_len as i32)
            .i32_add()
            .local_set(OUT);
        // Tag and value.
        let tag = match def.ty {
            FieldType::Int | FieldType::Timestamp => TAG_INT,
            FieldType::Float => TAG_FLOAT,
            FieldType::Bool => TAG_BOOL,
            FieldType::String | FieldType::Enum => TAG_TEXT,
        };
        sink.local_get(OUT).i32_const(tag as i32).i32_store8(mem(0));
        let advance = match def.ty {
            FieldType::Int | FieldType::Timestamp => {
                sink.local_get(OUT).local_get(INT).i64_store(mem(1));
                9
            }
            FieldType::Float => {
                sink.local_get(OUT).local_get(FLOAT).f64_store(mem(1));
                9
            }
            FieldType::Bool => {
                sink.local_get(OUT)
                    .i32_const(0)
                    .i32_load8_u(mem(slot + 8))
                    .i32_const(0)
                    .i32_ne()
                    .i32_store8(mem(1));
                2
            }
            FieldType::String | FieldType::Enum => {
                sink.local_get(OUT)
                    .local_get(LEN)
                    .i32_store(mem(1))
                    .local_get(OUT)
                    .i32_const(5)
                    .i32_add()
                    .local_get(PTR)
                    .local_get(LEN)
                    .memory_copy(0, 0)
                    .local_get(OUT)
                    .local_get(LEN)
                    .i32_add()
                    .local_set(OUT);
                5
            }
        };
        sink.local_get(OUT)
            .i32_const(advance)
            .i32_add()
            .local_set(OUT)
            .local_get(COUNT)
            .i32_const(1)
            .i32_add()
            .local_set(COUNT)
            .end();
    }
    sink.i32_const(layout.output as i32)
        .i32_const(i32::from_le_bytes(*MAGIC))
        .i32_store(mem(0))
        .i32_const(layout.output as i32)
        .local_get(COUNT)
        .i32_store8(mem(4))
        .local_get(OUT)
        .i32_const(layout.output as i32)
        .i32_sub()
        .end();
    f
}

/// Loads the text's address and length, and fails unless it lies inside
/// the text area and holds no NUL (PostgreSQL cannot store one).
fn text_checks(sink: &mut InstructionSink<'_>, layout: &Layout, slot: u32, field: usize) {
    sink.i32_const(0)
        .i32_load(mem(slot + 4))
        .local_set(LEN)
        .i32_const(0)
        .i32_load(mem(slot + 8))
        .local_set(PTR);
    // Unsigned: an address below the text area wraps to a huge offset.
    sink.local_get(PTR)
        .i32_const(layout.text as i32)
        .i32_sub()
        .i32_const(TEXT_CAP as i32)
        .i32_gt_u()
        .local_get(LEN)
        .i32_const(TEXT_CAP as i32)
        .local_get(PTR)
        .i32_const(layout.text as i32)
        .i32_sub()
        .i32_sub()
        .i32_gt_u()
        .i32_or()
        .if_(BlockType::Empty);
    fail(sink, field, error::TOO_LONG);
    sink.end();
    sink.i32_const(0)
        .local_set(I)
        .block(BlockType::Empty)
        .loop_(BlockType::Empty)
        .local_get(I)
        .local_get(LEN)
        .i32_ge_u()
        .br_if(1)
        .local_get(PTR)
        .local_get(I)
        .i32_add()
        .i32_load8_u(mem(0))
        .i32_eqz()
        .if_(BlockType::Empty);
    fail(sink, field, error::NUL_IN_TEXT);
    sink.end()
        .local_get(I)
        .i32_const(1)
        .i32_add()
        .local_set(I)
        .br(0)
        .end()
        .end();
}

fn enum_check(sink: &mut InstructionSink<'_>, members: &[Span], field: usize, bytes_eq: u32) {
    sink.block(BlockType::Empty);
    for (at, len) in members {
        sink.local_get(LEN)
            .i32_const(*len as i32)
            .i32_eq()
            .if_(BlockType::Empty)
            .local_get(PTR)
            .i32_const(*at as i32)
            .local_get(LEN)
            .call(bytes_eq)
            .br_if(1)
            .end();
    }
    fail(sink, field, error::NOT_IN_ENUM);
    sink.end();
}

/// `fg_encode(stream)`: calls that stream's encoder.
fn dispatch_function(encoders: &[u32]) -> Function {
    let mut f = Function::new([]);
    let mut sink = f.instructions();
    for (index, encoder) in encoders.iter().enumerate() {
        sink.local_get(0)
            .i32_const(index as i32)
            .i32_eq()
            .if_(BlockType::Empty)
            .call(*encoder)
            .return_()
            .end();
    }
    sink.i32_const(error::whole(error::UNKNOWN_STREAM)).end();
    f
}

/// `fg_publish(stream)`: encode, then hand the record to the host.
fn publish_function(encode: u32, host_publish: u32, output: u32) -> Function {
    let len = 1;
    let mut f = Function::new([(1, ValType::I32)]);
    f.instructions()
        .local_get(0)
        .call(encode)
        .local_tee(len)
        .i32_const(0)
        .i32_lt_s()
        .if_(BlockType::Empty)
        .local_get(len)
        .return_()
        .end()
        .local_get(0)
        .i32_const(output as i32)
        .local_get(len)
        .call(host_publish)
        .end();
    f
}

/// Pushes `ptr_local, len_local` checked to lie inside the text area, or
/// returns BAD_ARGUMENT.
fn checked_text(sink: &mut InstructionSink<'_>, layout: &Layout, ptr: u32, len: u32) {
    sink.local_get(len)
        .i32_eqz()
        .local_get(ptr)
        .i32_const(layout.text as i32)
        .i32_ne()
        .i32_or()
        .local_get(len)
        .i32_const(TEXT_CAP as i32)
        .i32_gt_u()
        .i32_or()
        .if_(BlockType::Empty)
        .i32_const(error::whole(error::BAD_ARGUMENT))
        .return_()
        .end()
        .local_get(ptr)
        .local_get(len);
}

/// `fg_query` / `fg_follow`: non-empty text from the text area, to the host.
fn pass_text_function(layout: &Layout, host: u32) -> Function {
    let mut f = Function::new([]);
    let mut sink = f.instructions();
    checked_text(&mut sink, layout, 0, 1);
    sink.call(host).end();
    f
}

/// `fg_admin(op, ptr, len)`: one of the known operations, to the host.
fn admin_function(layout: &Layout, host: u32) -> Function {
    let mut f = Function::new([]);
    let mut sink = f.instructions();
    sink.local_get(0)
        .i32_const(abi::ADMIN_REVOKE)
        .i32_lt_s()
        .local_get(0)
        .i32_const(abi::ADMIN_ROLE_ADMIN)
        .i32_gt_s()
        .i32_or()
        .if_(BlockType::Empty)
        .i32_const(error::whole(error::BAD_ARGUMENT))
        .return_()
        .end()
        .local_get(0);
    checked_text(&mut sink, layout, 1, 2);
    sink.call(host).end();
    f
}
