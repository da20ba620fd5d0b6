//! `engine.redis.url` and its TLS CA file, checked while loading; the CA
//! file is read then, once, and the engine is handed its bytes.

use std::path::Path;

/// Checks an `engine.redis.url`.
pub fn parse_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("`{url}` is not a redis:// or rediss:// URL"));
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|err| format!("`{}` is not a usable Redis URL: {err}", redact(url)))
}

/// The database number an `engine.redis.url` names.
pub fn url_database(url: &str) -> Option<i64> {
    use redis::IntoConnectionInfo;
    Some(url.into_connection_info().ok()?.redis_settings().db())
}

/// Reads `engine.redis.tls_ca_file`, checking it holds a certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_echoed() {
        assert!(parse_url("redis://127.0.0.1:6379/2").is_ok());
        assert!(parse_url("rediss://user:pw@example.com:6380").is_ok());
        assert!(parse_url("http://127.0.0.1").is_err());
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
    }
}
