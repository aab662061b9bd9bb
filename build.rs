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
    // routes.rs serves BatchService itself (it frames tensor bytes without
    // copying them); the generated server is for tests' hostile servers.
    // The messages themselves are crates/tensor-chunks' (one generated
    // definition for the server and both clients); only the gRPC service
    // code is generated here.
    tonic_prost_build::configure()
        .extern_path(".minibatch.v1", "::tensor_chunks::proto")
        .compile_fds(fds)?;
    Ok(())
}
