//! Compiles `proto/cairn/v1/*.proto` with the vendored protoc, so a fresh clone
//! builds with cargo alone (no system protoc).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; setting it here affects only this build script.
    std::env::set_var("PROTOC", protoc);

    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("cairn/v1/meta.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&files, &[root])?;
    Ok(())
}
