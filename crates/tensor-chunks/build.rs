//! Compiles the wire contract, proto/minibatch/v1/minibatch.proto, into the
//! message types (prost) and the constants the clients and the server share:
//! every method's path and the field number of `TensorChunk.data`. The
//! .proto is the one definition; nothing here is written by hand.
//!
//! protox is a pure-Rust protobuf compiler, so no `protoc` is needed (the
//! daemon's build.rs does the same). The .proto is reached as
//! `../../proto` from this crate, which holds both for the daemon's
//! workspace and for the Python client's native transport, built by maturin
//! from clients/python/native with this crate as a path dependency.
use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = "minibatch/v1/minibatch.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let fds = protox::compile([file], [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut consts = String::new();
    for f in &fds.file {
        let package = f.package();
        for s in &f.service {
            let service = format!("{package}.{}", s.name());
            writeln!(
                consts,
                "/// The service's full name, `{service}` (health checks name it).\n\
                 pub const {}: &str = {service:?};",
                screaming(s.name())
            )?;
            for m in &s.method {
                let path = format!("/{service}/{}", m.name());
                writeln!(
                    consts,
                    "/// HTTP/2 path of `{service}.{}`.\npub const {}: &str = {path:?};",
                    m.name(),
                    screaming(m.name())
                )?;
            }
        }
        for m in f.message_type.iter().filter(|m| m.name() == "TensorChunk") {
            for field in m.field.iter().filter(|x| x.name() == "data") {
                writeln!(
                    consts,
                    "/// Field number of `TensorChunk.data`, the tensor bytes (a server\n\
                     /// that frames `data` by hand writes this key).\n\
                     pub const DATA_FIELD: u32 = {};",
                    field.number()
                )?;
            }
        }
    }
    if !consts.contains("DATA_FIELD") || !consts.contains("GET_BATCH") {
        return Err(format!("{file} lacks TensorChunk.data or GetBatch").into());
    }
    std::fs::write(out.join("contract.rs"), consts)?;

    prost_build::Config::new()
        // Zero-copy: a chunk's `data` decodes as a slice of the received
        // buffer (a `Bytes`), not a copy into a Vec.
        .bytes([".minibatch.v1.TensorChunk.data"])
        .compile_fds(fds)?;
    Ok(())
}

/// `GetBatch` → `GET_BATCH`.
fn screaming(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
    }
    s
}
