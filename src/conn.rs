//! Facts about a client connection, and what the app is told of it: the
//! peer's address as `X-Forwarded-For`, believed further back only from
//! `upstream.trusted_proxies`. Shared by the proxy, the auth request and
//! the transports.

use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Whether the connection's peer is one of `trusted_proxies`.
pub fn is_trusted(trusted_proxies: &[IpNet], conn: ConnInfo) -> bool {
    let peer_ip = conn.peer.ip().to_canonical();
    trusted_proxies.iter().any(|net| net.contains(&peer_ip))
}

/// The `X-Forwarded-For` to send on: the incoming chain extended with the
/// peer when the peer is a trusted proxy, else just the peer.
pub fn forwarded_for(
    headers: &HeaderMap,
    conn: ConnInfo,
    trusted_proxies: &[IpNet],
) -> HeaderValue {
    chain_for(headers, conn, is_trusted(trusted_proxies, conn))
}

/// [`forwarded_for`], for a caller that has asked whether the peer is
/// trusted already.
pub fn chain_for(headers: &HeaderMap, conn: ConnInfo, trusted: bool) -> HeaderValue {
    let peer_ip = conn.peer.ip().to_canonical();
    trusted
        .then(|| {
            let earlier: Vec<&str> = headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            (!earlier.is_empty())
                .then(|| HeaderValue::from_str(&format!("{}, {peer_ip}", earlier.join(", "))).ok())
                .flatten()
        })
        .flatten()
        .unwrap_or_else(|| ip_value(peer_ip))
}

/// An IP address as a header value, formatted without a heap `String` (this
/// runs for every proxied request). An IPv4 address, the common case, is
/// written digit by digit: `core::fmt` takes a dozen calls for its four
/// numbers.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    // The longest text form of an IPv6 address is 45 bytes.
    let mut text = [0u8; 48];
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let digits = [octet / 100, octet / 10 % 10, octet % 10];
                let skip = match octet {
                    100.. => 0,
                    10.. => 1,
                    _ => 2,
                };
                for digit in &digits[skip..] {
                    text[len] = b'0' + digit;
                    len += 1;
                }
            }
            len
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let mut rest = &mut text[..];
            write!(rest, "{v6}").expect("an IPv6 address fits in 48 bytes");
            48 - rest.len()
        }
    };
    HeaderValue::from_bytes(&text[..len]).expect("an IP address is header text")
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The header that carries a request's id, to the app and in the access
/// log.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives the request in `headers` its id and returns it: the one a trusted
/// proxy sent (a balancer that made its own, so logs along the way agree),
/// when it is 1–128 visible ASCII characters; else a new one, 32 hex
/// digits. Whatever a client from elsewhere sent is replaced: an id is
/// only worth something if nobody outside can choose it.
pub fn request_id(
    headers: &mut http::HeaderMap,
    conn: ConnInfo,
    trusted_proxies: &[IpNet],
) -> HeaderValue {
    let kept = is_trusted(trusted_proxies, conn)
        .then(|| headers.get(REQUEST_ID))
        .flatten()
        .filter(|id| {
            (1..=128).contains(&id.len()) && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned();
    let id = kept.unwrap_or_else(|| {
        let id = format!("{:032x}", rand::random::<u128>());
        HeaderValue::from_str(&id).expect("hex is a header value")
    });
    headers.insert(REQUEST_ID, id.clone());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_value_reads_as_the_address_does() {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        for octet in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(octet, 0, 255, octet),
                Ipv4Addr::new(9, octet, 10, 99),
                Ipv4Addr::new(100, 200, octet, 1),
            ] {
                assert_eq!(ip_value(IpAddr::V4(ip)), ip.to_string().as_str());
            }
        }
        let longest: Ipv6Addr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        for ip in [
            Ipv6Addr::LOCALHOST,
            longest,
            "2001:db8::8a2e:370:7334".parse().unwrap(),
        ] {
            assert_eq!(ip_value(IpAddr::V6(ip)), ip.to_string().as_str());
        }
    }
}
