// Compiles proto/meshflow.proto with protox (a Rust protobuf compiler), so building needs no
// `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/meshflow.proto");
    let descriptors = protox::compile(["proto/meshflow.proto"], ["proto"])?;
    tonic_build::configure().compile_fds(descriptors)?;
    Ok(())
}
