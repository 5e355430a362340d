//! The headless Service (stable pod DNS for the StatefulSet and the status reads) and the
//! client Service (client-IP session affinity on secondaries, so a client's `info/refs` and
//! `POST` reach the same instance).

use super::{
    ADMIN_PORT, SERVICE_PORT, client_service_name, headless_service_name, owned_meta,
    selector_labels,
};
use geoforge_crds::GeoSite;
use geoforge_crds::geosite::SiteRole;
use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// `<site>-geo-headless`: both ports, addresses published before readiness so the operator
/// can read the status of a starting pod.
pub fn headless_service(site: &GeoSite) -> Service {
    let name = site.name_any();
    Service {
        metadata: owned_meta(site, headless_service_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![port("http", SERVICE_PORT), port("admin", ADMIN_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// `<site>-geo`: the service port only (the admin port is never exposed beyond the pods).
pub fn client_service(site: &GeoSite) -> Service {
    let name = site.name_any();
    let sticky = site.spec.role == SiteRole::Secondary;
    Service {
        metadata: owned_meta(site, client_service_name(&name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("http", SERVICE_PORT)]),
            session_affinity: Some(if sticky { "ClientIP" } else { "None" }.into()),
            session_affinity_config: sticky.then_some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(3 * 3600),
                }),
            }),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testdata::*;

    #[test]
    fn golden_services() {
        assert_golden(
            "service-headless-tokyo",
            &serde_json::to_value(headless_service(&tokyo())).unwrap(),
        );
        assert_golden(
            "service-client-tokyo",
            &serde_json::to_value(client_service(&tokyo())).unwrap(),
        );
        assert_golden(
            "service-client-paris",
            &serde_json::to_value(client_service(&paris())).unwrap(),
        );
    }

    #[test]
    fn affinity_only_for_secondaries_and_owned() {
        let s = client_service(&tokyo());
        assert_eq!(
            s.spec.unwrap().session_affinity.as_deref(),
            Some("ClientIP")
        );
        let p = client_service(&paris());
        assert_eq!(
            p.spec.as_ref().unwrap().session_affinity.as_deref(),
            Some("None")
        );
        let owner = &p.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.uid, "uid-paris");
        let h = headless_service(&paris());
        assert_eq!(h.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    }
}
