//! Compiles proto/trireme/v1 with protox, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let fds = protox::compile(
        [
            "trireme/v1/volume.proto",
            "trireme/v1/node.proto",
            "trireme/v1/peer.proto",
            "trireme/v1/fault.proto",
        ],
        ["../../proto"],
    )?;
    // Payload fields become `bytes::Bytes`: a 1 MiB write is handed from
    // the NBD socket to the Raft entry and over the peer stream without a copy.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
