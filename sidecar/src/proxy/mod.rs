//! The request path: ingress header hygiene, the upstream client, primary discovery, 503s.
//! Owner: proxy work (issue 3).

pub mod discovery;
