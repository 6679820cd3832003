//! Compiles `proto/csi/v1/csi.proto` with the vendored protoc, so a fresh clone
//! builds with cargo alone (no system protoc). The well-known types it imports
//! (Timestamp, BoolValue, Int64Value) map to `prost_types`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; setting it here affects only this build script.
    std::env::set_var("PROTOC", protoc);
    // `google/protobuf/*.proto`, shipped with the vendored protoc.
    let well_known = protoc_bin_vendored::include_path()?;

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("csi/v1/csi.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &[root, well_known])?;
    Ok(())
}
