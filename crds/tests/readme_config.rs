//! The README's configuration reference parses as a sidecar config (so it stays true).

use geoforge_crds::config::SidecarConfig;

#[test]
fn readme_config_reference_parses() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("section in README");
    let yaml = section
        .split("```yaml")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("yaml block");
    let key = geoforge_crds::auth::generate_key().public_key;
    let yaml = yaml.replace("<43-char base64url>", &key);
    let cfg = SidecarConfig::from_yaml(&yaml, "README.md").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.site_id, "tokyo");
    assert_eq!(cfg.replicables.len(), 2);
    assert_eq!(
        cfg.proxy.pool_idle_timeout,
        std::time::Duration::from_secs(20)
    );
    // the block says "defaults shown"
    assert_eq!(cfg.proxy, geoforge_crds::config::ProxyTuning::default());
    assert_eq!(cfg.proxy.yield_every, 4);
}
