//! Compiles every proto under `proto/` with protox (no system `protoc`) and
//! writes the descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "bridle/sandbox/v1/agent.proto",
    "bridle/control/v1/sandboxes.proto",
    "bridle/control/v1/admin.proto",
    "bridle/control/v1/runs.proto",
    "bridle/control/v1/audit.proto",
    "bridle/control/v1/approvals.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("bridle_descriptor.bin");

    let descriptors = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .skip_protoc_run()
        .file_descriptor_set_path(&descriptor_path)
        .bytes(".bridle")
        .compile_protos(PROTOS, &["proto"])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
