//! Compiles the wire contract with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs no `protoc`. The encoded descriptor set is also written
//! to OUT_DIR for gRPC server reflection.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/minibatch/v1/minibatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("minibatch_descriptor.bin"), fds.encode_to_vec())?;
    // No generated server: routes.rs serves BatchService itself (it frames
    // tensor bytes without copying them); clients and tests use the client.
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".minibatch.v1.TensorChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
