//! Links with the workspace's `link.ld` and relinks when it changes.
/// Prints the link arguments (also called by the tests crate's build script).
pub fn main() {
    let ld = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../link.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg=-T{}", ld.display());
        println!("cargo:rustc-link-arg=--undefined=_start");
    }
}
