//! A process's output: the events it produced, kept in a bounded ring for
//! late subscribers, and fanned out live to every subscriber.
//!
//! Ordering rule (why no event is lost or doubled): a publisher appends to
//! the ring and copies the subscriber list under one lock, and a subscriber
//! copies the ring and registers under the same lock. So every event is
//! either in a subscriber's replay or sent to it live, never both, never
//! neither. The exit event is stored too: a subscriber arriving after the
//! exit gets the replay and the exit at once.
//!
//! Memory: the ring holds at most `cap` bytes of data (oldest dropped
//! first); live subscribers have bounded channels, and a publisher waits for
//! a slow subscriber (backpressure reaches the process through its pipe), so
//! a flood cannot grow envd's memory.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

/// Events queued per live subscriber before the publisher waits.
const SUBSCRIBER_QUEUE: usize = 64;

/// One event of a process's stream, as sent on the wire (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The process started.
    Start {
        /// Its process id.
        pid: u32,
        /// Its tag.
        tag: String,
    },
    /// Bytes the process wrote to stdout (or to its terminal).
    Stdout {
        /// The bytes, base64 on the wire.
        #[serde(serialize_with = "serialize_bytes")]
        data: Bytes,
    },
    /// Bytes the process wrote to stderr.
    Stderr {
        /// The bytes, base64 on the wire.
        #[serde(serialize_with = "serialize_bytes")]
        data: Bytes,
    },
    /// A rich output a runner sent (a PNG figure, ...).
    Output {
        /// Its MIME type.
        mime_type: String,
        /// Its bytes, base64 as the runner sent them.
        data: String,
    },
    /// The process exited: always the last event of a stream.
    Exit(ExitInfo),
    /// The stream failed: the last event of a stream that has no exit.
    Error {
        /// `{"code", "message"}`.
        error: serde_json::Value,
    },
}

fn serialize_bytes<S: serde::Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    crate::json::b64::serialize(b, s)
}

impl Event {
    /// Bytes of output the event carries.
    fn data_len(&self) -> usize {
        match self {
            Event::Stdout { data } | Event::Stderr { data } => data.len(),
            _ => 0,
        }
    }

    /// The event as one NDJSON line.
    pub fn to_line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","error":{{"code":"internal","message":"{e}"}}}}"#)
                .into_bytes()
        });
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitInfo {
    /// Exit status, when it exited normally.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Wall time from start to exit.
    pub duration_ms: u64,
    /// Whether envd killed it because its timeout passed.
    pub timed_out: bool,
}

/// The events of one process: a bounded replay ring plus live subscribers.
#[derive(Debug)]
pub struct Output {
    state: Mutex<OutputState>,
}

#[derive(Debug)]
struct OutputState {
    ring: VecDeque<Event>,
    ring_bytes: usize,
    cap: usize,
    dropped_bytes: u64,
    subscribers: Vec<mpsc::Sender<Event>>,
    exit: Option<Event>,
}

/// What a new subscriber receives: the replay, then live events (or the
/// stored exit at once).
#[derive(Debug)]
pub struct Subscription {
    /// Events produced before subscribing (bounded by the ring).
    pub replay: Vec<Event>,
    /// The exit event, when the process had already finished.
    pub exit: Option<Event>,
    /// Live events; `None` when the process had already finished.
    pub live: Option<mpsc::Receiver<Event>>,
}

impl Output {
    /// An empty output keeping up to `cap` bytes for replay.
    pub fn new(cap: usize) -> Output {
        Output {
            state: Mutex::new(OutputState {
                ring: VecDeque::new(),
                ring_bytes: 0,
                cap,
                dropped_bytes: 0,
                subscribers: Vec::new(),
                exit: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes; with `replay`, the buffered events come first.
    pub fn subscribe(&self, replay: bool) -> Subscription {
        let mut st = self.lock();
        let replay = if replay {
            st.ring.iter().cloned().collect()
        } else {
            Vec::new()
        };
        if let Some(exit) = st.exit.clone() {
            return Subscription {
                replay,
                exit: Some(exit),
                live: None,
            };
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        st.subscribers.push(tx);
        Subscription {
            replay,
            exit: None,
            live: Some(rx),
        }
    }

    /// Publishes a data event: into the ring, then to every live subscriber,
    /// waiting for slow ones. Subscribers that went away are dropped.
    pub async fn publish(&self, event: Event) {
        let subscribers = {
            let mut st = self.lock();
            let len = event.data_len();
            st.ring_bytes += len;
            st.ring.push_back(event.clone());
            while st.ring_bytes > st.cap {
                let Some(old) = st.ring.pop_front() else {
                    break;
                };
                let n = old.data_len();
                st.ring_bytes -= n;
                st.dropped_bytes += n as u64;
            }
            st.subscribers.retain(|s| !s.is_closed());
            st.subscribers.clone()
        };
        for s in subscribers {
            // A closed subscriber is removed on the next publish.
            let _ = s.send(event.clone()).await;
        }
    }

    /// Stores the terminal event and hands it to every live subscriber, whose
    /// streams then end.
    pub async fn finish(&self, exit: Event) {
        let subscribers = {
            let mut st = self.lock();
            st.exit = Some(exit.clone());
            std::mem::take(&mut st.subscribers)
        };
        for s in subscribers {
            let _ = s.send(exit.clone()).await;
        }
    }

    /// Bytes dropped from the head of the ring so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.lock().dropped_bytes
    }

    /// Number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|s| !s.is_closed());
        st.subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(s: &'static str) -> Event {
        Event::Stdout {
            data: Bytes::from_static(s.as_bytes()),
        }
    }

    fn exit() -> Event {
        Event::Exit(ExitInfo {
            code: Some(0),
            signal: None,
            duration_ms: 1,
            timed_out: false,
        })
    }

    #[tokio::test]
    async fn ring_is_bounded_and_counts_drops() {
        let o = Output::new(4);
        o.publish(out("ab")).await;
        o.publish(out("cd")).await;
        o.publish(out("ef")).await;
        let sub = o.subscribe(true);
        assert_eq!(sub.replay, vec![out("cd"), out("ef")]);
        assert_eq!(o.dropped_bytes(), 2);
    }

    #[tokio::test]
    async fn late_subscriber_gets_replay_and_exit_at_once() {
        let o = Output::new(1024);
        o.publish(out("x")).await;
        o.finish(exit()).await;
        let sub = o.subscribe(true);
        assert_eq!(sub.replay, vec![out("x")]);
        assert_eq!(sub.exit, Some(exit()));
        assert!(sub.live.is_none());
    }

    #[tokio::test]
    async fn live_subscriber_sees_each_event_once() {
        let o = Output::new(1024);
        o.publish(out("a")).await;
        let mut sub = o.subscribe(true);
        o.publish(out("b")).await;
        o.finish(exit()).await;
        let mut live = sub.live.take().unwrap();
        assert_eq!(sub.replay, vec![out("a")]);
        assert_eq!(live.recv().await, Some(out("b")));
        assert_eq!(live.recv().await, Some(exit()));
        assert_eq!(live.recv().await, None);
    }

    #[test]
    fn events_serialise_as_ndjson() {
        let line = out("hi").to_line();
        assert_eq!(&line[..], b"{\"type\":\"stdout\",\"data\":\"aGk=\"}\n");
        let line = exit().to_line();
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "exit");
        assert_eq!(v["code"], 0);
        assert_eq!(v["timed_out"], false);
    }
}
