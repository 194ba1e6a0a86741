//! Policy components written inline in WAT, so host tests need no guest
//! toolchain. `fixtures/policy-component.wat.in` is the component wrapper
//! for the `sluice:policy@0.1.0` world (types, canonical lifts, the `log`
//! import) that `wasm-tools component new` produces; each policy below is
//! only the core module it wraps.
//!
//! Canonical-ABI layout used by the core modules: a `decision` is returned
//! through a pointer to 32 bytes — admit (ptr, len) at +0/+4, reject
//! (ptr, len) at +8/+12, `wake-after-us` discriminant at +16, value at +24.
//! A reject entry is 16 bytes: the id at +0, the reason (ptr, len) at +8/+12.
#![allow(dead_code, unreachable_pub)]

const WRAPPER: &str = include_str!("../fixtures/policy-component.wat.in");

/// Wraps a core module body (functions after the common prelude) into the component.
fn component(on_arrival_body: &str, extra: &str) -> String {
    let core = format!(
        r#"(core module $main (;0;)
    (import "$root" "log" (func $log (param i32 i32 i32)))
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 8192))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.sub (local.get 2) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    ;; init: ok("") — a zeroed result at 0x300.
    (func (export "sluice:policy/policy@0.1.0#init") (param i32 i32) (result i32)
      (i32.const 0x300))
    (func (export "sluice:policy/policy@0.1.0#on-arrival")
      (param $now i64) (param $in-flight i32) (param $queued i32) (param $id i64)
      (param i32 i32 i32 i32 i32 i32 i32 i64 i32 i64) (result i32)
      {on_arrival_body})
    ;; Every other event: the empty decision (zeros at 0x300).
    (func (export "sluice:policy/policy@0.1.0#on-completion")
      (param i64 i32 i32 i64 i32 i64 i64 i64 i32 i32) (result i32)
      (i32.const 0x300))
    (func (export "sluice:policy/policy@0.1.0#on-cancel") (param i64 i32 i32 i64) (result i32)
      (i32.const 0x300))
    (func (export "sluice:policy/policy@0.1.0#on-tick") (param i64 i32 i32) (result i32)
      (i32.const 0x300))
    {extra}
  )"#
    );
    WRAPPER.replace("{CORE}", &core)
}

/// Admits `ids` (given as WAT i64 expressions) in a decision at 0x100.
fn admit(ids: &[&str]) -> String {
    let mut body = String::new();
    for (i, id) in ids.iter().enumerate() {
        body.push_str(&format!("(i64.store (i32.const {}) {id})\n", 0x200 + 8 * i));
    }
    body.push_str(&format!(
        "(i32.store (i32.const 0x100) (i32.const 0x200))
         (i32.store (i32.const 0x104) (i32.const {}))
         (i32.const 0x100)",
        ids.len()
    ));
    body
}

/// Admits every arrival at once (a well-behaved pass-through policy).
pub fn admit_each() -> String {
    component(&admit(&["(local.get $id)"]), "")
}

/// Rejects every arrival with the reason "too busy".
pub fn rejects_each() -> String {
    component(
        "(i64.store (i32.const 0x200) (local.get $id))
         (i32.store (i32.const 0x208) (i32.const 0x500))
         (i32.store (i32.const 0x20c) (i32.const 8))
         (i32.store (i32.const 0x108) (i32.const 0x200))
         (i32.store (i32.const 0x10c) (i32.const 1))
         (i32.const 0x100)",
        r#"(data (i32.const 0x500) "too busy")"#,
    )
}

/// Never admits anything (requests stay queued until they time out or leave).
pub fn hold_all() -> String {
    component("(i32.const 0x300)", "")
}

/// Traps on the first arrival.
pub fn traps() -> String {
    component("unreachable", "")
}

/// Loops forever on the first arrival (caught by the epoch deadline).
pub fn loops_forever() -> String {
    component("(loop $spin (br $spin)) (i32.const 0x300)", "")
}

/// Grows its memory without bound on the first arrival (caught by the memory limit).
pub fn grows_memory() -> String {
    component(
        "(loop $grow (drop (memory.grow (i32.const 16))) (br $grow)) (i32.const 0x300)",
        "",
    )
}

/// Admits an id that was never queued.
pub fn admits_unknown_id() -> String {
    component(
        &admit(&["(i64.add (local.get $id) (i64.const 1000000))"]),
        "",
    )
}

/// Admits the arriving id twice in one decision.
pub fn admits_twice() -> String {
    component(&admit(&["(local.get $id)", "(local.get $id)"]), "")
}

/// `init` refuses its configuration with err("unknown key `x`").
pub fn rejects_config() -> String {
    let wat = component(
        &admit(&["(local.get $id)"]),
        r#"(data (i32.const 0x500) "unknown key `x`")"#,
    );
    // Replace init's answer with the error result at 0x400: discriminant 1, ptr, len.
    wat.replace(
        "(func (export \"sluice:policy/policy@0.1.0#init\") (param i32 i32) (result i32)\n      (i32.const 0x300))",
        "(func (export \"sluice:policy/policy@0.1.0#init\") (param i32 i32) (result i32)
      (i32.store8 (i32.const 0x400) (i32.const 1))
      (i32.store (i32.const 0x404) (i32.const 0x500))
      (i32.store (i32.const 0x408) (i32.const 15))
      (i32.const 0x400))",
    )
}

/// Admits every arrival; `init` describes it as "admits each arrival".
pub fn admit_each_described() -> String {
    let wat = component(
        &admit(&["(local.get $id)"]),
        r#"(data (i32.const 0x500) "admits each arrival")"#,
    );
    // init's answer: the ok result at 0x400: discriminant 0, ptr, len.
    wat.replace(
        "(func (export \"sluice:policy/policy@0.1.0#init\") (param i32 i32) (result i32)\n      (i32.const 0x300))",
        "(func (export \"sluice:policy/policy@0.1.0#init\") (param i32 i32) (result i32)
      (i32.store (i32.const 0x404) (i32.const 0x500))
      (i32.store (i32.const 0x408) (i32.const 19))
      (i32.const 0x400))",
    )
}

/// Writes a policy to a temporary `.wat` file and returns its path.
pub fn write(name: &str, wat: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-policies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.wat"));
    std::fs::write(&path, wat).unwrap();
    path
}
