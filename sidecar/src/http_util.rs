//! Small HTTP helpers shared by the routes: error bodies in the client's language, the
//! `Geo-Api-Version` header.

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

pub type Resp = Response<Body>;

/// Whether the client asked for JSON.
pub fn wants_json(headers: &HeaderMap) -> bool {
    crate::proxy::headers::find(headers, &header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// An error with a one-line reason: JSON `{"message": …}` when the client speaks JSON, plain text otherwise.
pub fn error(status: StatusCode, message: &str, json: bool) -> Resp {
    let (ct, body) = if json {
        (
            "application/json",
            serde_json::json!({ "message": message }).to_string(),
        )
    } else {
        ("text/plain; charset=utf-8", format!("{message}\n"))
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ct)
        .body(Body::from(body))
        .expect("static response")
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("serializable")))
        .expect("static response")
}

/// Adds `Geo-Api-Version` (every Geo API response carries it).
pub fn with_api_version(mut resp: Resp) -> Resp {
    resp.headers_mut().insert(
        geoforge_crds::wire::GEO_API_VERSION_HEADER,
        HeaderValue::from_static(geoforge_crds::GEO_API_VERSION),
    );
    resp
}
