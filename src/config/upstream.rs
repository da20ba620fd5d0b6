//! `upstream.url`: where the app lives.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

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
