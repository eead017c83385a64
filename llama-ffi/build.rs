fn main() {
    // cargo never sets a SONAME; C programs linking libllama.so should record the major version.
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libllama.so.{major}");
        // Only the `llama_*` API is exported: rustc exports every `#[no_mangle]` function of
        // every crate linked in (llguidance's `llg_*` C API among them), which would clash with
        // a host that links llguidance itself. Symbols from the dependencies' archives (every
        // crate but this one) stay local. tests/c/run.sh checks the export list.
        println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs=ALL");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
