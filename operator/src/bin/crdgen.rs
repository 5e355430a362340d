//! Writes the CRD manifests to `crds/*.yaml` (or the directory given as the first argument).

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../crds").to_string());
    for (name, yaml) in geoforge_crds::crd_manifests() {
        let path = std::path::Path::new(&dir).join(name);
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
        println!("wrote {}", path.display());
    }
}
