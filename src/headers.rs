//! Reading header fields that hold comma-separated tokens.

use http::header::{HeaderMap, HeaderName};

/// Whether the comma-separated header `name` lists `token` (case-insensitive),
/// as `Connection: keep-alive, Upgrade` lists `upgrade`.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}
