//! A realtime session: the channels one connection hears, its position in
//! each, and its outbox. Every transport drives one.
//!
//! Subscribing takes the live subscription (the hub) before it reads
//! history, so nothing published in between is missed; whatever arrives
//! twice (in the replay and in the outbox) is dropped by offset in
//! [`Session::admit`]. A publication that does not follow the session's
//! position (another epoch, or a gap) is never passed on silently: the
//! transport announces a reset first.

use std::sync::Arc;

use std::sync::Weak;

use super::control::{Control, Registration};
use super::{Admission, Realtime, Transport};
use crate::auth::{Credentials, Grant};
use crate::broker::{Member, PresenceMode};
use crate::config::EventKind;
use crate::cursor::{Cursor, Position};
use crate::error::Refusal;
use crate::events::{Event, Reason};
use crate::hub::Outbox;
use crate::message::{ChannelName, Publication};

struct Subscription {
    channel: ChannelName,
    /// The last publication delivered (or the point the client started
    /// from).
    position: Position,
    /// What the channel's rule said of presence when the subscription was
    /// made: it leaves by the same, whatever a reload changed meanwhile.
    presence: PresenceMode,
}

/// The result of a subscribe.
#[derive(Debug)]
pub struct Subscribed {
    /// `false` when the client's position could not be recovered: it must be
    /// told, and continues from `position`.
    pub recovered: bool,
    /// Where the subscription now stands (after the replay).
    pub position: Position,
    /// Publications after the client's position, in order, to send before
    /// anything live.
    pub replay: Vec<Arc<Publication>>,
}

/// What to do with a publication taken from the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    /// Already delivered (or not subscribed any more).
    Skip,
    /// A join or leave event on a subscribed channel: send it as it is.
    Event,
    /// The stream does not follow on from the session's position: announce a
    /// reset to this position, then deliver.
    ResetThenDeliver(Position),
    /// The engine lost track of the stream (an outage longer than history):
    /// announce a reset to this position; there is nothing to deliver.
    Reset(Position),
}

pub struct Session {
    realtime: Arc<Realtime>,
    transport: Transport,
    grant: Grant,
    credentials: Credentials,
    /// The address slot and the registry entry, released with the session.
    _slot: super::IpSlot,
    registration: Registration,
    /// Renews the grant when it runs out. Only for a grant that runs out;
    /// boxed, so that every other session holds 8 bytes for it (sessions
    /// sit in the WebSocket task, see `websocket::run`).
    refresh: Option<Box<Refresh>>,
    outbox: Arc<Outbox>,
    /// This connection in presence entries, join/leave events and calls to
    /// the app: made from the grant the session started with when first
    /// needed (most connections never need it).
    member: std::sync::OnceLock<Arc<Member>>,
    subscriptions: Vec<Subscription>,
    /// The positions of all subscriptions, kept encoded-ready for SSE ids
    /// and long-poll answers.
    cursor: Cursor,
    /// Why the session ends, once known: the first reason given wins (an
    /// order from the app, then the transport's own close).
    end: Option<Reason>,
}

/// What a session's orders leave its transport to do ([`Session::obey`]).
pub struct Obeyed {
    /// Channels left, which the client must be told of.
    pub left: Vec<ChannelName>,
    /// How the session must end, if it must.
    pub end: Option<Ordered>,
}

/// An ordered end of a session.
pub enum Ordered {
    /// Close with this code and reason (`POST /api/disconnect`, or a grant
    /// that ran out).
    Disconnect(u16, String),
    /// The server is shutting down.
    Shutdown,
}

/// A session's grant renewal: the task that renews it, and when the grant
/// runs out, shared with that task so that a grant renewed by the client (a
/// new token) moves its deadline.
struct Refresh {
    task: tokio::task::AbortHandle,
    expiry: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Session {
    pub(super) fn new(
        realtime: Arc<Realtime>,
        transport: Transport,
        admission: Admission,
    ) -> Session {
        let outbox = Outbox::new(realtime.queue);
        let refresh = admission.grant.expires_at.map(|at| {
            let expiry = Arc::new(std::sync::Mutex::new(Some(at)));
            let task = tokio::spawn(refresh(
                realtime.clone(),
                Arc::downgrade(&admission.registration.control),
                admission.grant.clone(),
                expiry.clone(),
                admission.credentials.clone(),
                admission.registration.id,
                transport,
            ))
            .abort_handle();
            Box::new(Refresh { task, expiry })
        });
        let session = Session {
            member: std::sync::OnceLock::new(),
            realtime,
            transport,
            grant: admission.grant,
            credentials: admission.credentials,
            _slot: admission.slot,
            registration: admission.registration,
            refresh,
            outbox,
            subscriptions: Vec::new(),
            cursor: Cursor::new(),
            end: None,
        };
        session.event(EventKind::Connect, None, None);
        session
    }

    /// This connection as presence entries, events and calls name it.
    fn member(&self) -> &Arc<Member> {
        self.member.get_or_init(|| {
            Arc::new(Member {
                user: self.grant.user.clone(),
                connection: self.realtime.connection_id(self.registration.id),
                node: self.realtime.node.clone(),
                info: self
                    .grant
                    .info
                    .clone()
                    .and_then(|info| serde_json::value::RawValue::from_string(info).ok()),
            })
        })
    }

    /// Tells the app (`events`) of what happened to this connection.
    /// Long-poll requests tell nothing: each is a short request, and no
    /// connection lasts between them whose start or end would mean anything
    /// to the app.
    fn event(&self, kind: EventKind, channel: Option<&ChannelName>, reason: Option<Reason>) {
        let events = &self.realtime.events;
        if self.transport != Transport::Poll && events.wants(kind) {
            events.send(Event {
                kind,
                member: self.member().clone(),
                transport: self.transport.name(),
                channel: channel.cloned(),
                reason,
            });
        }
    }

    /// Records why the session ends, unless a reason was recorded already.
    pub fn end_with(&mut self, reason: Reason) {
        self.end.get_or_insert(reason);
    }

    /// Counts a write whose oldest publication is `oldest` (/metrics).
    pub fn delivered(&self, oldest: &Publication) {
        self.realtime.gauges.delivered(oldest);
    }

    /// The node's realtime side, as its config stands now.
    pub(super) fn realtime(&self) -> &Arc<Realtime> {
        &self.realtime
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Where the API's orders for this session arrive.
    pub fn control(&self) -> &Arc<Control> {
        &self.registration.control
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Whether the connection's grant covers `channel`.
    pub fn grant_allows(&self, channel: &ChannelName) -> bool {
        self.grant.allows(channel)
    }

    /// Who this connection is, for calls to the app on its behalf.
    pub(super) fn caller(&self) -> super::calls::Caller {
        super::calls::Caller {
            user: self.member().user.clone(),
            connection: self.member().connection.clone(),
            credentials: self.credentials.clone(),
        }
    }

    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions
            .iter()
            .any(|s| s.channel.as_str() == channel)
    }

    /// Subscribes to `channel`, recovering from `since` when given, else
    /// starting from now.
    pub async fn subscribe(
        &mut self,
        channel: ChannelName,
        since: Option<Position>,
    ) -> Result<Subscribed, Refusal> {
        if self.is_subscribed(channel.as_str()) {
            return Err(Refusal::bad_request(
                "already_subscribed",
                format!("already subscribed to `{channel}`"),
            ));
        }
        if self.subscriptions.len() >= self.realtime.config().max_channels {
            return Err(Refusal::bad_request(
                "too_many_channels",
                format!(
                    "a connection may hear at most {} channels (realtime.max_channels)",
                    self.realtime.config().max_channels
                ),
            ));
        }
        if !self.grant.allows(&channel) {
            // Outside the grant: the app may still allow it
            // (auth.upstream.subscribe_path); else forbidden.
            self.realtime
                .auth()
                .may_subscribe(
                    &self.grant,
                    &self.credentials,
                    &channel,
                    self.transport.name(),
                )
                .await?;
            self.grant.allow(&channel);
        }

        // Live first, then history: nothing published in between is lost.
        // Until `keep`, any error below releases the subscription again.
        let channels = &self.realtime.channels;
        let joining = channels.join(&channel, &self.outbox).await?;
        // The history read below is the subscription's starting point:
        // what the hub was handed while the engine was getting ready (a
        // reset from the outage it was recovering from) is older than the
        // read, and would otherwise reset a position the read just gave.
        channels.hub.discard(&channel, &self.outbox);
        // Without `since` only the position is wanted: a limit of 0 reads
        // no publications.
        let limit = if since.is_some() { usize::MAX } else { 0 };
        let history = channels.broker.history(&channel, since, limit).await?;
        let mode = channels.rules().presence(channel.as_str());
        if mode.any() {
            channels.broker.join(&channel, self.member(), mode).await?;
        }
        joining.keep();
        // The replay runs up to the stream's end, so the subscription now
        // stands there whether it recovered or was reset.
        let position = history.position;
        self.cursor.set(&channel, position);
        // Most connections hear one channel: room for just it (a Vec's
        // first growth is to four), held for the connection's life.
        if self.subscriptions.is_empty() {
            self.subscriptions.reserve_exact(1);
        }
        if since.is_some() {
            self.realtime.gauges.resumed(history.recovered);
        }
        self.event(EventKind::Subscribe, Some(&channel), None);
        if mode.any() {
            self.event(EventKind::Join, Some(&channel), None);
        }
        self.subscriptions.push(Subscription {
            channel,
            position,
            presence: mode,
        });
        self.realtime.gauges.add_subscriptions(self.transport, 1);
        Ok(Subscribed {
            recovered: history.recovered,
            position,
            replay: history.publications,
        })
    }

    /// Stops hearing `channel`, for `why`. Returns whether it was
    /// subscribed.
    pub fn unsubscribe(&mut self, channel: &str, why: Reason) -> bool {
        let Some(index) = self
            .subscriptions
            .iter()
            .position(|s| s.channel.as_str() == channel)
        else {
            return false;
        };
        let subscription = self.subscriptions.remove(index);
        self.realtime.gauges.add_subscriptions(self.transport, -1);
        self.leave(subscription, why);
        self.cursor = Cursor::new();
        for s in &self.subscriptions {
            self.cursor.set(&s.channel, s.position);
        }
        true
    }

    /// Carries out the orders that concern subscriptions, and returns the
    /// channels the session left (to tell the client) and how it must end,
    /// if it must, for the transport to carry out its own way.
    pub fn obey(&mut self) -> Obeyed {
        let orders = self.control().take();
        if orders.shutdown {
            self.end_with(Reason::Shutdown);
            return Obeyed {
                left: Vec::new(),
                end: Some(Ordered::Shutdown),
            };
        }
        let mut left: Vec<ChannelName> = orders
            .unsubscribe
            .into_iter()
            .filter(|channel| self.unsubscribe(channel.as_str(), Reason::AppUnsubscribe))
            .collect();
        if let Some(grant) = orders.regrant {
            left.extend(self.regrant(grant));
        }
        if orders.disconnect.is_some() {
            self.end_with(if orders.expired {
                Reason::AuthExpired
            } else {
                Reason::AppDisconnect
            });
        }
        Obeyed {
            left,
            end: orders
                .disconnect
                .map(|(code, reason)| Ordered::Disconnect(code, reason)),
        }
    }

    /// A new token from the client (JWT mode): renews the grant; returns the
    /// channels the new grant no longer allows.
    pub fn refresh_token(&mut self, token: &str) -> Result<Vec<ChannelName>, Refusal> {
        let renewed = self.realtime.auth().refresh_token(&self.grant, token)?;
        Ok(self.regrant(renewed))
    }

    /// Takes a renewed grant; returns the channels it no longer allows, which
    /// the session has left (the transport tells the client).
    pub fn regrant(&mut self, grant: Grant) -> Vec<ChannelName> {
        if let Some(refresh) = &self.refresh {
            *refresh.expiry.lock().expect("expiry lock") = grant.expires_at;
        }
        // The connection stays who it was when it started.
        self.member();
        self.grant = grant;
        let refused: Vec<ChannelName> = self
            .subscriptions
            .iter()
            .filter(|s| !self.grant.allows(&s.channel))
            .map(|s| s.channel.clone())
            .collect();
        for channel in &refused {
            self.unsubscribe(channel.as_str(), Reason::GrantRevoked);
        }
        refused
    }

    /// Leaves `channel` for `why`: the hub at once, the engine (presence,
    /// and listening when this was the node's last subscriber) on its own
    /// task.
    fn leave(&self, subscription: Subscription, why: Reason) {
        let channels = &self.realtime.channels;
        let (channel, mode) = (subscription.channel, subscription.presence);
        if mode.any() {
            self.event(EventKind::Leave, Some(&channel), Some(why));
        }
        self.event(EventKind::Unsubscribe, Some(&channel), Some(why));
        let present = mode.any().then(|| (self.member().clone(), mode));
        channels.release(&channel, &self.outbox, present);
    }

    /// Decides what to do with a publication from the outbox, and moves the
    /// session's position past it when it is to be delivered.
    pub fn admit(&mut self, publication: &Publication) -> Admit {
        let Some(subscription) = self
            .subscriptions
            .iter_mut()
            .find(|s| s.channel == *publication.channel())
        else {
            return Admit::Skip;
        };
        if publication.is_aside() {
            return Admit::Event;
        }
        let at = subscription.position;
        let next = publication.position();
        if publication.is_reset_marker() {
            let there = (next.epoch == at.epoch && next.offset <= at.offset)
                || (next.offset == 0 && at.offset == 0);
            if there {
                return Admit::Skip;
            }
            subscription.position = next;
            self.cursor.set(publication.channel(), next);
            return Admit::Reset(next);
        }
        let verdict = if next.epoch == at.epoch || at.offset == 0 {
            if next.epoch == at.epoch && next.offset <= at.offset {
                return Admit::Skip;
            }
            if next.offset == at.offset + 1 {
                Admit::Deliver
            } else {
                // A gap: publications were lost on the way.
                Admit::ResetThenDeliver(Position::new(next.epoch, next.offset - 1))
            }
        } else {
            // The stream changed epoch under a live subscription: history
            // was lost.
            Admit::ResetThenDeliver(Position::new(next.epoch, next.offset.saturating_sub(1)))
        };
        subscription.position = next;
        self.cursor.set(publication.channel(), next);
        verdict
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(refresh) = &self.refresh {
            refresh.task.abort();
        }
        self.outbox.close();
        let realtime = &self.realtime;
        realtime
            .gauges
            .add_subscriptions(self.transport, -(self.subscriptions.len() as i64));
        // A transport that records no reason lost its client: an SSE
        // stream whose client went away, a poll answered.
        let why = self.end.unwrap_or(Reason::ClientClosed);
        for subscription in std::mem::take(&mut self.subscriptions) {
            self.leave(subscription, why);
        }
        self.event(EventKind::Disconnect, None, Some(why));
    }
}

/// Renews a grant each time it runs out, through the app's refresh endpoint;
/// when the app refuses (or there is none) the session is closed with 4001.
async fn refresh(
    realtime: Arc<Realtime>,
    control: Weak<Control>,
    mut grant: Grant,
    expiry: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    credentials: Credentials,
    connection_id: u64,
    transport: Transport,
) {
    loop {
        let Some(expires_at) = *expiry.lock().expect("expiry lock") else {
            return;
        };
        tokio::time::sleep_until(expires_at.into()).await;
        let now = *expiry.lock().expect("expiry lock");
        if now.is_none_or(|later| later > expires_at) {
            // Renewed meanwhile (a new token): wait for the new deadline.
            continue;
        }
        let renewed = realtime
            .auth()
            .refresh(&grant, &credentials, connection_id, transport.name())
            .await;
        let Some(control) = control.upgrade() else {
            return;
        };
        match renewed {
            Ok(renewed) => {
                *expiry.lock().expect("expiry lock") = renewed.expires_at;
                grant = renewed.clone();
                control.regrant(renewed);
            }
            Err(refusal) => {
                tracing::info!(
                    user = grant.user.as_deref().unwrap_or(""),
                    reason = %refusal.message,
                    "grant expired and was not renewed; closing with 4001"
                );
                control.expire(&refusal.message);
                return;
            }
        }
    }
}
