//! Compiles `proto/nencache/v1/*.proto` with the protoc shipped in `protoc-bin-vendored`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC; a build script is the one place that sets it.
    #[expect(
        clippy::disallowed_methods,
        reason = "build scripts configure prost through env"
    )]
    // SAFETY: the build script is single-threaded, so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{root}/nencache/v1/agent.proto");
    println!("cargo:rerun-if-changed={file}");
    tonic_prost_build::configure().compile_protos(&[file.as_str()], &[root])?;
    Ok(())
}
