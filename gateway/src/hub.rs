//! Who is online: device id -> the live session's shared handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

/// Why the gateway closes a session from outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseOrder {
    /// WebSocket close code.
    pub code: u16,
    /// Close frame reason text.
    pub text: &'static str,
    /// `last_disconnect_reason` recorded for the device.
    pub reason: &'static str,
}

impl CloseOrder {
    /// A newer connection of the same device took over (4001).
    pub const REPLACED: CloseOrder = CloseOrder {
        code: 4001,
        text: "session replaced",
        reason: "session_replaced",
    };
    /// The device was disabled or deleted (4003).
    pub const DISABLED: CloseOrder = CloseOrder {
        code: 4003,
        text: "device disabled",
        reason: "disabled",
    };
    /// The device's token was rotated (4003).
    pub const TOKEN_ROTATED: CloseOrder = CloseOrder {
        code: 4003,
        text: "token rotated",
        reason: "token_rotated",
    };
}

/// State a live session shares with the rest of the gateway.
#[derive(Debug)]
pub struct SessionHandle {
    pub session_id: String,
    /// When the session was established (epoch ms).
    pub connected_at: i64,
    last_seen: AtomicI64,
    close: OnceLock<CloseOrder>,
    closed: Notify,
    commands: Notify,
    /// Commands already marked sent, `(id, message)`, for the session to write out;
    /// `None` until the session has written what was due at connect, and once it stopped
    /// writing.
    outbox: Mutex<Option<Vec<(String, String)>>>,
    /// The session should look for queued commands its window lets through.
    recheck: AtomicBool,
    /// The device may have queued commands: set when one is left queued for it, cleared by
    /// the session when it looks. A freed slot in the window costs a look (a commit) only
    /// while this is set.
    backlog: AtomicBool,
}

impl SessionHandle {
    /// A handle for a session that connected at `now` (epoch ms).
    pub fn new(session_id: String, now: i64) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            session_id,
            connected_at: now,
            last_seen: AtomicI64::new(now),
            close: OnceLock::new(),
            closed: Notify::new(),
            commands: Notify::new(),
            outbox: Mutex::new(None),
            recheck: AtomicBool::new(false),
            backlog: AtomicBool::new(true),
        })
    }

    /// Records a frame from the device; kept in memory, written when the session ends.
    pub fn touch(&self, now: i64) {
        self.last_seen.store(now, Ordering::Relaxed);
    }

    /// The last time a frame arrived.
    pub fn last_seen(&self) -> i64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Asks the session to close; the first order wins.
    pub fn order_close(&self, order: CloseOrder) {
        let _ = self.close.set(order);
        self.closed.notify_one();
    }

    /// Tells the session its device's commands changed (one queued, or a slot freed).
    pub fn notify_commands(&self) {
        self.backlog.store(true, Ordering::Release);
        self.recheck.store(true, Ordering::Release);
        // `notify_one` keeps a permit when the session is busy, so no nudge is lost.
        self.commands.notify_one();
    }

    /// Hands the session commands already marked sent, `(id, message)`; gives them back
    /// if the session no longer writes (it is ending).
    pub fn push_commands(
        &self,
        messages: Vec<(String, String)>,
    ) -> Result<(), Vec<(String, String)>> {
        match self.outbox.lock().expect("outbox lock").as_mut() {
            Some(outbox) => outbox.extend(messages),
            None => return Err(messages),
        }
        self.commands.notify_one();
        Ok(())
    }

    /// The session has written what was due at connect: from now on commands may be
    /// handed to it directly.
    pub fn open_outbox(&self) {
        self.outbox
            .lock()
            .expect("outbox lock")
            .get_or_insert_with(Vec::new);
    }

    /// True while the session writes commands out.
    pub fn accepts_commands(&self) -> bool {
        self.outbox.lock().expect("outbox lock").is_some()
    }

    /// The session stops writing commands; returns those pushed but never written.
    pub fn stop_commands(&self) -> Vec<(String, String)> {
        self.outbox
            .lock()
            .expect("outbox lock")
            .take()
            .unwrap_or_default()
    }

    /// Resolves after [`notify_commands`](Self::notify_commands) or
    /// [`push_commands`](Self::push_commands) (cancel-safe).
    pub async fn commands_changed(&self) {
        self.commands.notified().await;
    }

    /// Whether the device may have queued commands, forgetting it: the caller looks now, and
    /// a command queued after this call sets it again ([`notify_commands`](Self::notify_commands)).
    pub fn take_backlog(&self) -> bool {
        self.backlog.swap(false, Ordering::AcqRel)
    }

    /// The look found commands (the window may have filled before the queue emptied).
    pub fn keep_backlog(&self) {
        self.backlog.store(true, Ordering::Release);
    }

    /// The messages pushed since the last call, and whether a recheck was asked for.
    pub fn take_commands(&self) -> (Vec<(String, String)>, bool) {
        let messages = self
            .outbox
            .lock()
            .expect("outbox lock")
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        (messages, self.recheck.swap(false, Ordering::AcqRel))
    }

    /// Resolves once a close was ordered (cancel-safe: an order is never lost).
    pub async fn close_ordered(&self) -> CloseOrder {
        loop {
            if let Some(order) = self.close.get() {
                return *order;
            }
            self.closed.notified().await;
        }
    }
}

/// The registry of live sessions.
#[derive(Debug, Default)]
pub struct Hub {
    live: Mutex<HashMap<String, Arc<SessionHandle>>>,
}

impl Hub {
    /// Makes `handle` the device's live session, closing the one it replaces with 4001.
    pub fn register(&self, device_id: &str, handle: Arc<SessionHandle>) {
        let old = self
            .live
            .lock()
            .expect("hub lock")
            .insert(device_id.to_owned(), handle);
        if let Some(old) = old {
            old.order_close(CloseOrder::REPLACED);
        }
    }

    /// Removes the device's entry if it still belongs to this session.
    pub fn unregister(&self, device_id: &str, session_id: &str) {
        let mut live = self.live.lock().expect("hub lock");
        if live
            .get(device_id)
            .is_some_and(|h| h.session_id == session_id)
        {
            live.remove(device_id);
        }
    }

    /// Closes the device's live session, if any; true when there was one.
    pub fn close(&self, device_id: &str, order: CloseOrder) -> bool {
        let handle = self.live.lock().expect("hub lock").get(device_id).cloned();
        match handle {
            Some(h) => {
                h.order_close(order);
                true
            }
            None => false,
        }
    }

    /// The live session of a device.
    pub fn get(&self, device_id: &str) -> Option<Arc<SessionHandle>> {
        self.live.lock().expect("hub lock").get(device_id).cloned()
    }

    /// How many devices are online.
    pub fn online_count(&self) -> usize {
        self.live.lock().expect("hub lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_session_replaces_the_first() {
        let hub = Hub::default();
        let first = SessionHandle::new("s1".into(), 0);
        hub.register("d", first.clone());
        let second = SessionHandle::new("s2".into(), 0);
        hub.register("d", second.clone());
        assert_eq!(first.close_ordered().await, CloseOrder::REPLACED);
        hub.unregister("d", "s1");
        assert_eq!(
            hub.get("d").unwrap().session_id,
            "s2",
            "the old session's exit keeps the new one"
        );
        hub.unregister("d", "s2");
        assert!(hub.get("d").is_none());
    }

    #[tokio::test]
    async fn a_close_order_is_not_lost_before_anyone_waits() {
        let hub = Hub::default();
        let h = SessionHandle::new("s".into(), 0);
        hub.register("d", h.clone());
        assert!(hub.close("d", CloseOrder::DISABLED));
        assert!(!hub.close("other", CloseOrder::DISABLED));
        assert_eq!(h.close_ordered().await, CloseOrder::DISABLED);
    }

    #[test]
    fn commands_pushed_after_the_session_stopped_come_back() {
        let h = SessionHandle::new("s".into(), 0);
        assert!(
            !h.accepts_commands(),
            "not before it wrote what was due at connect"
        );
        let early = h.push_commands(vec![("c0".into(), "m0".into())]);
        assert_eq!(early, Err(vec![("c0".into(), "m0".into())]));
        h.open_outbox();
        h.push_commands(vec![("c1".into(), "m1".into())]).unwrap();
        assert_eq!(h.take_commands(), (vec![("c1".into(), "m1".into())], false));
        h.push_commands(vec![("c2".into(), "m2".into())]).unwrap();
        h.notify_commands();
        assert!(h.accepts_commands());
        assert_eq!(h.stop_commands(), vec![("c2".into(), "m2".into())]);
        assert!(!h.accepts_commands());
        let back = h.push_commands(vec![("c3".into(), "m3".into())]);
        assert_eq!(back, Err(vec![("c3".into(), "m3".into())]));
        assert_eq!(
            h.take_commands(),
            (vec![], true),
            "the recheck flag survives"
        );
    }
}
