//! The app behind pushgate: where it is, and the kept-alive HTTP/1.1
//! connections to it that the proxy and the auth requests share.
//!
//! - [`pool`]: the connections, one pool per thread, and the one rule for
//!   reusing them.
//! - [`h1`]: the lean client for requests without a body (most of them, and
//!   the auth requests).
//! - [`streamed`]: uploads and upgrades, over hyper's HTTP/1 client on the
//!   same pool.
//! - [`call`]: a JSON request to the app on a client's behalf (auth, rpc,
//!   publishes from clients), its answer bounded in size and time.

use http::header::{HeaderName, HeaderValue};

use crate::config::Settings;

pub mod call;
pub mod h1;
pub mod pool;
pub mod streamed;

pub use call::{AppCalls, CallError};
pub use h1::AppClient;

/// The server's one client for requests to the app: `upstream.url`,
/// `upstream.pool_max_idle` (per thread) and `upstream.pool_idle_timeout`.
pub fn app_client(settings: &Settings) -> AppClient {
    let options = &settings.config.upstream;
    AppClient::new(
        settings.upstream.authority(),
        options.pool_max_idle,
        options.pool_idle_timeout,
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
