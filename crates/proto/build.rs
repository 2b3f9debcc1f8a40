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
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
