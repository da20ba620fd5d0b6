//! Pusher's signatures (being completed).

use ring::hmac;

/// `key:hex(HMAC-SHA256(secret, "socket_id:channel[:channel_data]"))`.
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let mut message = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        message.push(':');
        message.push_str(data);
    }
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()), message.as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{key}:{hex}")
}

/// Whether `auth` is the app's signature for this subscription.
pub fn verify_channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let expected = channel_auth(key, secret, socket_id, channel, channel_data);
    subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), auth.as_bytes()).into()
}
