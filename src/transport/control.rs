//! Reaching live sessions: by user for the per-user connection limit and
//! the API's disconnect and unsubscribe, and all of them at shutdown.
//!
//! Every session registers a [`Control`], under its user when it has one.
//! The API sets an order on it and wakes the session, which carries it out
//! on its own transport: a close code on WebSocket, an event and the end of
//! the stream on SSE, an immediate answer on long-poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::Grant;
use crate::error::{Kind, Refusal};
use crate::message::ChannelName;
use crate::signal::{Signal, Wait};

/// Orders for one session, set by the API.
pub struct Control {
    /// Wakes the session when an order arrives.
    wake: Arc<Signal>,
    /// Made at the first order: most sessions never get one, and an idle
    /// connection should not carry room for them.
    orders: Mutex<Option<Box<Taken>>>,
}

/// What a session must do, taken from its control.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Close with this code and reason.
    pub disconnect: Option<(u16, String)>,
    /// The close is for a grant that ran out, not the app's order.
    pub expired: bool,
    /// Stop hearing these channels (and tell the client).
    pub unsubscribe: Vec<ChannelName>,
    /// The app renewed the grant: hear only what it allows from now on.
    pub regrant: Option<Grant>,
    /// The server is shutting down: end the way the transport does then
    /// (WebSocket 1001, Pusher 4200, SSE a `retry` and the end of the
    /// stream); before any other order.
    pub shutdown: bool,
}

impl Control {
    fn new() -> Arc<Control> {
        Arc::new(Control {
            wake: Arc::default(),
            orders: Mutex::default(),
        })
    }

    /// Adds to the orders waiting and wakes the session.
    fn order(&self, add: impl FnOnce(&mut Taken)) {
        let mut orders = self.orders.lock().expect("control lock");
        add(orders.get_or_insert_default());
        drop(orders);
        self.wake.notify();
    }

    /// Orders the session to close.
    pub fn disconnect(&self, code: u16, reason: &str) {
        self.order(|orders| orders.disconnect = Some((code, reason.to_owned())));
    }

    /// Orders the session to close with 4001: its grant ran out.
    pub fn expire(&self, reason: &str) {
        self.order(|orders| {
            orders.disconnect = Some((4001, reason.to_owned()));
            orders.expired = true;
        });
    }

    /// Hands the session a renewed grant.
    pub fn regrant(&self, grant: Grant) {
        self.order(|orders| orders.regrant = Some(grant));
    }

    /// Orders the session to end: the server is shutting down.
    fn shut_down(&self) {
        self.order(|orders| orders.shutdown = true);
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        self.order(|orders| orders.unsubscribe.push(channel.clone()));
    }

    /// Waits for an order.
    pub async fn ordered(&self) {
        self.wake.wait().await
    }

    /// Like [`Control::ordered`], as an owned future for a hand-written
    /// stream.
    pub fn ordered_owned(&self) -> Wait {
        Wait::new(self.wake.clone())
    }

    /// Takes the orders waiting.
    pub fn take(&self) -> Taken {
        let orders = self.orders.lock().expect("control lock").take();
        orders.map(|orders| *orders).unwrap_or_default()
    }
}

/// Every session's control, by user and by connection id.
pub struct Registry {
    users: Mutex<HashMap<String, HashMap<u64, Arc<Control>>>>,
    /// Every session's control by connection id, for shutdown to reach each
    /// ([`Registry::shut_down`]); `None` once it has, when a session that
    /// registers is told at once. One entry here costs a session less than
    /// a wait of its own on the shutdown signal (96 bytes each).
    sessions: Mutex<Option<HashMap<u64, Arc<Control>>>>,
    next_id: AtomicU64,
    /// `limits.connections_per_user`; 0: unlimited.
    per_user: usize,
}

/// A session's place in the registry; leaving it unregisters.
pub struct Registration {
    registry: Arc<Registry>,
    /// Boxed rather than a `String`: 8 bytes less in every session (which
    /// sits in the WebSocket task, see `websocket::run`).
    user: Option<Box<str>>,
    /// The connection id, unique in this process; sent to the app with
    /// refresh requests.
    pub id: u64,
    pub control: Arc<Control>,
    /// Run when the registration ends (gives back an engine-wide place).
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Registration {
    /// Runs `release` when this registration ends.
    pub fn on_release(&mut self, release: Box<dyn FnOnce() + Send + Sync>) {
        self.release = Some(release);
    }
}

/// The refusal for a user over `limits.connections_per_user`.
pub fn too_many_connections() -> Refusal {
    Refusal::new(
        Kind::OverLimit,
        "too_many_connections",
        "too many realtime connections for this user (limits.connections_per_user)",
    )
}

impl Registry {
    pub fn new(per_user: usize) -> Arc<Registry> {
        Arc::new(Registry {
            users: Mutex::default(),
            sessions: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            per_user,
        })
    }

    /// Registers a session of `user` (anonymous sessions are not limited or
    /// reachable by user), refusing one over the per-user limit.
    pub fn register(self: &Arc<Self>, user: Option<&str>) -> Result<Registration, Refusal> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let control = Control::new();
        if let Some(user) = user {
            let mut users = self.users.lock().expect("registry lock");
            let sessions = users.entry(user.to_owned()).or_default();
            if self.per_user > 0 && sessions.len() >= self.per_user {
                tracing::info!(
                    user,
                    limit = self.per_user,
                    "limit: limits.connections_per_user reached"
                );
                if sessions.is_empty() {
                    users.remove(user);
                }
                return Err(too_many_connections());
            }
            sessions.insert(id, control.clone());
        }
        match self.sessions.lock().expect("registry lock").as_mut() {
            Some(sessions) => {
                sessions.insert(id, control.clone());
            }
            None => control.shut_down(),
        }
        Ok(Registration {
            registry: self.clone(),
            user: user.map(Box::from),
            id,
            control,
            release: None,
        })
    }

    /// Registers a session that no user reaches (a Pusher connection
    /// before it signs in).
    pub fn anonymous(self: &Arc<Self>) -> Registration {
        self.register(None)
            .expect("only a user's session can be over the per-user limit")
    }

    /// Orders every session to end, now and as each registers from here on:
    /// the server is shutting down.
    pub fn shut_down(&self) {
        let sessions = self.sessions.lock().expect("registry lock").take();
        for control in sessions.into_iter().flat_map(HashMap::into_values) {
            control.shut_down();
        }
    }

    /// `limits.connections_per_user`; 0: unlimited.
    pub fn per_user(&self) -> usize {
        self.per_user
    }

    /// Orders every session of `user` to close; returns how many.
    pub fn disconnect(&self, user: &str, code: u16, reason: &str) -> usize {
        self.order(user, |control| control.disconnect(code, reason))
    }

    /// Orders every session of `user` to stop hearing `channel`; returns how
    /// many sessions were told.
    pub fn unsubscribe(&self, user: &str, channel: &ChannelName) -> usize {
        self.order(user, |control| control.unsubscribe(channel))
    }

    /// Gives an order to every session of `user`, outside the registry's
    /// lock; returns how many sessions got it.
    fn order(&self, user: &str, give: impl Fn(&Control)) -> usize {
        let sessions: Vec<Arc<Control>> = self
            .users
            .lock()
            .expect("registry lock")
            .get(user)
            .map(|sessions| sessions.values().cloned().collect())
            .unwrap_or_default();
        for control in &sessions {
            give(control);
        }
        sessions.len()
    }

    /// Open sessions of `user`.
    #[cfg(test)]
    pub fn sessions_of(&self, user: &str) -> usize {
        self.users
            .lock()
            .expect("registry lock")
            .get(user)
            .map_or(0, HashMap::len)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
        if let Some(sessions) = self
            .registry
            .sessions
            .lock()
            .expect("registry lock")
            .as_mut()
        {
            sessions.remove(&self.id);
        }
        if let Some(user) = &self.user {
            let mut users = self.registry.users.lock().expect("registry lock");
            if let Some(sessions) = users.get_mut(&**user) {
                sessions.remove(&self.id);
                if sessions.is_empty() {
                    users.remove(&**user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_user_limit_counts_open_sessions() {
        let registry = Registry::new(2);
        let a = registry.register(Some("ann")).unwrap();
        let _b = registry.register(Some("ann")).unwrap();
        assert_eq!(
            registry.register(Some("ann")).err().map(|e| e.kind),
            Some(Kind::OverLimit)
        );
        assert!(registry.register(Some("bob")).is_ok(), "per user");
        assert!(
            registry.register(None).is_ok(),
            "anonymous sessions are not limited"
        );
        drop(a);
        assert!(
            registry.register(Some("ann")).is_ok(),
            "a closed session frees its place"
        );
    }

    #[test]
    fn orders_reach_every_session_of_the_user() {
        let registry = Registry::new(0);
        let one = registry.register(Some("ann")).unwrap();
        let two = registry.register(Some("ann")).unwrap();
        let other = registry.register(Some("bob")).unwrap();
        assert_eq!(registry.disconnect("ann", 4000, "bye"), 2);
        let channel = ChannelName::parse("c").unwrap();
        assert_eq!(registry.unsubscribe("ann", &channel), 2);
        for registration in [&one, &two] {
            let taken = registration.control.take();
            assert_eq!(taken.disconnect, Some((4000, "bye".into())));
            assert_eq!(taken.unsubscribe, vec![channel.clone()]);
        }
        assert_eq!(other.control.take(), Taken::default());
        assert_eq!(registry.disconnect("nobody", 4000, ""), 0);
        drop(one);
        assert_eq!(registry.sessions_of("ann"), 1);
    }

    /// Shutdown reaches every session, with a user or without, each once;
    /// one that registers after it began is told at once; and a session
    /// that ended is no longer held for it.
    #[test]
    fn shutdown_reaches_every_session_and_each_that_comes_after() {
        let registry = Registry::new(0);
        let gone = registry.register(Some("ann")).unwrap();
        let weak = Arc::downgrade(&gone.control);
        drop(gone);
        assert!(weak.upgrade().is_none(), "an ended session is let go");
        let live: Vec<Registration> = [Some("ann"), Some("ann"), None, Some("bob")]
            .into_iter()
            .map(|user| registry.register(user).unwrap())
            .collect();
        registry.shut_down();
        for registration in &live {
            let taken = registration.control.take();
            assert!(taken.shutdown, "session {} told", registration.id);
            assert!(!registration.control.take().shutdown, "told once");
        }
        let late = registry.anonymous();
        assert!(
            late.control.take().shutdown,
            "a late session is told at once"
        );
        // The per-user orders still work after shutdown.
        assert_eq!(registry.disconnect("ann", 4000, "bye"), 2);
    }
}
