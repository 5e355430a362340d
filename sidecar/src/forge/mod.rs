//! The embedded forge: `git http-backend` as CGI over a directory of bare repositories,
//! with optional HTTP basic auth, and push detection. Owner: proxy work (issue 3).

pub mod credentials;

pub use credentials::hash_password;
