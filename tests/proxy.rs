//! The reverse proxy, end to end: a real upstream app, pushgate in front,
//! real HTTP clients, all on ephemeral ports.

mod common;

use common::{get, Pushgate, Upstream};
use http::StatusCode;

#[tokio::test]
async fn get_reaches_the_app() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), "").await;
    let (status, body) = get(&gate.url("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "hello from upstream");
}
