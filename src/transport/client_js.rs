//! The browser client (`clients/js/pushgate.js`) at `{prefix}/client.js`,
//! built into the binary so a page can load it from pushgate itself, with
//! no CDN and no build step:
//!
//! ```html
//! <script type="module">
//!   import { connect } from "/realtime/client.js";
//! </script>
//! ```
//!
//! It is a public, static file: no auth, `Access-Control-Allow-Origin: *`
//! (a module script from another origin needs CORS, and the file holds no
//! secret), an ETag from its content so a page revalidates cheaply, and a
//! short max-age so an upgraded pushgate's client reaches pages soon.

use std::sync::LazyLock;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::body::Body;
use crate::error::Refusal;

/// The library, as it is in the repository.
pub const SOURCE: &str = include_str!("../../clients/js/pushgate.js");

/// How long a browser may use its copy without asking again.
const CACHE_CONTROL: &str = "public, max-age=300";

/// A strong ETag: FNV-1a 64 of the file, so it changes with any byte.
static ETAG: LazyLock<HeaderValue> = LazyLock::new(|| {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in SOURCE.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    HeaderValue::from_str(&format!("\"{hash:016x}\"")).expect("hex is a valid header value")
});

/// Answers `GET`/`HEAD {prefix}/client.js`, with `304` when the browser
/// already holds this version.
pub(super) fn serve<B>(request: &Request<B>) -> Result<Response<Body>, Refusal> {
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(Refusal::method_not_allowed("GET, HEAD")),
    };
    let fresh = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == ETAG.to_str().unwrap_or_default());
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, crate::body::empty())
    } else if head {
        (StatusCode::OK, crate::body::empty())
    } else {
        (StatusCode::OK, crate::body::full(SOURCE))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::ETAG, ETAG.clone());
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if status == StatusCode::OK {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(SOURCE.len()));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(if_none_match: Option<&str>) -> Response<Body> {
        let mut request = Request::get("/realtime/client.js");
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        serve(&request.body(()).unwrap()).unwrap()
    }

    #[test]
    fn etag_is_quoted_hex_of_the_content() {
        let tag = ETAG.to_str().unwrap();
        assert_eq!(tag.len(), 18);
        assert!(tag.starts_with('"') && tag.ends_with('"'));
        assert!(tag[1..17].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn revalidation_matches_only_this_version() {
        let tag = ETAG.to_str().unwrap().to_owned();
        assert_eq!(get(Some(&tag)).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            get(Some(&format!("\"0000000000000000\", W/{tag}"))).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(get(Some("*")).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(get(Some("\"0000000000000000\"")).status(), StatusCode::OK);
        assert_eq!(get(Some("not even a tag")).status(), StatusCode::OK);
        assert_eq!(get(None).status(), StatusCode::OK);
    }

    #[test]
    fn only_get_and_head() {
        let post = Request::post("/realtime/client.js").body(()).unwrap();
        assert_eq!(
            serve(&post).unwrap_err().kind.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
