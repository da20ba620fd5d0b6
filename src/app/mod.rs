//! The app behind pushgate: where it is, and the kept-alive HTTP/1.1
//! connections to it that the proxy and the auth requests share.
//!
//! - [`pool`]: the connections, one pool per thread, and the one rule for
//!   reusing them.
//! - [`h1`]: the lean client for requests without a body (most of them, and
//!   the auth requests).
//! - [`streamed`]: uploads and upgrades, over hyper's HTTP/1 client on the
//!   same pool.

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use crate::config::Config;

pub mod h1;
pub mod pool;
pub mod streamed;

pub use h1::AppClient;

/// Where the app lives: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    /// Parses `upstream.url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "`{url}`: pushgate talks plain HTTP to the app beside it; https upstreams are not supported"
                ))
            }
            _ => return Err(format!("`{url}` must start with http://")),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if uri.path() != "/" || uri.query().is_some() {
            return Err(format!(
                "`{url}` has a path or query; requests keep their own path, so give only scheme, host and port"
            ));
        }
        Ok(Upstream {
            scheme: Scheme::HTTP,
            authority,
        })
    }

    /// The app's host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The app's URI for a request's path and query.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
            .expect("scheme, authority and path make a valid URI")
    }
}

/// The server's one client for requests to the app, from a validated
/// config: `upstream.url`, `upstream.pool_max_idle` (per thread) and
/// `upstream.pool_idle_timeout`.
pub fn app_client(config: &Config) -> AppClient {
    let upstream = Upstream::parse(&config.upstream.url).expect("validated upstream.url");
    AppClient::new(
        &upstream.authority,
        config.upstream.pool_max_idle,
        config.upstream.pool_idle_timeout,
    )
}

/// Fields pushgate adds to a request for the app: the forwarding headers,
/// and `Host` where the client gave it only as an HTTP/2 authority.
#[derive(Default)]
pub struct Added {
    fields: [Option<(HeaderName, HeaderValue)>; 4],
}

impl Added {
    pub fn push(&mut self, name: HeaderName, value: HeaderValue) {
        let free = self
            .fields
            .iter_mut()
            .find(|field| field.is_none())
            .expect("at most four fields are added");
        *free = Some((name, value));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields
            .iter()
            .flatten()
            .map(|(name, value)| (name, value))
    }

    pub fn drain(&mut self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        self.fields.iter_mut().filter_map(Option::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_must_be_plain_http_without_path() {
        assert!(Upstream::parse("http://127.0.0.1:3000").is_ok());
        assert!(Upstream::parse("http://app:3000/").is_ok());
        assert!(Upstream::parse("https://app")
            .unwrap_err()
            .contains("https"));
        assert!(Upstream::parse("http://app/base")
            .unwrap_err()
            .contains("path"));
        assert!(Upstream::parse("app:3000").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let upstream = Upstream::parse("http://127.0.0.1:3000").unwrap();
        let pq = PathAndQuery::from_static("/a/b?c=d");
        assert_eq!(
            upstream.uri(Some(&pq)).to_string(),
            "http://127.0.0.1:3000/a/b?c=d"
        );
        assert_eq!(upstream.uri(None).to_string(), "http://127.0.0.1:3000/");
    }
}
