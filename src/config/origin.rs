//! `realtime.allowed_origins`: the origins whose pages may open realtime
//! connections.

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: any origin.
    Any,
    /// `https://app.example.com[:port]`, compared case-insensitively.
    Exact(String),
    /// `https://*.example.com[:port]`: any subdomain (not the domain itself).
    Subdomains {
        scheme: String,
        suffix: String,
        port: Option<String>,
    },
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        let lower = text.to_ascii_lowercase();
        let (scheme, rest) = lower
            .split_once("://")
            .ok_or_else(|| format!("`{text}` has no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("`{text}`: the scheme must be http or https"));
        }
        if rest.is_empty() || rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(format!(
                "`{text}`: an origin is scheme://host[:port], without a path"
            ));
        }
        if let Some(domain) = rest.strip_prefix("*.") {
            let (host, port) = match domain.rsplit_once(':') {
                Some((host, port)) => (host, Some(port.to_owned())),
                None => (domain, None),
            };
            if host.is_empty() || host.contains('*') {
                return Err(format!("`{text}`: a wildcard is `*.` and a domain"));
            }
            return Ok(OriginPattern::Subdomains {
                scheme: scheme.to_owned(),
                suffix: format!(".{host}"),
                port,
            });
        }
        if rest.contains('*') {
            return Err(format!(
                "`{text}`: `*` may only start the host, as in *.example.com"
            ));
        }
        Ok(OriginPattern::Exact(lower))
    }

    /// Whether `origin` (an `Origin` header's text) is one this pattern allows.
    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                let origin = origin.to_ascii_lowercase();
                let Some(rest) = origin
                    .strip_prefix(scheme.as_str())
                    .and_then(|r| r.strip_prefix("://"))
                else {
                    return false;
                };
                let (host, origin_port) = match rest.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (rest, None),
                };
                host.ends_with(suffix.as_str())
                    && host.len() > suffix.len()
                    && origin_port == port.as_deref()
            }
        }
    }
}
